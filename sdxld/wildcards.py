"""Wildcards and variants in prompt text, the Dynamic Prompts way (the `dynamicprompts` library).

    {red|blue|green} hair     one of them        {2$$a|b|c}     two of them
    __hair_colors__           a line of prompts/wildcards/hair_colors.txt (sub/folders: __sub/name__)

Drawn from the image's seed: the same seed and the same files give the same prompt. Wildcard
files are read again when any of them changes (checked per image: a listing and a stat per file).
A wildcard without a file is left out of the prompt with one warning naming the file it expected;
text the library cannot parse (an unclosed `{`) is used as written, with one warning.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .prompt_syntax import tidy_commas

log = logging.getLogger(__name__)

_UNRESOLVED = re.compile(r"__([\w./*\- ]+?)__")
_TEMPLATE_MARK = re.compile(r"\{|__[\w./*\- ]+?__")


def has_template(text: str) -> bool:
    return bool(_TEMPLATE_MARK.search(text))


class Wildcards:
    def __init__(self, folder: Path):
        from dynamicprompts.wildcards import WildcardManager

        # The library warns on every image for a missing wildcard; this module warns once, saying more.
        logging.getLogger("dynamicprompts").setLevel(logging.ERROR)
        self.folder = folder
        self._manager = WildcardManager(folder)
        self._signature: tuple = ()
        self._warned: set[tuple] = set()

    def _refresh(self) -> None:
        try:
            signature = tuple(
                (str(p.relative_to(self.folder)), p.stat().st_mtime_ns, p.stat().st_size)
                for p in sorted(self.folder.rglob("*")) if p.is_file()
            )
        except OSError:  # the folder is missing or changing under us: read it again next time
            signature = ("unreadable",)
        if signature != self._signature:
            self._manager.clear_cache()
            self._signature = signature
            self._warned.clear()

    def resolve(self, text: str, seed: int, what: str = "prompt") -> str:
        """`text` with its variants and wildcards drawn from `seed`."""
        if not has_template(text):
            return text
        from dynamicprompts.generators import RandomPromptGenerator
        from pyparsing import ParseException

        self._refresh()
        try:
            resolved = RandomPromptGenerator(self._manager, seed=seed).generate(text, 1)[0]
        except ParseException as err:
            self._warn_once(("syntax", text), "%s %r: wildcard syntax error (%s); used as written", what, text[:120], err)
            return text
        return self._drop_unresolved(resolved, what)

    def _drop_unresolved(self, text: str, what: str) -> str:
        for name in dict.fromkeys(_UNRESOLVED.findall(text)):
            expected = self.folder / f"{name}.txt"
            self._warn_once(("missing", name), "%s: wildcard __%s__ has no values: expected %s (one choice per line); "
                            "left out of the prompt", what, name, expected)
        if not _UNRESOLVED.search(text):
            return text
        return tidy_commas(_UNRESOLVED.sub("", text))

    def _warn_once(self, key: tuple, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)
