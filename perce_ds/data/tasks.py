"""The task framework shared by the benchmark adapters (LongLaMP, LaMP): the one task registry and rows -> records.

A TaskSpec says what one task's rows look like, how its profile is retrieved (query and item text) and how
the prompt shows it (its ProfileFormat). The adapters (perce_ds/data/longlamp.py, perce_ds/data/lamp.py) build
their specs and `register_task` them into TASKS; prompt building and retrieval look a task up here by the
PersonaRecord's task name. ``rows_to_records`` turns any adapter's rows into PersonaRecords with a LoadReport.
"""

from __future__ import annotations

import logging
import random
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from perce_ds.data.records import SKIP_HINT, PersonaRecord, RecordError, record_from_dict
from perce_ds.data.sources import LoadReport
from perce_ds.errors import DataSourceError

log = logging.getLogger("perce_ds")


@dataclass(frozen=True)
class ProfileFormat:
    """How a task shows its profile items, in the spirit of LongLaMP's prompts.

    `item_template` is str.format over the item's fields (a missing field renders empty); `trim_fields`
    are the fields whose tail may be cut to fit the budget, most important first (it keeps its tokens
    longest). The block is `header + one line per item + connector`, and is a prefix of the user turn.
    """

    item_template: str
    trim_fields: tuple[str, ...]
    connector: str
    header: str = ""

    def render_item(self, item: dict[str, Any]) -> str:
        return "- " + self.item_template.format_map(_Fields(item)) + "\n"

    def block(self, items: list[dict[str, Any]]) -> str:
        return self.header + "".join(self.render_item(it) for it in items) + self.connector if items else ""


class _Fields(dict):
    def __missing__(self, key: str) -> str:
        return ""


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


# Task name -> spec. Filled by the adapters when imported; perce_ds/data/__init__.py imports them, so the
# registry is complete as soon as any perce_ds.data module is.
TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Make a task known to prompt building (its ProfileFormat) and to retrieval."""
    TASKS[spec.name] = spec
    return spec


def profile_format(task: str) -> ProfileFormat | None:
    """The registered format of a task (LongLaMP, LaMP), or None for the generic layout."""
    spec = TASKS.get(task)
    return spec.format if spec is not None else None


def after_marker(marker: str) -> Callable[[str], str]:
    """The text after the first `marker` (stripped), or the whole text when the marker is absent."""

    def query(text: str) -> str:
        at = text.find(marker)
        return text[at + len(marker) :].strip() if at >= 0 else text

    return query


def join_fields(*names: str) -> Callable[[dict[str, Any]], str]:
    """An item's retrieval text: the named fields joined by spaces (a missing one as empty)."""
    return lambda item: " ".join(str(item.get(n) or "") for n in names).strip()


def connector(things: str) -> str:
    """LongLaMP's sentence between the profile block and the task input, naming what the items are."""
    return f"Use the above {things} as context to understand the style and language of the user, and then:\n"


def hf_load(path: str, source: str, cache_dir: str | None, **kwargs: Any) -> Any:
    """datasets.load_dataset, its load errors raised as DataSourceError naming `source`."""
    import datasets  # heavy: only the adapters' loaders need it, not prompt building

    try:
        return datasets.load_dataset(path, cache_dir=cache_dir, **kwargs)
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DataSourceError(f"{source}: cannot load ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------- rows -> records


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
