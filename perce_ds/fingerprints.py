"""Content fingerprints: what a cached or stored result depends on, hashed one way.

Used by the tokenised-data cache (records + tokenizer + settings), the offline E-step (data, tokenizer,
model, settings) and evaluation (model identity, generation inputs). A fingerprint is a sha256 hex digest
of text parts joined unambiguously; callers shorten it where a short key reads better.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def digest(parts: Iterable[str]) -> str:
    """sha256 of the parts, each terminated by a NUL (so ["ab", "c"] and ["a", "bc"] differ)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def json_digest(value: Any) -> str:
    """digest of a JSON-able value (keys sorted; dates and other objects by their str)."""
    return digest([json.dumps(value, sort_keys=True, default=str)])


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What decides token ids and prompt text: vocabulary/merges/normaliser, special tokens, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    core = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extras = json.dumps(
        {
            "class": type(tokenizer).__name__,
            "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id,
            "template": tokenizer.chat_template or "",
        },
        sort_keys=True,
    )
    return digest([core, extras])


def records_fingerprint(records: Iterable[Any]) -> str:
    """The records' content, in order (anything with `to_dict()`, e.g. PersonaRecord)."""
    return digest(json.dumps(r.to_dict(), sort_keys=True, default=str) for r in records)


def path_fingerprint(path: str) -> str:
    """A local file's or folder's file names, sizes and mtimes (cheap; a changed weight file changes it), or
    the string itself when it is not a local path (a hub id)."""
    root = Path(path)
    if not path or not root.exists():
        return digest([path])
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return digest(f"{p.relative_to(root.parent)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def weight_files_fingerprint(folder: Path) -> str:
    """A model folder's weights by content, cheaply: each weight file's name, size and sha256 of its first and
    last MiB (a safetensors header lists every tensor's offsets; the edges change with any retraining)."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    parts = []
    for f in files:
        size = f.stat().st_size
        with f.open("rb") as fh:
            head = fh.read(1 << 20)
            fh.seek(max(0, size - (1 << 20)))
            tail = fh.read(1 << 20)
        parts.append(f"{f.name}:{size}:{hashlib.sha256(head + tail).hexdigest()}")
    return digest(parts)
