#!/usr/bin/env bash
# Install WordNet 3.0 for NLTK's METEOR, offline from then on (idempotent).
#   NLTK_DATA   where NLTK looks for data (default: <repo>/.venv/nltk_data)
# No PyPI package ships WordNet, so this takes Debian's wordnet-base + wordnet-sense-index and
# copies (never symlinks: NLTK's reader and some CI caches do not follow them) the database files
# into $NLTK_DATA/corpora/wordnet/, plus the 45-line lexnames file kept in the repo.
# Needs root (or sudo) and apt-get; without them it says so and exits 0, and METEOR tests then
# fail with a message pointing back here.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
NLTK_DATA=${NLTK_DATA:-$REPO/.venv/nltk_data}
DEST="$NLTK_DATA/corpora/wordnet"
SRC=/usr/share/wordnet
LEXNAMES="$REPO/perce_ds/evaluation/wordnet_lexnames.txt"

if [ -f "$DEST/index.sense" ] && [ -f "$DEST/data.noun" ] && [ -f "$DEST/lexnames" ]; then
    echo "WordNet already installed in $DEST"
    exit 0
fi

if [ ! -f "$SRC/data.noun" ] || [ ! -f "$SRC/index.sense" ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup_wordnet.sh: apt-get is not available; skipping WordNet (METEOR will not work)." >&2
        echo "  Copy WordNet 3.0 (data.*, index.*, *.exc, cntlist.rev, index.sense, lexnames) into $DEST by hand." >&2
        exit 0
    fi
    SUDO=""
    if [ "$(id -u)" != "0" ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            SUDO="sudo -n"
        else
            echo "setup_wordnet.sh: not root and no passwordless sudo; skipping WordNet (METEOR will not work)." >&2
            echo "  Run as root: apt-get install wordnet-base wordnet-sense-index, then this script again." >&2
            exit 0
        fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends wordnet-base wordnet-sense-index >/dev/null
fi

mkdir -p "$DEST"
shopt -s nullglob
for f in "$SRC"/data.* "$SRC"/index.* "$SRC"/*.exc "$SRC"/cntlist.rev "$SRC"/index.sense; do
    cp -f --dereference "$f" "$DEST/"
done
cp -f "$LEXNAMES" "$DEST/lexnames"
echo "WordNet 3.0 installed for NLTK in $DEST"
