"""LaMP generation tasks (LaMP-4 news headlines, LaMP-5 scholarly titles, LaMP-7 tweet paraphrases) -> PersonaRecords.

The benchmark ships per split a questions file (a JSON array of ``{id, input, profile}``) and an outputs file
(``{"task": ..., "golds": [{id, output}]}``). Both are read with ``datasets.load_dataset("json", ...)`` from
``<path>/<split>_questions.json`` or ``<path>/<split>/<split>_questions.json`` (the official download layout).
Questions carry no user field: each question is one user's (LaMP's user split), so the user id is the
question id unless the row has a ``user_id``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from perce_ds.data.longlamp import DataSourceError, TaskSpec, _connector, _hf_load, _join, after_marker, register_task
from perce_ds.data.longlamp import rows_to_records as _rows_to_records
from perce_ds.data.prompts import ProfileFormat
from perce_ds.data.records import PersonaRecord
from perce_ds.data.sources import LoadReport

LAMP_TASKS = {
    "LaMP_4": register_task(
        TaskSpec(
            name="lamp/LaMP_4",
            user_fields=("user_id", "id"),
            item_fields=("title", "text"),
            format=ProfileFormat(
                '"{title}" is the headline of the article "{text}"', ("text",), _connector("headlines")
            ),
            query_of=after_marker("article:"),
            item_text=_join("title", "text"),
        )
    ),
    "LaMP_5": register_task(
        TaskSpec(
            name="lamp/LaMP_5",
            user_fields=("user_id", "id"),
            item_fields=("title", "abstract"),
            format=ProfileFormat(
                '"{title}" is the title of the paper with abstract "{abstract}"', ("abstract",), _connector("titles")
            ),
            query_of=after_marker("paper:"),
            item_text=_join("title", "abstract"),
        )
    ),
    "LaMP_7": register_task(
        TaskSpec(
            name="lamp/LaMP_7",
            user_fields=("user_id", "id"),
            item_fields=("text",),
            format=ProfileFormat('"{text}"', ("text",), _connector("tweets")),
            query_of=after_marker(":"),
            item_text=_join("text"),
        )
    ),
}


def lamp_files(path: str | Path, split: str) -> tuple[Path, Path]:
    """(questions, outputs) files of one split; DataSourceError naming what exists when they are missing."""
    root = Path(path)
    for base in (root / split, root):
        q, o = base / f"{split}_questions.json", base / f"{split}_outputs.json"
        if q.is_file() and o.is_file():
            return q, o
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.json")) if root.is_dir() else []
    raise DataSourceError(
        f"{root} [split {split}]: need {split}_questions.json and {split}_outputs.json (in {root} or {root / split}); "
        f"JSON files found: {found}"
    )


def load_lamp(
    path: str,
    task: str,
    split: str,
    on_bad_record: str = "error",
    max_records: int = 0,
    seed: int = 0,
    cache_dir: str | None = None,
) -> tuple[list[PersonaRecord], LoadReport]:
    """PersonaRecords of one LaMP task split: questions joined with their gold outputs by id."""
    if task not in LAMP_TASKS:
        raise DataSourceError(f"LaMP task {task!r} is not supported; supported: {sorted(LAMP_TASKS)}")
    spec = LAMP_TASKS[task]
    questions_file, outputs_file = lamp_files(path, split)
    source = f"{path} [task {task}, split {split}]"
    questions = _hf_load("json", source, cache_dir, data_files=str(questions_file), split="train")
    golds = _hf_load("json", source, cache_dir, data_files=str(outputs_file), field="golds", split="train")
    output_of = {str(i): o for i, o in zip(golds["id"], golds["output"])}
    rows = _WithOutputs(questions, output_of)
    return _rows_to_records(rows, spec, source, f"{task}/{split}", on_bad_record, max_records, seed)


class _WithOutputs:
    """Question rows with their gold `output` joined in (None when the outputs file lacks the id)."""

    def __init__(self, questions: Any, output_of: dict[str, str]):
        self.questions, self.output_of = questions, output_of
        self.features = questions.features
        self.column_names = [*questions.column_names, "output"]

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = dict(self.questions[i])
        row["output"] = self.output_of.get(str(row.get("id")))
        return row

    def __iter__(self):
        return (self[i] for i in range(len(self)))
