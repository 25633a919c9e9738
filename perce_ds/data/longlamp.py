"""LongLaMP (Hugging Face "LongLaMP/LongLaMP") rows -> PersonaRecords, from the hub or from local copies.

Configs ``{abstract_generation,product_review,topic_writing}_{user,temporal}``, splits train/val/test; the
non-public email task is accepted as ``email_generation_*`` from a local folder of the same shape. A row is
``{<user id field>, input, output, profile: [items]}``; the per-task fields are in LONGLAMP_TASKS below.

Local copies: a folder laid out like the hub repository (a README.md whose YAML declares the configs, read by
``datasets.load_dataset`` exactly as on the hub), or ``<dir>/<config>/`` holding per-split Parquet/JSON files
(``<split>/*.parquet``, ``<split>-*.parquet``, ``<split>.parquet|json|jsonl``) or a ``save_to_disk`` DatasetDict.
With ``HF_DATASETS_OFFLINE=1`` nothing reaches the network.

The rows -> PersonaRecords conversion and the task registry these specs join are perce_ds/data/tasks.py's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from perce_ds.data.records import PersonaRecord
from perce_ds.data.sources import LoadReport
from perce_ds.data.tasks import (
    ProfileFormat,
    TaskSpec,
    after_marker,
    connector,
    hf_load,
    join_fields,
    register_task,
    rows_to_records,
)
from perce_ds.errors import DataSourceError

__all__ = ["DataSourceError"]  # re-exported: readers raise it from here


LONGLAMP_TASKS = {
    "abstract_generation": register_task(
        TaskSpec(
            name="longlamp/abstract_generation",
            user_fields=("name",),
            item_fields=("title", "abstract"),
            format=ProfileFormat(
                '"{abstract}" is the abstract for the title "{title}"', ("abstract",), connector("abstracts")
            ),
            query_of=after_marker("items:"),
            item_text=join_fields("title", "abstract"),
        )
    ),
    "product_review": register_task(
        TaskSpec(
            name="longlamp/product_review",
            user_fields=("reviewerId",),
            item_fields=("overall", "summary", "description", "reviewText"),
            format=ProfileFormat(
                '"{overall}" is the rating for the product with description "{description}"; '
                '"{summary}" is the summary of the review "{reviewText}"',
                ("reviewText", "description"),
                connector("reviews"),
            ),
            query_of=lambda text: text,
            item_text=join_fields("overall", "summary", "description", "reviewText"),
        )
    ),
    "topic_writing": register_task(
        TaskSpec(
            name="longlamp/topic_writing",
            user_fields=("author",),
            item_fields=("summary", "content"),
            item_variants=({"input": "summary", "output": "content"},),
            format=ProfileFormat(
                '"{summary}" is the summary of the post "{content}"', ("content",), connector("posts")
            ),
            query_of=lambda text: text,
            item_text=join_fields("summary", "content"),
        )
    ),
    "email_generation": register_task(
        TaskSpec(
            name="longlamp/email_generation",
            user_fields=("user_id", "name", "author", "sender"),
            item_fields=("title", "text"),
            format=ProfileFormat('"{title}" is the subject of the email "{text}"', ("text",), connector("emails")),
            query_of=after_marker(":"),
            item_text=join_fields("title", "text"),
        )
    ),
}


def task_for_config(config: str) -> TaskSpec:
    """The TaskSpec of a LongLaMP config name (``<task>_user`` / ``<task>_temporal``)."""
    for task, spec in LONGLAMP_TASKS.items():
        if config in (f"{task}_user", f"{task}_temporal", task):
            return spec
    known = [f"{t}_{s}" for t in LONGLAMP_TASKS for s in ("user", "temporal")]
    raise DataSourceError(f"LongLaMP config {config!r} is not known; known configs: {known}")


# ----------------------------------------------------------------------------------------- loading rows


def _json_rows(files: list[Path]) -> list[dict[str, Any]]:
    # Plain-JSON fallback for local files whose rows Arrow cannot put in one schema (a profile that is a
    # string in one row and a list in another): the rows still load, and validation names the bad row.
    rows: list[dict[str, Any]] = []
    for f in files:
        text = f.read_text(encoding="utf-8").strip()
        if text.startswith("["):
            rows.extend(json.loads(text))
        else:
            rows.extend(json.loads(line) for line in text.splitlines() if line.strip())
    return rows


def _declares_configs(root: Path) -> bool:
    readme = root / "README.md"
    return readme.is_file() and "configs:" in readme.read_text(encoding="utf-8", errors="replace")


def _split_files(cdir: Path, split: str) -> list[Path]:
    for pattern in (
        f"{split}/*.parquet",
        f"{split}-*.parquet",
        f"{split}.parquet",
        f"{split}/*.json*",
        f"{split}.json*",
    ):
        files = sorted(cdir.glob(pattern))
        if files:
            return files
    return []


def load_rows(dataset: str, config: str, split: str, cache_dir: str | None = None) -> Sequence[dict[str, Any]]:
    """The rows of one (dataset, config, split): a hub name or a local folder (see the module docstring).

    Raises DataSourceError naming the dataset, config and split, and what exists instead, when one is missing.
    """
    import datasets

    source = f"{dataset} [config {config}, split {split}]"
    root = Path(dataset)
    if not root.exists():
        if dataset.startswith((".", "/")) or dataset.count("/") != 1:
            raise DataSourceError(f"{source}: no such local folder, and not a hub dataset name (owner/name)")
        return hf_load(dataset, source, cache_dir, name=config, split=split)
    if _declares_configs(root):
        return hf_load(str(root), source, cache_dir, name=config, split=split)
    cdir = root / config
    if not cdir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise DataSourceError(f"{source}: config folder {cdir} does not exist; configs found: {found}")
    if (cdir / "dataset_dict.json").is_file():
        dd = datasets.load_from_disk(str(cdir))
        if split not in dd:
            raise DataSourceError(f"{source}: split {split!r} not in the saved dataset; splits found: {list(dd)}")
        return dd[split]
    files = _split_files(cdir, split)
    if not files:
        found = sorted({p.name.split("-")[0].split(".")[0] for p in cdir.iterdir() if not p.name.startswith(".")})
        raise DataSourceError(f"{source}: no Parquet/JSON files for split {split!r} in {cdir}; found: {found}")
    builder = "parquet" if files[0].suffix == ".parquet" else "json"
    try:
        return hf_load(builder, source, cache_dir, data_files=[str(f) for f in files], split="train")
    except DataSourceError:
        if builder == "json":
            return _json_rows(files)
        raise


def load_longlamp(
    dataset: str,
    config: str,
    split: str,
    on_bad_record: str = "error",
    max_records: int = 0,
    seed: int = 0,
    cache_dir: str | None = None,
    require_response: bool = True,
) -> tuple[list[PersonaRecord], LoadReport]:
    """PersonaRecords of one LongLaMP (dataset, config, split), with a LoadReport of what was read and skipped."""
    spec = task_for_config(config)
    rows = load_rows(dataset, config, split, cache_dir)
    source = f"{dataset} [config {config}, split {split}]"
    return rows_to_records(rows, spec, source, f"{config}/{split}", on_bad_record, max_records, seed, require_response)
