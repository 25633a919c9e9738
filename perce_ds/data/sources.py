"""Readers that turn data files into validated PersonaRecords.

Supported formats, chosen by path: JSON Lines (``*.jsonl`` / ``*.json``), Parquet (``*.parquet``) and a
directory written by ``datasets.Dataset.save_to_disk`` (or a one-split ``DatasetDict``). Every record goes
through ``record_from_dict``; a bad record either stops the load (``on_bad_record="error"``) or is counted
and dropped (``on_bad_record="skip"``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perce_ds.data.records import SKIP_HINT, PersonaRecord, RecordError, record_from_dict
from perce_ds.errors import DataSourceError, InputFileError

SUPPORTED = "*.jsonl / *.json (JSON Lines), *.parquet, or a directory saved with datasets' save_to_disk"
ON_BAD_RECORD = ("error", "skip")


@dataclass
class LoadReport:
    """What happened while loading one source."""

    source: str
    read: int = 0
    kept: int = 0
    skipped: list[str] = field(default_factory=list)
    # task sources (LongLaMP, LaMP): the item fields the profile prompt shows, and of the kept records' items
    # how many lack each one (rendered empty) and which other fields they carry (not shown)
    prompt_fields: list[str] = field(default_factory=list)
    profile_items: int = 0
    items_missing_field: dict[str, int] = field(default_factory=dict)
    unused_item_fields: list[str] = field(default_factory=list)

    def item_fields_summary(self) -> dict[str, Any]:
        """What the data report says about profile-item fields (empty for plain record files)."""
        if not self.prompt_fields:
            return {}
        return {
            "prompt_fields": self.prompt_fields,
            "profile_items": self.profile_items,
            "items_missing_field": self.items_missing_field,
            "unused_item_fields": self.unused_item_fields,
        }

    @property
    def n_skipped(self) -> int:
        """Number of records dropped because they failed validation."""
        return len(self.skipped)


def _iter_jsonl(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    """Yield (where, raw) per non-blank line; a line that is not JSON yields a RecordError as raw."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"line {n}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, RecordError(source, where, "<json>", f"not valid JSON: {e}", SKIP_HINT)


def _clean_arrow_row(row: dict[str, Any]) -> dict[str, Any]:
    """Drop the None values Arrow struct columns fill in for keys a profile item did not have."""
    profile = row.get("profile")
    if isinstance(profile, list):
        row["profile"] = [
            {k: v for k, v in item.items() if v is not None} if isinstance(item, dict) else item for item in profile
        ]
    return row


def _iter_rows(rows: list[dict[str, Any]]) -> Iterator[tuple[str, Any]]:
    for n, row in enumerate(rows):
        yield f"row {n}", _clean_arrow_row(row)


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _dataset_rows(path: Path, source: str) -> list[dict[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataSourceError(
            f"{source}: directory is not a saved dataset ({e}); supported formats: {SUPPORTED}"
        ) from e
    if isinstance(ds, DatasetDict):
        splits = list(ds.keys())
        if len(splits) != 1:
            raise DataSourceError(
                f"{source}: is a DatasetDict with splits {splits}; point data at one split directory, "
                f"e.g. {path / (splits[0] if splits else '<split>')}"
            )
        ds = ds[splits[0]]
    return ds.to_list()


def _raw_records(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    if not path.exists():
        raise InputFileError(f"{source}: no such file or directory")
    if path.is_dir():
        return _iter_rows(_dataset_rows(path, source))
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _iter_jsonl(path, source)
    if suffix == ".parquet":
        return _iter_rows(_parquet_rows(path))
    raise DataSourceError(f"{source}: unsupported format '{suffix or path.name}'; supported formats: {SUPPORTED}")


def load_records(
    path: str | Path, on_bad_record: str = "error", require_response: bool = True
) -> tuple[list[PersonaRecord], LoadReport]:
    """Load and validate every record in one file or dataset directory.

    With ``on_bad_record="error"`` the first bad record raises its RecordError (naming file, line/row and
    field); with ``"skip"`` bad records are dropped and their messages kept in the report.
    ``require_response=False`` reads a prediction-only split (records without responses). Duplicate
    ``record_id`` values within the file count as bad records. Raises ValueError if no record is usable.
    """
    if on_bad_record not in ON_BAD_RECORD:
        raise DataSourceError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}")
    source = str(path)
    report = LoadReport(source=source)
    records: list[PersonaRecord] = []
    seen: dict[str, str] = {}
    for where, raw in _raw_records(Path(path), source):
        report.read += 1
        try:
            if isinstance(raw, RecordError):
                raise raw
            record = record_from_dict(raw, source, where, require_response)
            if record.record_id in seen:
                raise RecordError(
                    source,
                    where,
                    "record_id",
                    f"duplicate '{record.record_id}', first seen at {seen[record.record_id]}",
                )
        except RecordError as e:
            if on_bad_record == "error":
                raise
            report.skipped.append(str(e))
            continue
        seen[record.record_id] = where
        records.append(record)
        report.kept += 1
    if not records:
        raise DataSourceError(f"{source}: no usable records ({report.read} read, {report.n_skipped} skipped)")
    return records, report


def load_many(
    paths: list[str], on_bad_record: str = "error", require_response: bool = True
) -> tuple[list[PersonaRecord], list[LoadReport]]:
    """Load several sources in order; return all records concatenated and one LoadReport per source."""
    records: list[PersonaRecord] = []
    reports: list[LoadReport] = []
    for path in paths:
        recs, report = load_records(path, on_bad_record, require_response)
        records.extend(recs)
        reports.append(report)
    return records, reports
