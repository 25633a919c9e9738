"""A tokenised-split cache: retrieval + prompts + token ids computed once, then memory-mapped by every run.

The work runs as a ``datasets`` ``map`` whose Arrow output file is named by an explicit fingerprint of
everything the result depends on: the records, the tokenizer (vocabulary, merges, special tokens, chat
template), the prompt and retrieval settings, the encoder files for dense retrieval, and CACHE_VERSION.
An explicit fingerprint, not datasets' hash of the map function: that hash pickles closures over
tokenizers and models, is slow, and changes with unrelated code, which would either rebuild every run or
(worse) reuse a stale cache. Rank 0 builds while the others wait at a barrier; everyone then opens the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from perce_ds.data.records import PersonaRecord
from perce_ds.fingerprints import digest, records_fingerprint, tokenizer_fingerprint

# Bump when prompt building or tokenisation changes what the same inputs produce.
CACHE_VERSION = "2"  # 2: persona_token_kinds


def split_fingerprint(records: list[PersonaRecord], tokenizer: Any, settings: dict[str, Any]) -> str:
    """The cache key of one split: records + tokenizer + settings (JSON-able) + CACHE_VERSION."""
    return digest(
        [
            CACHE_VERSION,
            records_fingerprint(records),
            tokenizer_fingerprint(tokenizer),
            json.dumps(settings, sort_keys=True),
        ]
    )[:32]


def cache_path(cache_dir: str | Path, name: str, fingerprint: str) -> Path:
    return Path(cache_dir) / f"{name}-{fingerprint}.arrow"


def build_or_load(
    records: list[PersonaRecord],
    process: Callable[[list[PersonaRecord]], dict[str, list[Any]]],
    path: Path,
    is_rank0: bool,
    barrier: Callable[[], None],
    batch_size: int = 64,
    desc: str = "tokenising",
) -> tuple[list[dict[str, Any]], bool]:
    """Rows of the cached split at `path`, built first by rank 0 when missing (`process` maps a batch of records
    to output columns). Returns (rows, built_here). Every rank calls `barrier` exactly once."""
    built = False
    if not records:  # an unset split (e.g. eval_split ""): nothing to build; datasets writes no file for it
        barrier()
        return [], False
    if is_rank0 and not path.is_file():
        import datasets

        path.parent.mkdir(parents=True, exist_ok=True)
        source = datasets.Dataset.from_dict({"record": [json.dumps(r.to_dict()) for r in records]})
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")

        def run(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            return process([PersonaRecord(**json.loads(s)) for s in batch["record"]])

        source.map(
            run,
            batched=True,
            batch_size=batch_size,
            remove_columns=["record"],
            new_fingerprint=path.stem.rsplit("-", 1)[-1],
            cache_file_name=str(tmp),
            load_from_cache_file=False,
            desc=desc,
        )
        os.replace(tmp, path)  # atomic: a killed build never leaves a half-written cache under the real name
        built = True
    barrier()
    import datasets

    return datasets.Dataset.from_file(str(path)).to_list(), built
