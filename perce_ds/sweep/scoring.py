"""Test scores, once, of the selected runs (hf_best of every seed) and of the starting model.

Per scored model, in `<commit_dir>/cells/<id>/test/` (or `<commit_dir>/step0/test/`):
  generation_scores.json, generation_per_record.jsonl -- `launch/evaluate.py --split test`'s code, in this
      process (greedy ROUGE-L / METEOR per record, as that command writes them)
  tokens.json -- teacher-forced per record and token class: [summed NLL, correct argmaxes, tokens]
      (perce_ds/evaluation/token_eval.py, the code `launch/compare.py --token-eval` runs), with the record's user
Then `<commit_dir>/test_scored.json` records which cells were scored under which selection: a re-run aggregates
these files and never selects again on test (a changed validation selection is refused, not re-scored).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from perce_ds.sweep.cells import Cell, SweepError, committed_dir, generation_scores, has_model, read_json, run_dir
from perce_ds.sweep.select import MethodSelection
from perce_ds.sweep.spec import SweepSpec

MARKER = "test_scored.json"
TEST_EVAL_NAME = "test_best"
STEP0_EVAL_NAME = "test_step0"
ALL = "all"  # every response token (the classes' union)


def selection_record(methods: list[MethodSelection]) -> dict[str, list[str]]:
    """What the test scores belong to: each method's selected cell ids."""
    return {m.key: [c.id for c in m.selected] for m in methods}


def test_scored(spec: SweepSpec, methods: list[MethodSelection], root: Path) -> bool:
    """True when the test split was scored for this selection; refuses a marker of another selection."""
    marker = root / spec.commit_dir / MARKER
    if not marker.is_file():
        return False
    recorded = read_json(marker)["selection"]
    if recorded != selection_record(methods):
        raise SweepError(
            f"{marker}: the test split was scored for another selection ({recorded}); the validation selection is "
            f"now {selection_record(methods)}. Test scores are never used to select: find what changed (cells, "
            f"recipe); delete {marker} only to score the new selection deliberately"
        )
    return True


def start_model(spec: SweepSpec, first: Cell, root: Path) -> Path:
    """The model training started from: the recipe's pretrained folder, else the first baseline run's hf_init."""
    from perce_ds.evaluation.runs import load_run_config

    cfg = load_run_config(run_dir(spec, first, root))
    path = Path(cfg.model.name_or_path) if cfg.model.name_or_path else run_dir(spec, first, root) / "hf_init"
    path = path if path.is_absolute() else root / path
    if not (path / "config.json").is_file():
        raise SweepError(f"no starting model at {path} to score at step 0: build it, or set train.save_init_model "
                         "true in the base recipe for a model built from a config")  # fmt: skip
    return path


def score_model(spec: SweepSpec, run: Path, model: Path, name: str, dest: Path, root: Path) -> None:
    """Generation scores (launch/evaluate.py's code) and teacher-forced token sums of `model` on test -> dest/."""
    out = generation_scores(run, model, "test", name, spec.max_new_tokens, [str(root / p) for p in spec.test_data])
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(out / "scores.json", dest / "generation_scores.json")
    shutil.copy2(out / "per_record.jsonl", dest / "generation_per_record.jsonl")
    (dest / "tokens.json").write_text(json.dumps(token_sums(spec, run, model, root)))


def token_sums(spec: SweepSpec, run: Path, model: Path, root: Path) -> dict[str, Any]:
    """{record_id: {"user": id, class: [nll_sum, hits, tokens]}} of `model` on the test split, teacher-forced."""
    import torch

    from perce_ds.data.pipeline import prompt_settings
    from perce_ds.data.tokenizer import load_tokenizer
    from perce_ds.evaluation import runs, token_eval
    from perce_ds.model import resolve_dtype

    cfg = runs.load_run_config(run)
    records = runs.split_records(cfg, "test", [str(root / p) for p in spec.test_data] or None)
    tokenizer = load_tokenizer(model)
    examples, _ = runs.tokenize_for_eval(records, tokenizer, prompt_settings(cfg))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm = runs.load_plain_model(model, resolve_dtype(cfg.model.dtype), device)
    rows = token_eval.score_tokens(lm, tokenizer, records, examples)
    users = {r.record_id: r.user_id for r in records}
    out: dict[str, Any] = {}
    classes = (*token_eval.PERSONA_CLASSES, token_eval.OTHER)
    sums = {cls: token_eval.per_record_sums(rows, cls) for cls in classes}
    for i, row in enumerate(rows):
        entry: dict[str, Any] = {"user": users[row.record_id]}
        for cls in classes:
            entry[cls] = [float(sums[cls][0][i]), float(sums[cls][1][i]), float(sums[cls][2][i])]
        entry[ALL] = [entry["persona"][j] + entry[token_eval.OTHER][j] for j in range(3)]
        out[row.record_id] = entry
    return out


def scored(spec: SweepSpec, dest: Path) -> bool:
    """Both parts of a model's test scores are on disk (a kill between them scores it again)."""
    return (dest / "generation_scores.json").is_file() and (dest / "tokens.json").is_file()


def score_test(spec: SweepSpec, methods: list[MethodSelection], root: Path) -> None:
    """Score every selected run's hf_best and the starting model on test (once), then write the marker."""
    if not all(m.complete for m in methods):
        raise SweepError("test scoring needs every method selected and confirmed (all cells done)")
    gone = [c.id for m in methods for c in m.selected if not has_model(spec, c, root)]
    if gone:
        raise SweepError(
            f"no hf_best of the committed run on this machine for the selected cells {gone} (under "
            f"{root / spec.output_dir}; the run's best.json must equal the committed one): trained on another "
            "machine, the run directories removed, or another run of the cell left them. Run the sweep with --retrain-missing to train them "
            "again (their first run's files are kept in first_run/), or copy their run directories here"
        )
    first = methods[0].selected[0]
    done = []
    for m in methods:
        for cell in m.selected:
            dest = committed_dir(spec, cell, root) / "test"
            if not scored(spec, dest):
                rd = run_dir(spec, cell, root)
                score_model(spec, rd, rd / "hf_best", TEST_EVAL_NAME, dest, root)
            done.append(cell.id)
    step0 = root / spec.commit_dir / "step0" / "test"
    model = start_model(spec, first, root)
    if not scored(spec, step0):
        score_model(spec, run_dir(spec, first, root), model, STEP0_EVAL_NAME, step0, root)
    marker = {"selection": selection_record(methods), "cells": done, "step0_model": str(model.relative_to(root))
              if model.is_relative_to(root) else str(model), "scored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    (root / spec.commit_dir / MARKER).write_text(json.dumps(marker, indent=2))
