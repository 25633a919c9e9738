"""LongLaMP (Hugging Face "LongLaMP/LongLaMP") rows -> PersonaRecords, from the hub or from local copies.

Configs ``{abstract_generation,product_review,topic_writing}_{user,temporal}``, splits train/val/test; the
non-public email task is accepted as ``email_generation_*`` from a local folder of the same shape. A row is
``{<user id field>, input, output, profile: [items]}``; the per-task fields are in TASKS below.

Local copies: a folder laid out like the hub repository (a README.md whose YAML declares the configs, read by
``datasets.load_dataset`` exactly as on the hub), or ``<dir>/<config>/`` holding per-split Parquet/JSON files
(``<split>/*.parquet``, ``<split>-*.parquet``, ``<split>.parquet|json|jsonl``) or a ``save_to_disk`` DatasetDict.
With ``HF_DATASETS_OFFLINE=1`` nothing reaches the network.
"""

from __future__ import annotations

import json
import logging
import random
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perce_ds.data.prompts import PROFILE_FORMATS, ProfileFormat
from perce_ds.data.records import SKIP_HINT, PersonaRecord, RecordError, record_from_dict
from perce_ds.data.sources import LoadReport
from perce_ds.errors import DataSourceError

log = logging.getLogger("perce_ds")

__all__ = ["DataSourceError"]  # re-exported: readers raise it from here


@dataclass(frozen=True)
class TaskSpec:
    """What one task's rows look like and how its profile is retrieved and shown."""

    @property
    def prompt_fields(self) -> list[str]:
        """The item fields the profile prompt shows (those its item template names), in template order."""
        return [name for _, name, _, _ in string.Formatter().parse(self.format.item_template) if name]

    name: str  # PersonaRecord.task, e.g. "longlamp/abstract_generation"
    user_fields: tuple[str, ...]  # the row's user id field (the first one present)
    item_fields: tuple[str, ...]  # fields every profile item must carry
    format: ProfileFormat
    query_of: Callable[[str], str]  # retrieval query from the task input
    item_text: Callable[[dict[str, Any]], str]  # retrieval text of an item
    item_variants: tuple[dict[str, str], ...] = field(default=())  # known renames {found: expected}


TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Make a task known to prompt building (its ProfileFormat) and to retrieval."""
    TASKS[spec.name] = spec
    PROFILE_FORMATS[spec.name] = spec.format
    return spec


def after_marker(marker: str) -> Callable[[str], str]:
    """The text after the first `marker` (stripped), or the whole text when the marker is absent."""

    def query(text: str) -> str:
        at = text.find(marker)
        return text[at + len(marker) :].strip() if at >= 0 else text

    return query


def _join(*names: str) -> Callable[[dict[str, Any]], str]:
    return lambda item: " ".join(str(item.get(n) or "") for n in names).strip()


def _connector(things: str) -> str:
    return f"Use the above {things} as context to understand the style and language of the user, and then:\n"


LONGLAMP_TASKS = {
    "abstract_generation": register_task(
        TaskSpec(
            name="longlamp/abstract_generation",
            user_fields=("name",),
            item_fields=("title", "abstract"),
            format=ProfileFormat(
                '"{abstract}" is the abstract for the title "{title}"', ("abstract",), _connector("abstracts")
            ),
            query_of=after_marker("items:"),
            item_text=_join("title", "abstract"),
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
                _connector("reviews"),
            ),
            query_of=lambda text: text,
            item_text=_join("overall", "summary", "description", "reviewText"),
        )
    ),
    "topic_writing": register_task(
        TaskSpec(
            name="longlamp/topic_writing",
            user_fields=("author",),
            item_fields=("summary", "content"),
            item_variants=({"input": "summary", "output": "content"},),
            format=ProfileFormat(
                '"{summary}" is the summary of the post "{content}"', ("content",), _connector("posts")
            ),
            query_of=lambda text: text,
            item_text=_join("summary", "content"),
        )
    ),
    "email_generation": register_task(
        TaskSpec(
            name="longlamp/email_generation",
            user_fields=("user_id", "name", "author", "sender"),
            item_fields=("title", "text"),
            format=ProfileFormat('"{title}" is the subject of the email "{text}"', ("text",), _connector("emails")),
            query_of=after_marker(":"),
            item_text=_join("title", "text"),
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


def _hf_load(path: str, source: str, cache_dir: str | None, **kwargs: Any) -> Any:
    import datasets

    try:
        return datasets.load_dataset(path, cache_dir=cache_dir, **kwargs)
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DataSourceError(f"{source}: cannot load ({type(e).__name__}: {e})") from e


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
        return _hf_load(dataset, source, cache_dir, name=config, split=split)
    if _declares_configs(root):
        return _hf_load(str(root), source, cache_dir, name=config, split=split)
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
        return _hf_load(builder, source, cache_dir, data_files=[str(f) for f in files], split="train")
    except DataSourceError:
        if builder == "json":
            return _json_rows(files)
        raise


def subset_indices(n: int, max_records: int, seed: int) -> list[int]:
    """All of range(n), or a seeded sample of `max_records` of them in their original order."""
    if max_records <= 0 or max_records >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), max_records))


def _iter_selected(rows: Sequence[dict[str, Any]], indices: list[int]) -> Iterator[tuple[int, dict[str, Any]]]:
    if hasattr(rows, "select"):  # a datasets.Dataset: select, then stream
        for i, row in zip(indices, rows.select(indices)):
            yield i, row
    else:
        for i in indices:
            yield i, rows[i]


# ----------------------------------------------------------------------------------------- schema and rows


def item_field_mapping(spec: TaskSpec, found: set[str], source: str) -> dict[str, str]:
    """How to rename this copy's profile-item fields into the task's; raises DataSourceError when no layout fits."""
    if set(spec.item_fields) <= found:
        return {}
    for variant in spec.item_variants:
        if set(variant) <= found and set(spec.item_fields) <= (found - set(variant)) | set(variant.values()):
            return dict(variant)
    variants = [sorted(v) for v in spec.item_variants]
    raise DataSourceError(
        f"{source}: profile items have fields {sorted(found)}; expected {list(spec.item_fields)}"
        + (f" or a known variant {variants}" if variants else "")
    )


def _first_item_fields(rows: Sequence[dict[str, Any]]) -> set[str] | None:
    """The fields of the first profile item of the first row that has one (None when no row has an item).

    Read from the rows themselves, not from `datasets` feature types: those changed shape across versions
    (3.x describes a list of structs as a plain list, 5.x as `List`), and a check keyed on one shape would be
    skipped without a word on the other. Arrow rows carry every field of the struct (None where an item
    lacks it), so the first item shows all the fields the split has."""
    for row in rows:
        profile = row.get("profile")
        if isinstance(profile, list) and profile and isinstance(profile[0], dict):
            return set(profile[0])
    return None


def row_to_record(
    row: dict[str, Any],
    index: int,
    spec: TaskSpec,
    mapping: dict[str, str],
    source: str,
    record_id: str,
    require_response: bool = True,
) -> PersonaRecord:
    """One row as a PersonaRecord; RecordError names source (dataset, config, split), row and field.
    `require_response=False`: a row without `output` (a prediction-only split) gets the response ""."""
    where = f"row {index}"
    user_field = next((f for f in spec.user_fields if row.get(f) not in (None, "")), None)
    if user_field is None:
        raise RecordError(source, where, spec.user_fields[0], "missing", SKIP_HINT)
    for name in ("input", "output"):
        if name == "output" and not require_response and row.get(name) is None:
            continue
        if row.get(name) is None:
            raise RecordError(source, where, name, "missing", SKIP_HINT)
        if not isinstance(row[name], str):
            raise RecordError(source, where, name, f"expected a string, got {type(row[name]).__name__}", SKIP_HINT)
    profile = row.get("profile")
    if profile is None:
        raise RecordError(source, where, "profile", "missing (use [] for a user with no profile)", SKIP_HINT)
    if not isinstance(profile, list):
        raise RecordError(
            source, where, "profile", f"expected a list of items, got {type(profile).__name__}", SKIP_HINT
        )
    items = []
    for j, item in enumerate(profile):
        if not isinstance(item, dict):
            raise RecordError(
                source, where, f"profile[{j}]", f"expected an object, got {type(item).__name__}", SKIP_HINT
            )
        items.append({mapping.get(k, k): v for k, v in item.items() if v is not None})
    raw = {
        "user_id": str(row[user_field]),
        "task": spec.name,
        "query": row["input"],
        "response": row.get("output"),
        "profile": items,
        "record_id": record_id,
    }
    try:
        return record_from_dict(raw, source, where, require_response)
    except RecordError as e:  # name the dataset's own field, not the PersonaRecord one
        names = {"query": "input", "response": "output", "user_id": user_field}
        raise RecordError(source, where, names.get(e.field_name, e.field_name), e.problem, SKIP_HINT) from None


def rows_to_records(
    rows: Sequence[dict[str, Any]],
    spec: TaskSpec,
    source: str,
    id_prefix: str,
    on_bad_record: str = "error",
    max_records: int = 0,
    seed: int = 0,
    require_response: bool = True,
    id_field: str = "",
) -> tuple[list[PersonaRecord], LoadReport]:
    """Schema-check once, then convert the (optionally sub-sampled) rows; bad rows raise or are counted.

    Record ids are `<id_prefix>/<row index>`, or `<id_prefix>/<row[id_field]>` when the dataset has its own ids
    (LaMP: its submission format is keyed by them). `require_response=False` reads a split without outputs.
    """
    columns = set(getattr(rows, "column_names", None) or (rows[0].keys() if len(rows) else ()))
    if len(rows) and not any(f in columns for f in spec.user_fields):
        raise DataSourceError(
            f"{source}: rows have fields {sorted(columns)}; expected a user id field {list(spec.user_fields)}"
        )
    for name in ("input", "output", "profile"):
        if len(rows) and name not in columns and (require_response or name != "output"):
            hint = (
                " (a prediction-only split without references: it can be generated for with "
                "`launch/evaluate.py --predict-only`, not trained on or scored)"
                if name == "output"
                else ""
            )
            raise DataSourceError(f"{source}: rows have fields {sorted(columns)}; the field {name!r} is missing{hint}")
    found = _first_item_fields(rows)
    mapping = item_field_mapping(spec, found, source) if found is not None else {}
    report = LoadReport(source=source, prompt_fields=spec.prompt_fields)
    report.items_missing_field = dict.fromkeys(spec.prompt_fields, 0)
    seen: set[str] = set()
    records = []
    for i, row in _iter_selected(rows, subset_indices(len(rows), max_records, seed)):
        report.read += 1
        try:
            own_id = row.get(id_field) if id_field else None
            record_id = f"{id_prefix}/{own_id if own_id not in (None, '') else i}"
            records.append(row_to_record(row, i, spec, mapping, source, record_id, require_response))
        except RecordError as e:
            if on_bad_record == "error":
                raise
            report.skipped.append(str(e))
        else:
            report.kept += 1
            for item in records[-1].profile:
                report.profile_items += 1
                seen.update(item)
                for name in spec.prompt_fields:
                    report.items_missing_field[name] += item.get(name) in (None, "")
    report.unused_item_fields = sorted(seen - set(spec.prompt_fields))
    missing = {k: v for k, v in report.items_missing_field.items() if v}
    if missing:
        log.warning(
            "%s: of %d profile items, some lack fields the prompt shows (rendered empty): %s",
            source, report.profile_items, missing,
        )  # fmt: skip
    return records, report


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
