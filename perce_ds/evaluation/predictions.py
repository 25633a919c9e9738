"""Generations of a prediction-only split (no references) in the benchmarks' submission formats.

LaMP scores its test split on a leaderboard from one file per task, ``{"task": "LaMP_N", "golds": [{"id",
"output"}]}`` keyed by the question ids; those go to ``predictions_LaMP_N.json``. Records of any other task go
to ``predictions.jsonl`` (one ``{"record_id", "task", "output"}`` per line). A record without a generation is
written with an empty output and counted, never dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from perce_ds.data.lamp import submission_task, write_submission
from perce_ds.data.records import PersonaRecord


def write_predictions(out_dir: Path, records: list[PersonaRecord], generations: dict[str, str]) -> dict[str, Any]:
    """Write the submission files for `records` (in their order); returns {"files": [...], "missing": n}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lamp: dict[str, list[tuple[str, str]]] = {}
    other: list[dict[str, str]] = []
    missing = 0
    for r in records:
        text = generations.get(r.record_id)
        missing += text is None
        task = submission_task(r.task)
        if task is not None:
            question_id = r.record_id.split("/", 2)[2]  # lamp record ids are <task>/<split>/<question id>
            lamp.setdefault(task, []).append((question_id, text or ""))
        else:
            other.append({"record_id": r.record_id, "task": r.task, "output": text or ""})
    files = []
    for task, outputs in sorted(lamp.items()):
        path = out_dir / f"predictions_{task}.json"
        write_submission(path, task, outputs)
        files.append(path)
    if other:
        path = out_dir / "predictions.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in other), encoding="utf-8")
        files.append(path)
    return {"files": [str(f) for f in files], "records": len(records), "missing": missing}
