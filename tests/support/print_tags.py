"""Run as a separate process by test_store: print N new tags, one per line.

    python -m support.print_tags N
"""

import sys

from sdxld.store import new_tag

if __name__ == "__main__":
    print("\n".join(new_tag() for _ in range(int(sys.argv[1]))))
