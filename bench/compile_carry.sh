#!/usr/bin/env bash
# Compiled code carried from one GPU call to the next (bench/device.sh uses it).
#
# A GPU call lasts minutes, and SDXL's compile builds take most of them (stage 1's CUDA graphs
# 122 s on the H100; fp8's outlasted a call), so each call measured two or three of them and ran
# out of time before the rest. inductor keeps what it builds in TORCHINDUCTOR_CACHE_DIR, and a
# process that builds the same graph again loads it (sdxld's restarts do: docs/performance.md).
# A GPU machine starts bare, so that folder is packed at the end of a call into parts small
# enough to come back from the machine and to travel with the next call: each call finds the
# builds of the calls before it and spends its time on the builds they did not reach.
#
#   bash bench/compile_carry.sh unpack FOLDER FROM   # FROM's compile-cache.tgz.* into FOLDER
#   bash bench/compile_carry.sh pack FOLDER TO       # FOLDER into TO/compile-cache.tgz.NN
#
# The cache is keyed by torch's version and the card, so parts from another card or torch are
# simply not found (builds run as if cold). Unpack into the same absolute path the call packed
# from: inductor's entries name their files by it. Only this project's own calls write these
# parts; they hold what inductor itself writes to disk, pickled graphs included.
set -euo pipefail

# Parts of at most 15 MiB: what a call hands back is at most 16 MiB a file and 64 MiB in all,
# and what it carries (the tree, .whl's 13 MB of wheels, these parts) at most 64 MiB.
PART=15M
LIMIT_MB=${COMPILE_CACHE_MB:-40}

usage() { echo "usage: $0 pack|unpack FOLDER PARTS_FOLDER" >&2; exit 2; }
[ $# = 3 ] || usage
action=$1 folder=$2 parts=$3

bytes() { stat -c %s "$1"; }
mib() { awk -v size="$(bytes "$1")" 'BEGIN { printf "%.1f", size / 1048576 }'; }
over_limit() { [ "$(bytes "$1")" -gt $(( LIMIT_MB * 1048576 )) ]; }

case "$action" in
  unpack)
    mkdir -p "$folder"
    if ! ls "$parts"/compile-cache.tgz.* >/dev/null 2>&1; then
      echo "compiled code from an earlier call: none (every build is cold)"
      exit 0
    fi
    cat "$parts"/compile-cache.tgz.* | tar -xz -C "$folder"
    echo "compiled code from an earlier call: $(du -sm "$folder" | cut -f1) MiB in $folder (builds of the same graphs load it)"
    ;;
  pack)
    [ -d "$folder" ] || { echo "compiled code: $folder does not exist, nothing to keep"; exit 0; }
    mkdir -p "$parts"
    archive=$(mktemp /tmp/compile-cache.XXXXXX)
    staging=$(mktemp -d "$parts/.packing.XXXXXX")
    trap 'rm -rf "$archive" "$staging"' EXIT
    # Lock files belong to the processes that held them; precompiled C++ headers (hundreds of MB
    # on a machine that built CPU kernels) are the host compiler's own cache, made again at need.
    pack_leaving_out() {
      tar -cz -C "$folder" --exclude='*.lock' --exclude=./locks --exclude=./precompiled_headers "$@" . > "$archive"
    }
    pack_leaving_out
    if over_limit "$archive"; then
      # inductor bundles each graph's Triton kernels into the graph's own entry (torch 2.6+), and
      # writes them back into triton/ when it loads the graph: that folder is a second copy.
      echo "compiled code: $(mib "$archive") MiB packed, over $LIMIT_MB MiB; packing it without triton/ (a copy of the kernels in the graphs' entries)"
      pack_leaving_out --exclude=./triton
    fi
    if over_limit "$archive"; then
      # Parts packed earlier (this call's first pack, or what it unpacked) are a part of this
      # folder: better than nothing for the next call.
      kept=$(find "$parts" -maxdepth 1 -name 'compile-cache.tgz.*' | wc -l)
      echo "compiled code: $(mib "$archive") MiB packed, over the $LIMIT_MB MiB a call can carry: not kept" \
        "(the $kept part(s) already in $parts stay)"
      exit 0
    fi
    # The earlier parts are replaced only by a whole new set: a call cut off while packing still
    # hands back one that unpacks.
    split -b "$PART" -d "$archive" "$staging/compile-cache.tgz."
    rm -f "$parts"/compile-cache.tgz.*
    mv "$staging"/compile-cache.tgz.* "$parts"/
    echo "compiled code kept for the next call: $(mib "$archive") MiB in $(ls "$parts"/compile-cache.tgz.* | wc -l) part(s) in $parts"
    ;;
  *) usage ;;
esac
