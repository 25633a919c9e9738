"""LaMP generation tasks (LaMP-4 news headlines, LaMP-5 scholarly titles, LaMP-7 tweet paraphrases) -> PersonaRecords.

The benchmark ships per split a questions file (a JSON array of ``{id, input, profile}``) and an outputs file
(``{"task": ..., "golds": [{id, output}]}``). Both are read with ``datasets.load_dataset("json", ...)`` from
``<path>/<split>_questions.json`` or ``<path>/<split>/<split>_questions.json`` (the official download layout).
Questions carry no user field: each question is one user's (LaMP's user split), so the user id is the
question id unless the row has a ``user_id``. Record ids are ``<task>/<split>/<question id>``.

The test split ships questions only (LaMP scores it on its leaderboard): it loads with
``require_response=False`` as a prediction-only split, and ``write_submission`` writes generated outputs in
the benchmark's own format, ``{"task": "LaMP_N", "golds": [{"id", "output"}]}``.

The task specs register in perce_ds/data/tasks.py, whose ``rows_to_records`` turns the joined rows into records.
"""

from __future__ import annotations

import json
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

LAMP_TASKS = {
    "LaMP_4": register_task(
        TaskSpec(
            name="lamp/LaMP_4",
            user_fields=("user_id", "id"),
            item_fields=("title", "text"),
            format=ProfileFormat(
                '"{title}" is the headline of the article "{text}"', ("text",), connector("headlines")
            ),
            query_of=after_marker("article:"),
            item_text=join_fields("title", "text"),
        )
    ),
    "LaMP_5": register_task(
        TaskSpec(
            name="lamp/LaMP_5",
            user_fields=("user_id", "id"),
            item_fields=("title", "abstract"),
            format=ProfileFormat(
                '"{title}" is the title of the paper with abstract "{abstract}"', ("abstract",), connector("titles")
            ),
            query_of=after_marker("paper:"),
            item_text=join_fields("title", "abstract"),
        )
    ),
    "LaMP_7": register_task(
        TaskSpec(
            name="lamp/LaMP_7",
            user_fields=("user_id", "id"),
            item_fields=("text",),
            format=ProfileFormat('"{text}"', ("text",), connector("tweets")),
            query_of=after_marker(":"),
            item_text=join_fields("text"),
        )
    ),
}


def lamp_files(path: str | Path, split: str, require_outputs: bool = True) -> tuple[Path, Path | None]:
    """(questions, outputs) files of one split; outputs is None for a questions-only split when
    `require_outputs` is False. DataSourceError naming what exists when a needed file is missing."""
    root = Path(path)
    for base in (root / split, root):
        q, o = base / f"{split}_questions.json", base / f"{split}_outputs.json"
        if q.is_file() and o.is_file():
            return q, o
        if q.is_file() and not require_outputs:
            return q, None
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.json")) if root.is_dir() else []
    questions_only = any(f.endswith(f"{split}_questions.json") for f in found)
    hint = (
        ". The split has questions but no outputs: it is prediction-only (LaMP scores its test split on the "
        "leaderboard); training and scoring need references. Generate its submission with "
        "`launch/evaluate.py --run runs/NAME --split test --predict-only`"
        if questions_only
        else ""
    )
    raise DataSourceError(
        f"{root} [split {split}]: need {split}_questions.json and {split}_outputs.json (in {root} or {root / split}); "
        f"JSON files found: {found}{hint}"
    )


def load_lamp(
    path: str,
    task: str,
    split: str,
    on_bad_record: str = "error",
    max_records: int = 0,
    seed: int = 0,
    cache_dir: str | None = None,
    require_response: bool = True,
) -> tuple[list[PersonaRecord], LoadReport]:
    """PersonaRecords of one LaMP task split: questions joined with their gold outputs by id (with
    `require_response=False`, a questions-only split gives records with the response "")."""
    if task not in LAMP_TASKS:
        raise DataSourceError(f"LaMP task {task!r} is not supported; supported: {sorted(LAMP_TASKS)}")
    spec = LAMP_TASKS[task]
    questions_file, outputs_file = lamp_files(path, split, require_response)
    source = f"{path} [task {task}, split {split}]"
    questions = hf_load("json", source, cache_dir, data_files=str(questions_file), split="train")
    output_of: dict[str, str] = {}
    if outputs_file is not None:
        golds = hf_load("json", source, cache_dir, data_files=str(outputs_file), field="golds", split="train")
        output_of = {str(i): o for i, o in zip(golds["id"], golds["output"])}
    rows = _WithOutputs(questions, output_of)
    return rows_to_records(
        rows, spec, source, f"{task}/{split}", on_bad_record, max_records, seed, require_response, id_field="id"
    )


def submission_task(record_task: str) -> str | None:
    """The LaMP task name ("LaMP_4") of a PersonaRecord task ("lamp/LaMP_4"), or None for other benchmarks."""
    name = record_task.removeprefix("lamp/")
    return name if record_task.startswith("lamp/") and name in LAMP_TASKS else None


def write_submission(path: Path, task: str, outputs: list[tuple[str, str]]) -> None:
    """LaMP's submission file for one task: {"task": "LaMP_N", "golds": [{"id", "output"}]} in the given order."""
    golds = [{"id": qid, "output": text} for qid, text in outputs]
    path.write_text(json.dumps({"task": task, "golds": golds}, ensure_ascii=False, indent=1))


class _WithOutputs:
    """Question rows with their gold `output` joined in (None when the outputs file lacks the id)."""

    def __init__(self, questions: Any, output_of: dict[str, str]):
        self.questions, self.output_of = questions, output_of
        self.column_names = [*questions.column_names, "output"]

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = dict(self.questions[i])
        row["output"] = self.output_of.get(str(row.get("id")))
        return row

    def __iter__(self):
        return (self[i] for i in range(len(self)))
