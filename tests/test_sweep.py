"""Validated sweeps (launch/sweep.py, perce_ds/sweep/): recipe parsing, cell state, selection, the user-level
bootstrap, train.keep_best, the dry runs, and (slow) the SLURM array path, a killed sweep resumed, and the table
rebuilt from the committed files alone."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from perce_ds.best import KeepBest, adapter_dir
from perce_ds.checkpoint import consolidated_lm_weights
from perce_ds.distributed import device_label
from perce_ds.errors import UserError
from perce_ds.sweep import bootstrap, targets
from perce_ds.sweep.cells import DONE, SweepError, cell_id, cells_of_grid, committed_dir, config_hash, is_done
from perce_ds.sweep.select import MethodSelection, select_all, stage_lists
from perce_ds.sweep.spec import SweepSpecError, load_spec
from tests.launch_utils import ROOT, check, launch_env, load_safetensors, run_job

SWEEP = ROOT / "launch" / "sweep.py"
STUB = ROOT / "tests" / "slurm_stub"


def write_spec(tmp: Path, **changes) -> Path:
    """The tiny test sweep with its outputs under tmp (and any top-level key changed)."""
    raw = yaml.safe_load((ROOT / "recipes" / "tiny_sweep.yaml").read_text())
    raw.update(output_dir=str(tmp / "runs"), commit_dir=str(tmp / "committed"), **changes)
    path = tmp / "tiny_sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ------------------------------------------------------------------ recipe, cells, selection (fast)
def test_spec_expands_the_grid_in_order_and_names_bad_keys(tmp_path):
    spec = load_spec(write_spec(tmp_path, grid={"loss.scheme": ["ce", "perce"], "train.lr": ["1e-3", 3e-3]}), ROOT)
    cells = cells_of_grid(spec)
    assert [(c.as_dict["loss.scheme"], c.lr) for c in cells] == [
        ("ce", 1e-3),
        ("ce", 3e-3),
        ("perce", 1e-3),
        ("perce", 3e-3),
    ]
    assert all(isinstance(c.lr, float) for c in cells)  # "1e-3" (a YAML 1.1 string) is the number
    assert spec.grid_methods() == [{"loss.scheme": "ce"}, {"loss.scheme": "perce"}]
    assert len({c.id for c in cells}) == 4 and cells[0].id == cells_of_grid(spec)[0].id
    for bad, needle in (({"grid": {"train.seed": [1]}}, "seeds"), ({"colour": 1}, "unknown key 'colour'"),
                        ({"stages": [{"name": "x", "lr_from": {"loss.scheme": "sgd"}, "variants": [{"loss.clip_max": 2}]}]}, "not a method"),
                        ({"select": {"metric": "bleu"}}, "select.metric"),
                        ({"overrides": {"train.run_name": "mine"}}, "train.run_name is set by the sweep"),
                        ({"grid": {"train.keep_best": ["eval_acc"]}}, "train.keep_best is set by the sweep")):  # fmt: skip
        with pytest.raises(SweepSpecError, match=needle):
            load_spec(write_spec(tmp_path, **bad), ROOT)


def fake_finished(spec, cell, value: float, step: int = 2) -> None:
    """A committed cell as run_cell leaves it (done marker with the cell's hash, best.json)."""
    d = committed_dir(spec, cell, ROOT)
    d.mkdir(parents=True, exist_ok=True)
    (d / "best.json").write_text(json.dumps({"step": step, "metric": "eval_ce", "mode": "min", "value": value}))
    (d / DONE).write_text(json.dumps({"config_hash": config_hash(spec, cell, ROOT)}))


def test_selection_takes_the_lr_with_the_best_mean_over_seeds_and_stages_follow_it(tmp_path):
    spec = load_spec(write_spec(tmp_path, seeds=[1, 2]), ROOT)
    # ce: lr 1e-3 has the single best run (seed 1: 1.0) but the worse mean (1.0, 5.0 -> 3.0 vs 2.0, 2.2 -> 2.1)
    values = {
        ("ce", 1e-3): (1.0, 5.0),
        ("ce", 3e-3): (2.0, 2.2),
        ("perce", 1e-3): (1.5, 1.5),
        ("perce", 3e-3): (1.5, 1.5),
    }
    grid = cells_of_grid(spec)
    for c in grid[:-1]:  # the last cell not done yet: perce is not selected, its stage has no cells
        fake_finished(spec, c, values[(c.as_dict["loss.scheme"], c.lr)][c.seed - 1])
    methods, stages = select_all(spec, ROOT)
    assert methods[0].selected_lr == 3e-3 and [c.seed for c in methods[0].selected] == [1, 2]
    assert methods[0].by_lr[1e-3]["mean"] == pytest.approx(3.0)
    assert methods[1].selected_lr is None and stages[1] == []
    fake_finished(spec, grid[-1], 1.5)
    methods, stages = select_all(spec, ROOT)
    assert methods[1].selected_lr == 1e-3  # a tie goes to the smaller lr
    assert [c.lr for c in stages[1]] == [1e-3, 1e-3] and stages[1][0].as_dict["loss.clip_max"] == 2.0
    assert methods[2].label == "scheme=perce, clip_max=2.0" and methods[2].selected_lr is None  # not trained yet


def test_confirm_seeds_are_checked_and_named(tmp_path):
    for bad, needle in (({"confirm_seeds": [1]}, r"confirm_seeds \[1\] are also in seeds"),
                        ({"confirm_seeds": ["2"]}, "confirm_seeds: must be a list of distinct integers"),
                        ({"confirm_seeds": [True]}, "confirm_seeds: must be a list of distinct integers"),
                        ({"confirm_seeds": 2}, "confirm_seeds: must be a list of distinct integers"),
                        ({"confirm_seeds": [2, 2]}, "confirm_seeds: must be a list of distinct integers"),
                        ({"confirm_seeds": [2], "grid": {"loss.scheme": ["ce", "perce"]}, "stages": []},
                         "put train.lr in the grid"),
                        ({"stages": [{"name": "confirm", "lr_from": {"loss.scheme": "perce"},
                                      "variants": [{"loss.clip_max": 2}]}]}, "'confirm' is the sweep's own stage")):  # fmt: skip
        with pytest.raises(SweepSpecError, match=needle) as info:
            load_spec(write_spec(tmp_path, **bad), ROOT)
        assert str(tmp_path / "tiny_sweep.yaml") in str(info.value)  # the message names the file
    spec = load_spec(write_spec(tmp_path, seeds=[1], confirm_seeds=[3, 2]), ROOT)
    assert spec.all_seeds == [1, 3, 2] and spec.stage_names() == ["grid", "confirm", "perce_clip"]
    assert load_spec(write_spec(tmp_path), ROOT).stage_names() == ["grid", "perce_clip"]


def expected_cell_ids(raw: dict) -> list[list[str]]:
    """A sweep's cell ids per stage as the recipe format defines them, computed here from the raw YAML: the grid's
    combinations (keys in order) x seeds, then each stage's lr_from + variant at the first grid lr x seeds."""
    grid = {k: [float(v) for v in vs] if k == "train.lr" else vs for k, vs in raw["grid"].items()}
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    out = [[cell_id({**o, "train.seed": s}) for o in combos for s in raw["seeds"]]]
    for st in raw.get("stages") or []:
        lr = grid["train.lr"][0]
        out.append([cell_id({**st["lr_from"], **v, "train.lr": lr, "train.seed": s})
                    for v in st["variants"] for s in raw["seeds"]])  # fmt: skip
    return out


@pytest.mark.parametrize("name", ["persona_smollm2_sweep", "tiny_sweep"])
def test_a_sweep_without_confirm_seeds_has_the_cells_it_had(name, tmp_path):
    """No confirm_seeds (or an empty list): the same stages, cells, ids and config hashes as the format defines and
    as the committed cells of the persona sweep were trained with (their done.json markers)."""
    path = write_spec(tmp_path) if name == "tiny_sweep" else ROOT / "recipes" / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert "confirm_seeds" not in raw
    spec = load_spec(path, ROOT)
    assert spec.stage_names() == ["grid", *(st["name"] for st in raw.get("stages") or [])]
    first_lr = spec.grid["train.lr"][0]
    placeholder = stage_lists(spec, {}, fill_lr=first_lr)
    assert [[c.id for c in cells] for cells in placeholder] == expected_cell_ids(raw)
    _, stages = select_all(spec, ROOT)
    assert [c.id for c in stages[0]] == expected_cell_ids(raw)[0]
    raw["confirm_seeds"] = []
    empty = tmp_path / "empty_confirm.yaml"
    empty.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert stage_lists(load_spec(empty, ROOT), {}, fill_lr=first_lr) == placeholder
    for marker in sorted((ROOT / spec.commit_dir / "cells").glob(f"*/{DONE}")):  # cells trained before this change
        recorded = json.loads(marker.read_text())
        cell = next(c for cells in stages for c in cells if c.id == marker.parent.name)  # grid and knob stage
        assert cell.as_dict == recorded["overrides"] and config_hash(spec, cell, ROOT) == recorded["config_hash"]
        assert is_done(spec, cell, ROOT)


def test_confirm_seeds_train_the_selected_lr_without_changing_it(tmp_path):
    """seeds [1] select the lr; confirm_seeds [2] train it afterwards (stage 'confirm', before the recipe's stage):
    their cells appear once a method is selected, at its lr; a confirmation value that would have changed the mean's
    choice does not change it; the method is complete (test-scorable) once they are done; stages train both seeds."""
    from perce_ds.sweep import report, runner, scoring

    spec = load_spec(write_spec(tmp_path, seeds=[1], confirm_seeds=[2]), ROOT)
    (tmp_path / "both").mkdir()
    both = load_spec(write_spec(tmp_path / "both", seeds=[1, 2]), ROOT)  # every lr with both seeds
    grid = cells_of_grid(spec)
    assert [c.id for c in grid] == [c.id for c in cells_of_grid(both) if c.seed == 1]
    values = {("ce", 1e-3): 1.0, ("ce", 3e-3): 2.0, ("perce", 1e-3): 3.0, ("perce", 3e-3): 1.5}
    for c in grid[:2]:  # ce's cells done, perce's not
        fake_finished(spec, c, values[(c.as_dict["loss.scheme"], c.lr)])
    methods, stages = select_all(spec, ROOT)
    ce, perce = methods[:2]
    assert ce.selected_lr == 1e-3 and not ce.complete and perce.selected_lr is None
    assert [(c.stage, c.as_dict) for c in stages[1]] == [
        ("confirm", {"loss.scheme": "ce", "train.lr": 1e-3, "train.seed": 2})
    ]
    assert stages[2] == [] and runner.pending(spec, ROOT) == (0, [2, 3])  # the grid first
    dry = runner.dry_run(spec, ROOT)
    confirm_lines = dry.split("confirm: ", 1)[1].split("stage perce_clip", 1)[0].splitlines()
    assert confirm_lines[0].startswith("2 cells (1 waiting for their grid method's selected lr")
    assert "[todo]" in confirm_lines[1] and "train.lr: 0.001, train.seed: 2" in confirm_lines[1]
    assert "[pending]" in confirm_lines[2] and "scheme: perce" in confirm_lines[2]
    assert "seeds [1], confirm seeds [2]" in dry.splitlines()[0]

    for c in grid[2:]:
        fake_finished(spec, c, values[(c.as_dict["loss.scheme"], c.lr)])
    methods, stages = select_all(spec, ROOT)
    assert [m.selected_lr for m in methods[:2]] == [1e-3, 3e-3] and not any(m.complete for m in methods)
    confirm = stages[1]
    assert [(c.as_dict["loss.scheme"], c.lr, c.seed) for c in confirm] == [("ce", 1e-3, 2), ("perce", 3e-3, 2)]
    both_ids = {c.id: c for c in cells_of_grid(both)}  # the cell the grid would have had with seed 2: id and hash
    assert all(config_hash(spec, c, ROOT) == config_hash(both, both_ids[c.id], ROOT) for c in confirm)
    assert [(c.lr, c.seed) for c in stages[2]] == [(3e-3, 1), (3e-3, 2)]  # perce_clip at perce's lr, both seeds
    assert runner.pending(spec, ROOT) == (1, [0, 1])  # confirmation before the recipe's stage
    assert methods[0].selected == [grid[0], confirm[0]]

    fake_finished(spec, confirm[0], 100.0)  # ce seed 2: the mean at 1e-3 would now be 50.5, worse than 3e-3's 2.0
    fake_finished(spec, confirm[1], 0.5)
    methods, stages = select_all(spec, ROOT)
    ce = methods[0]
    assert ce.selected_lr == 1e-3 and ce.complete and [c.seed for c in ce.selected] == [1, 2]
    assert ce.by_lr[1e-3]["mean"] == 1.0 and ce.confirm_runs == {confirm[0].id: {"seed": 2, "value": 100.0, "step": 2}}
    assert not methods[2].complete and runner.pending(spec, ROOT) == (2, [0, 1])
    assert scoring.selection_record(methods)[ce.key] == [grid[0].id, confirm[0].id]
    for c in stages[2]:
        fake_finished(spec, c, 1.0)
    methods, _ = select_all(spec, ROOT)
    assert all(m.complete for m in methods) and runner.pending(spec, ROOT) is None
    assert [c.seed for c in methods[2].selected] == [1, 2] and methods[2].by_lr[3e-3]["mean"] == 1.0

    report.write_report(spec, methods, None, ROOT)
    written = json.loads((tmp_path / "committed" / "sweep.json").read_text())
    assert written["select"]["seeds"] == [1] and written["select"]["confirm_seeds"] == [2]
    assert [(m["lr_chosen_by_seeds"], m["fixed_lr_seeds"]) for m in written["methods"]] == [
        ([1], [2]),
        ([1], [2]),
        ([], [1, 2]),
    ]
    assert written["methods"][0]["selected_cells"] == [grid[0].id, confirm[0].id]
    md = (tmp_path / "committed" / "sweep.md").read_text()
    assert "| scheme=ce | grid + confirm | 0.001 (all seeds) | 50.5000 | s1: 1.0000 @ 2, s2: 100.0000 @ 2 |" in md


def test_a_done_marker_of_another_definition_is_refused(tmp_path):
    spec = load_spec(write_spec(tmp_path), ROOT)
    cell = cells_of_grid(spec)[0]
    fake_finished(spec, cell, 1.0)
    assert is_done(spec, cell, ROOT)
    changed = load_spec(write_spec(tmp_path, overrides={**spec.overrides, "train.max_steps": 5}), ROOT)
    assert cells_of_grid(changed)[0].id == cell.id  # same cell overrides, other common overrides
    with pytest.raises(SweepError, match="another definition"):
        is_done(changed, cell, ROOT)


# ------------------------------------------------------------------ the user-level bootstrap (fast)
def test_user_bootstrap_groups_a_users_records():
    """Records of a user perfectly correlated (k copies of one value): resampling users gives an interval sqrt(k)
    wider than resampling records (the records treated as users), as the arithmetic of the two means says."""
    rng = np.random.default_rng(0)
    n_users, k = 60, 4
    user_values = rng.normal(0.0, 1.0, n_users)
    other = np.repeat(user_values, k)[None, :]  # [1 seed, records]
    base = np.zeros_like(other)
    ones = np.ones_like(other)
    users = [f"u{i}" for i in range(n_users) for _ in range(k)]

    def width(groups: list[str]) -> float:
        names, idx = bootstrap.user_index(groups)
        sums = [bootstrap.per_user(a, idx, len(names)) for a in (base, ones, other, ones)]
        d = bootstrap.paired_user_bootstrap((sums[0], sums[1]), (sums[2], sums[3]), n_resamples=4000, seed=1)
        assert d["diff"] == pytest.approx(user_values.mean())
        return d["ci_high"] - d["ci_low"]

    by_user, by_record = width(users), width([str(i) for i in range(len(users))])
    # expected ratio sqrt(k) = 2; the bootstrap's own width estimate wobbles by a few per cent at 4000 resamples
    assert 1.75 < by_user / by_record < 2.25


def test_user_bootstrap_includes_the_seeds():
    """Two seeds that disagree by a constant: the interval spans both seeds' differences (it resamples seeds),
    where one seed alone gives a narrow interval around its own difference."""
    rng = np.random.default_rng(0)
    per_user = rng.normal(1.0, 0.05, (1, 30))
    ones = np.ones((1, 30))
    base = (np.zeros((1, 30)), ones)
    one_seed = bootstrap.paired_user_bootstrap(base, (per_user, ones), seed=0)
    two = bootstrap.paired_user_bootstrap(
        base, (np.vstack([per_user, per_user + 1.0]), np.vstack([ones, ones])), seed=0
    )
    assert one_seed["ci_high"] - one_seed["ci_low"] < 0.1
    assert two["diff"] == pytest.approx(per_user.mean() + 0.5)
    assert two["ci_low"] < per_user.mean() + 0.1 and two["ci_high"] > per_user.mean() + 0.9


def test_targets_judge_the_best_validated_challenger_not_the_best_on_test(tmp_path):
    """The challenger is chosen on validation (all seeds at the selected lr), never by its test numbers; each
    target reads the table's paired interval: persona NLL needs the upper end < 0, other NLL +5 % at most, the
    generation scores an upper end >= 0; a row the table lacks is n/a."""
    spec = load_spec(write_spec(tmp_path), ROOT)

    def method(label: str, values: list[float]) -> MethodSelection:
        m = MethodSelection(label, label, {}, "grid", selected_lr=1e-5)
        m.by_lr = {1e-5: {"runs": {f"{label}-s{i}": {"seed": i, "value": v, "step": 4} for i, v in enumerate(values)}}}
        return m

    ce, perce, knob = method("ce", [1.0, 1.0]), method("perce", [0.90, 0.94]), method("perce_knob", [0.95, 0.95])
    assert targets.challenger(spec, [ce, perce, knob]) is perce  # mean 0.92 < 0.95 on validation

    def vs(diff: float, lo: float, hi: float, rel: float) -> dict:
        return {"diff": diff, "ci_low": lo, "ci_high": hi, "rel": rel}

    def row(metric: str, cls: str | None, perce_d: dict, knob_d: dict) -> dict:
        return {"metric": metric, "class": cls, "methods": {"ce": {}, "perce": {"vs_base": perce_d},
                                                            "perce_knob": {"vs_base": knob_d}}}  # fmt: skip

    great = vs(-1.0, -1.2, -0.8, -0.5)  # the knob wins everything on test: it must not be judged for that
    table = {"base": "ce", "rows": [
        row("nll", "persona", vs(-0.2, -0.3, -0.1, -0.2), great),
        row("nll", "other", vs(0.06, 0.02, 0.1, 0.06), great),
        row("rougeL", None, vs(-0.01, -0.03, 0.0, -0.02), great),
        row("meteor", None, vs(-0.02, -0.04, -0.001, -0.04), great),
    ]}  # fmt: skip
    result = targets.judge(spec, [ce, perce, knob], table)
    assert result["challenger"] == "perce"
    assert [t["met"] for t in result["targets"]] == [True, False, True, False]
    text = "\n".join(targets.render(result, "eval_ce"))
    assert "**perce**" in text and "+6.0 %" in text and text.count("**no**") == 2
    # Data without persona spans (commit subjects): the NLL targets are n/a, the generation ones still judged
    spanless = {"base": "ce", "rows": table["rows"][2:]}
    assert [t["met"] for t in targets.judge(spec, [ce, perce, knob], spanless)["targets"]] == [None, None, True, False]
    # A tie on validation goes to the earlier method
    assert targets.challenger(spec, [ce, method("a", [0.9]), method("b", [0.9])]).label == "a"


# ------------------------------------------------------------------ train.keep_best (fast)
def test_keep_best_exports_on_improvement_and_resumes_from_the_record(tmp_path):
    best = KeepBest(tmp_path, "eval_ce", "min", resuming=False)
    assert not best.improves({})  # no eval split: nothing to compare
    assert best.improves({"eval_ce": 3.0})
    (tmp_path / "hf_best.tmp").mkdir()
    (tmp_path / "hf_best.tmp" / "config.json").write_text("{}")
    assert best.update(4, {"eval_ce": 3.0})
    best.commit(tmp_path / "hf_best.tmp")
    assert json.loads((tmp_path / "best.json").read_text()) == {
        "step": 4,
        "metric": "eval_ce",
        "mode": "min",
        "value": 3.0,
    }
    assert (tmp_path / "hf_best" / "config.json").is_file() and not (tmp_path / "hf_best.tmp").exists()
    assert not best.improves({"eval_ce": 3.0}) and best.improves({"eval_ce": 2.9})
    assert not KeepBest(tmp_path, "eval_ce", "min", resuming=True).improves({"eval_ce": 3.5})  # the record counts
    assert KeepBest(tmp_path, "eval_ce", "min", resuming=False).improves({"eval_ce": 3.5})  # a fresh start forgets
    assert KeepBest(tmp_path, "eval_acc", "max", resuming=False).improves({"eval_acc": 0.1})
    with pytest.raises(UserError, match="eval_nll_persona.*eval_ce"):
        KeepBest(tmp_path, "eval_nll_persona", "min", resuming=False).improves({"eval_ce": 1.0})


def test_keep_best_state_is_the_same_on_every_rank_and_patience_counts_evaluations(tmp_path):
    """Every rank updates the record (only rank 0 commits files): the export is a collective, so ranks must agree
    on each improvement. Before, only rank 0's record moved and the other ranks saw every evaluation as an
    improvement, so a multi-rank run hung in the export at its first evaluation that did not improve."""
    values = [3.0, 2.5, 2.6, 2.5, 2.7, 2.4, 2.8]  # at steps 2, 4, ..., 14; 2.5 again is no improvement (strict)
    rank0, rank1 = (KeepBest(tmp_path, "eval_ce", "min", False, patience=2, eval_every=2) for _ in range(2))
    spent = []
    for i, value in enumerate(values):
        step = 2 * (i + 1)
        improved = [rank0.update(step, {"eval_ce": value}), rank1.update(step, {"eval_ce": value})]
        assert improved[0] == improved[1] == (value < min(values[:i], default=float("inf")))
        if improved[0]:
            (tmp_path / "hf_best.tmp").mkdir()
            (tmp_path / "hf_best.tmp" / "config.json").write_text("{}")
            rank0.commit(tmp_path / "hf_best.tmp")
        assert (rank0.value, rank0.step) == (rank1.value, rank1.step)
        spent.append(rank0.patience_spent(step))
    # best at step 4 (2.5); steps 6 and 8 do not improve: the second of them spends the patience of 2
    assert spent == [False, False, False, True, True, False, False]
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 12
    # A resumed run reads the best step back: it stops where the uninterrupted run would
    resumed = KeepBest(tmp_path, "eval_ce", "min", True, patience=2, eval_every=2)
    assert resumed.step == 12 and not resumed.patience_spent(14) and resumed.patience_spent(16)
    assert not KeepBest(tmp_path, "eval_ce", "min", True).patience_spent(10**6)  # patience 0: never


def test_keep_best_replaces_the_model_and_its_lora_adapter_together(tmp_path):
    """A LoRA run stages the adapter beside the model (hf_best_adapter.tmp/): commit moves both over the previous
    best, leaving no staged or set-aside folder; before, the adapter went straight to hf_best_adapter/ while the
    merged model was still exporting, so a kill paired a new adapter with the old model."""
    assert adapter_dir(tmp_path / "hf") == tmp_path / "hf_adapter"
    assert adapter_dir(tmp_path / "hf_best.tmp") == tmp_path / "hf_best_adapter.tmp"
    best = KeepBest(tmp_path, "eval_ce", "min", resuming=False)
    for step, value in ((4, 3.0), (8, 2.0)):
        for folder in ("hf_best.tmp", "hf_best_adapter.tmp"):
            (tmp_path / folder).mkdir()
            (tmp_path / folder / "step").write_text(str(step))
        (tmp_path / "hf_best.old").mkdir(exist_ok=True)  # left by a kill during an earlier replace
        assert best.update(step, {"eval_ce": value})
        best.commit(tmp_path / "hf_best.tmp")
        assert (tmp_path / "hf_best" / "step").read_text() == str(step)
        assert (tmp_path / "hf_best_adapter" / "step").read_text() == str(step)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "hf_best", "hf_best_adapter"]
        assert json.loads((tmp_path / "best.json").read_text())["step"] == step


# ------------------------------------------------------------------ dry runs and the stub's --array (fast)
@pytest.mark.parametrize("name", ["persona_smollm2_sweep", "commits_smollm2_sweep", "tiny_sweep", "tiny_confirm"])
def test_dry_run_lists_every_cell_with_a_cost(name, tmp_path):
    tiny = {"tiny_sweep": {}, "tiny_confirm": {"seeds": [1], "confirm_seeds": [2]}}
    path = write_spec(tmp_path, **tiny[name]) if name in tiny else ROOT / "recipes" / f"{name}.yaml"
    spec = yaml.safe_load(path.read_text())

    def files() -> dict[str, float]:  # what the sweep may write (committed cells may already exist: they stay)
        dirs = [ROOT / spec["output_dir"], ROOT / spec["commit_dir"]]
        return {str(f): f.stat().st_mtime for d in dirs if d.exists() for f in d.rglob("*")}

    before = files()
    out = check(run_job([sys.executable, SWEEP, "--recipe", path, "--dry-run"], 120)).stdout
    n_grid = int(np.prod([len(v) for v in spec["grid"].values()])) * len(spec["seeds"])
    seeds = len(spec["seeds"]) + len(spec.get("confirm_seeds", []))  # stages train every seed
    n_stage = sum(len(s["variants"]) for s in spec.get("stages") or []) * seeds
    n_methods = int(np.prod([len(v) for k, v in spec["grid"].items() if k != "train.lr"]))
    n_confirm = n_methods * len(spec.get("confirm_seeds", []))  # each grid method's selected lr x confirm seeds
    assert f"grid: {n_grid} cells" in out
    assert (f"confirm: {n_confirm} cells" in out) == (n_confirm > 0)
    listed = out.count("[todo]") + out.count("[done]")  # a checkout may hold finished (committed) cells
    if out.count("[pending]"):  # confirmation and stages wait for their lr until the grid is done
        assert listed == n_grid and out.count("[pending]") == n_confirm + n_stage
    else:
        assert listed == n_grid + n_confirm + n_stage
    assert "total (all cells, sequential):" in out
    assert files() == before  # nothing ran, nothing was written


def test_stub_sbatch_runs_an_array_once_per_index(tmp_path):
    script = tmp_path / "task.sh"
    script.write_text('echo "$SLURM_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID" >> "$1"\n')
    env = dict(os.environ, SLURM_STUB_DIR=str(tmp_path / "slurm"))
    subprocess.run(
        [sys.executable, STUB / "sbatch", "--parsable", "--array=0,2-3", script, tmp_path / "out"], env=env, check=True
    )
    assert (tmp_path / "out").read_text().split("\n")[:3] == ["1000 0", "1000 2", "1000 3"]
    assert (tmp_path / "slurm" / "jobs.tsv").read_text().startswith("1000\tCOMPLETED")


# ------------------------------------------------------------------ end to end on the tiny model (slow)
def train_lines(tmp: Path) -> list[str]:
    """Cell ids of the training invocations, in order (sweep.log: one line per launch/train.py start)."""
    log = tmp / "runs" / "sweep.log"
    return [line.split()[-1] for line in log.read_text().splitlines()] if log.is_file() else []


# the slow tests' sweep: CE and PerCE at one lr with seed 1, confirmed with seed 2, then PerCE with clip_max 2 at
# PerCE's lr with both seeds (6 cells in 3 stages; lr selection over several values is tested above on committed files)
E2E = {"grid": {"loss.scheme": ["ce", "perce"], "train.lr": [3.0e-3]}, "seeds": [1], "confirm_seeds": [2]}


@pytest.fixture(scope="module")
def slurm_sweep(tmp_path_factory) -> Path:
    """The tiny sweep run through launch/slurm/sweep.sh (`launch/sweep.py --slurm`) under the stub scheduler."""
    tmp = tmp_path_factory.mktemp("sweep_slurm")
    env = launch_env()
    env.update(PATH=f"{STUB}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
               SLURM_STUB_DIR=str(tmp / "slurm"), PERCE_PYTHON=sys.executable)  # fmt: skip
    check(run_job([sys.executable, SWEEP, "--recipe", write_spec(tmp, **E2E), "--slurm"], 400, env=env))
    return tmp


@pytest.mark.slow
def test_slurm_array_path_runs_the_sweep_and_keeps_the_best_checkpoint(slurm_sweep):
    tmp = slurm_sweep
    jobs = sorted(
        (line.split("\t") for line in (tmp / "slurm" / "jobs.tsv").read_text().splitlines()), key=lambda j: int(j[0])
    )
    # in submission order: stage 0 (2 grid cells) as one array, the next step after it, which submitted stage 1
    # (confirmation, the lr now selected), its next step, which submitted stage 2 (PerCE with clip_max 2), and the
    # next step after that, which wrote the report (the stub logs a job at its end)
    recipe = str(tmp / "tiny_sweep.yaml")
    assert [(j[1], Path(j[2]).name, j[3].split()[-1]) for j in jobs] == [
        ("COMPLETED", "sweep_cell.sbatch", "0"), ("COMPLETED", "sweep_next.sbatch", recipe),
        ("COMPLETED", "sweep_cell.sbatch", "1"), ("COMPLETED", "sweep_next.sbatch", recipe),
        ("COMPLETED", "sweep_cell.sbatch", "2"), ("COMPLETED", "sweep_next.sbatch", recipe),
    ]  # fmt: skip
    assert len(train_lines(tmp)) == 6
    result = json.loads((tmp / "committed" / "sweep.json").read_text())
    assert [m["label"] for m in result["methods"]] == ["scheme=ce", "scheme=perce", "scheme=perce, clip_max=2.0"]
    perce_lr = result["methods"][1]["selected_lr"]
    assert result["methods"][2]["selected_lr"] == perce_lr  # the stage ran at PerCE's selected lr
    stage_of = {c.name: json.loads((c / DONE).read_text())["stage"] for c in (tmp / "committed" / "cells").iterdir()}
    for m, stages in zip(result["methods"], (["grid", "confirm"], ["grid", "confirm"], ["perce_clip"] * 2)):
        assert m["complete"] and [stage_of[c] for c in m["selected_cells"]] == stages  # all seeds, each tested
    for cell in (tmp / "committed" / "cells").iterdir():
        rows = [json.loads(line) for line in (cell / "eval_metrics.jsonl").read_text().splitlines()]
        best = json.loads((cell / "best.json").read_text())
        first_min = min(rows, key=lambda r: r["eval_ce"])
        assert len(rows) == 2 and (best["step"], best["value"]) == (first_min["step"], first_min["eval_ce"])
        # hf_best holds the weights of the best step (the checkpoint of that step: save_every 2, keep_last 2)
        exported = load_safetensors(tmp / "runs" / cell.name / "hf_best" / "model.safetensors")
        saved = consolidated_lm_weights(tmp / "runs" / cell.name / "checkpoints" / f"step_{best['step']}")
        assert exported.keys() <= saved.keys() and all(torch.equal(v, saved[k]) for k, v in exported.items())
    rows = {(r["metric"], r["class"]): r for r in result["test"]["rows"]}
    assert {("nll", "persona"), ("nll", "other"), ("nll", "all"), ("rougeL", None), ("meteor", None),
            ("generated_tokens", None), ("end_of_turn", None)} <= set(rows)  # fmt: skip
    assert 0 < rows[("generated_tokens", None)]["step0"] <= 8 and 0 <= rows[("end_of_turn", None)]["step0"] <= 1
    nll = rows[("nll", "all")]
    assert all(m["value"] < nll["step0"] for m in nll["methods"].values())  # step 0 scored: training moved it
    assert set(nll["methods"]["scheme=perce"]["vs_base"]) >= {"diff", "ci_low", "ci_high"}
    assert (tmp / "committed" / "test_scored.json").is_file() and (tmp / "committed" / "learning_curves.png").is_file()
    out = check(run_job([sys.executable, SWEEP, "--recipe", tmp / "tiny_sweep.yaml", "--dry-run"], 120)).stdout
    assert out.count("[done]") == 6 and f"(measured on {device_label()})" in out  # the cells ran here


@pytest.mark.slow
def test_a_killed_sweep_finishes_only_the_remaining_cells(slurm_sweep, tmp_path):
    """Given the SLURM sweep's finished grid and confirmation cells (run directories and committed files, without
    test scores), the sequential sweep trains the stage; killed in its second cell after a checkpoint and run again,
    it resumes that cell, trains nothing finished, scores test and writes the same table."""
    recipe = write_spec(tmp_path, **E2E)
    _, stages = select_all(load_spec(slurm_sweep / "tiny_sweep.yaml", ROOT), ROOT)
    for cell in stages[0] + stages[1]:
        shutil.copytree(
            slurm_sweep / "runs" / cell.id, tmp_path / "runs" / cell.id, ignore=shutil.ignore_patterns("eval")
        )
        shutil.copytree(slurm_sweep / "committed" / "cells" / cell.id, tmp_path / "committed" / "cells" / cell.id,
                        ignore=shutil.ignore_patterns("test"))  # fmt: skip
    cmd = [sys.executable, SWEEP, "--recipe", recipe]
    first = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=launch_env(), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 240
        while len(train_lines(tmp_path)) < 2:  # the first cell finished, the second started
            assert first.poll() is None and time.time() < deadline, "the sweep ended or hung before its second cell"
            time.sleep(0.2)
        second = train_lines(tmp_path)[1]
        while not (tmp_path / "runs" / second / "checkpoints" / "step_2").is_dir() and time.time() < deadline:
            time.sleep(0.2)  # kill it mid-cell, after its first checkpoint
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not (tmp_path / "committed" / "cells" / second / DONE).exists()
    check(run_job(cmd, 400))
    assert train_lines(tmp_path) == [stages[2][0].id, second, second] and second == stages[2][1].id
    assert "resumed from" in (tmp_path / "runs" / second / "train.log").read_text()
    assert (tmp_path / "committed" / "sweep.md").read_text() == (slurm_sweep / "committed" / "sweep.md").read_text()


@pytest.mark.slow
def test_parallel_cells_give_the_same_sweep(slurm_sweep, tmp_path):
    """`--parallel 3`: the cells of each stage run at once (both grid cells start before either finishes), and the
    sweep ends with the same table as the SLURM path's."""
    recipe = write_spec(tmp_path, **E2E)
    out = check(run_job([sys.executable, SWEEP, "--recipe", recipe, "--parallel", "3"], 400)).stdout
    events = [line.split("] ")[1] for line in out.splitlines() if line.startswith("[stage 0 cell")]
    assert len(events) == 4 and "finished" not in events[:2]  # both grid cells started before either finished
    assert len(train_lines(tmp_path)) == 6
    assert (tmp_path / "committed" / "sweep.md").read_text() == (slurm_sweep / "committed" / "sweep.md").read_text()


@pytest.mark.slow
def test_selected_cells_trained_elsewhere_are_retrained_before_test_scoring(slurm_sweep, tmp_path):
    """The committed cells of a sweep whose run directories are not here (trained on another machine): scoring
    refuses and names --retrain-missing; with it, the selected cells train again (first runs kept in first_run/,
    retrained.json with both best values; CPU runs are deterministic, so equal), each up to the step its first
    run's validation selected and no further, and the test table is the one the original run directories gave."""
    shutil.copytree(slurm_sweep / "committed", tmp_path / "committed",
                    ignore=shutil.ignore_patterns("test", "step0", "test_scored.json", "sweep.*", "*.png"))  # fmt: skip
    recipe = write_spec(tmp_path, **E2E)
    proc = run_job([sys.executable, SWEEP, "--recipe", recipe], 120)
    assert proc.returncode != 0 and "--retrain-missing" in proc.stderr and not (tmp_path / "runs").exists()
    check(run_job([sys.executable, SWEEP, "--recipe", recipe, "--retrain-missing", "--parallel", "2"], 400))
    cells = sorted((tmp_path / "committed" / "cells").iterdir())
    assert len(cells) == 6 and len(train_lines(tmp_path)) == 6  # E2E's methods select every cell (one lr)

    def rows(d: Path, name: str) -> list[dict]:
        return [json.loads(line) for line in (d / name).read_text().splitlines()]

    # the tiny runs improve to their last step, so here "up to the best step" is the whole run; the stop short of
    # the end is test_a_retrain_trains_to_the_first_runs_best_step's (and the commits sweep's retrains, sweep.md)
    first_best = {c.name: json.loads((c / "first_run" / "best.json").read_text())["step"] for c in cells}
    for cell in cells:
        record = json.loads((cell / "retrained.json").read_text())
        assert record["first_run"] == record["retrain"] and record["relative_difference"] == 0.0
        assert (cell / "first_run" / "done.json").is_file() and (cell / "done.json").is_file()
        best, (first, again) = first_best[cell.name], (rows(d, "metrics.jsonl") for d in (cell / "first_run", cell))
        assert [r["loss"] for r in again] == [r["loss"] for r in first if r["step"] <= best]  # stopped at best
        evals = [rows(d, "eval_metrics.jsonl") for d in (cell / "first_run", cell)]
        assert len(evals[0]) > 1 and evals[1] == [r for r in evals[0] if r["step"] == best]  # at its stop only
    text = (tmp_path / "committed" / "sweep.md").read_text()
    original = (slurm_sweep / "committed" / "sweep.md").read_text()
    assert "Retrained before test scoring" in text and text.count("(first run) ->") == 6
    assert text.split("## Test", 1)[1] == original.split("## Test", 1)[1]


@pytest.mark.slow
def test_the_table_is_rebuilt_from_the_committed_files_alone(slurm_sweep, tmp_path):
    shutil.copytree(slurm_sweep / "committed", tmp_path / "committed")
    (tmp_path / "committed" / "sweep.md").unlink()
    recipe = write_spec(tmp_path, **E2E)  # output_dir tmp_path/runs does not exist: no run directory at all
    for extra in (["--only-aggregate"], []):  # plain re-run: every cell done, test scored -> aggregates only
        check(run_job([sys.executable, SWEEP, "--recipe", recipe, *extra], 120))
        assert (tmp_path / "committed" / "sweep.md").read_text() == (slurm_sweep / "committed" / "sweep.md").read_text()
        assert not (tmp_path / "runs").exists()


def test_plots_show_each_class_logged_and_the_frontier_of_every_cell(tmp_path):
    """Learning curves and the frontier from committed eval_metrics.jsonl rows carrying the per-class NLL keys the
    training-time evaluation logs when the validation split has persona spans (synthetic rows here)."""
    from perce_ds.sweep import plots

    spec = load_spec(write_spec(tmp_path), ROOT)
    for i, cell in enumerate(cells_of_grid(spec)):
        fake_finished(spec, cell, 2.0 + i, step=2)
        rows = [{"step": s, "eval_ce": 3.0 - s / 4 + i, "eval_nll_persona": 4.0 - s / 2 + i, "eval_nll_other": 2.5 - s / 8}
                for s in (2, 4)]  # fmt: skip
        (committed_dir(spec, cell, ROOT) / "eval_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    methods, _ = select_all(spec, ROOT)
    curves = plots.learning_curves(spec, methods, ROOT, tmp_path / "curves.png")
    frontier = plots.frontier(spec, methods, ROOT, tmp_path / "frontier.png")
    assert curves is not None and curves.stat().st_size > 0 and frontier is not None and frontier.stat().st_size > 0
    assert [k for k, _ in plots.present_classes(spec, methods, ROOT)] == [
        "eval_ce",
        "eval_nll_persona",
        "eval_nll_other",
    ]
    assert sorted(p[:2] for p in plots.frontier_points(spec, methods, ROOT)["scheme=ce"]) == [(2.25, 3.0), (2.25, 4.0)]
    for cell in cells_of_grid(spec):  # eval_ce only (data without spans): curves of it, no frontier
        path = committed_dir(spec, cell, ROOT) / "eval_metrics.jsonl"
        path.write_text("".join(json.dumps({"step": s, "eval_ce": 3.0 - s / 4}) + "\n" for s in (2, 4)))
    assert plots.frontier(spec, methods, ROOT, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    assert [k for k, _ in plots.present_classes(spec, methods, ROOT)] == ["eval_ce"]


def test_learning_curves_average_seeds_over_common_steps_and_follow_a_retrained_cells_first_run(tmp_path):
    """Two seeds of a method, one early-stopped at step 4 and one run to 8: the mean curve ends at 4 (each seed is
    drawn on its own); a retrained cell's curve is its first run's whole trajectory, not the retrain's prefix."""
    from perce_ds.sweep import plots
    from perce_ds.sweep.cells import FIRST_RUN

    spec = load_spec(write_spec(tmp_path, seeds=[1, 2]), ROOT)
    cells = [c for c in cells_of_grid(spec) if c.as_dict["loss.scheme"] == "ce" and c.lr == 1e-3]
    assert [c.seed for c in cells] == [1, 2]
    for cell, last in zip(cells, (4, 8)):
        fake_finished(spec, cell, 1.0, step=2)
        rows = [{"step": s, "eval_ce": 3.0 - s / 8 + cell.seed} for s in range(2, last + 1, 2)]
        (committed_dir(spec, cell, ROOT) / "eval_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for cell in cells_of_grid(spec):
        if cell not in cells:
            fake_finished(spec, cell, 9.0)
    ce = select_all(spec, ROOT)[0][0]
    assert ce.selected_lr == 1e-3 and [c.seed for c in ce.selected] == [1, 2]
    (steps, mean), seeds = plots.method_curves(spec, ce, "eval_ce", ROOT)
    assert [s for s, _ in seeds] == [[2, 4], [2, 4, 6, 8]]  # seed 2 ran on: its tail is drawn, not averaged
    assert steps == [2, 4] and mean == pytest.approx([3.0 - 2 / 8 + 1.5, 3.0 - 4 / 8 + 1.5])
    first = (
        committed_dir(spec, cells[0], ROOT) / FIRST_RUN
    )  # seed 1 was retrained up to step 4; its first run went to 6
    first.mkdir()
    (first / "eval_metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "eval_ce": 1.0}) + "\n" for s in (2, 4, 6))
    )
    (steps, mean), seeds = plots.method_curves(spec, ce, "eval_ce", ROOT)
    assert seeds[0] == ([2, 4, 6], [1.0, 1.0, 1.0]) and steps == [2, 4, 6]


def test_test_scores_of_another_selection_are_refused_not_rescored(tmp_path):
    from perce_ds.sweep import scoring

    spec = load_spec(write_spec(tmp_path), ROOT)
    for i, cell in enumerate(cells_of_grid(spec)):
        fake_finished(spec, cell, 1.0 + i)
    methods, _ = select_all(spec, ROOT)
    marker = tmp_path / "committed" / scoring.MARKER
    assert not scoring.test_scored(spec, methods, ROOT)
    marker.write_text(json.dumps({"selection": scoring.selection_record(methods)}))
    assert scoring.test_scored(spec, methods, ROOT)
    fake_finished(spec, cells_of_grid(spec)[0], 9.0)  # validation now selects ce's other lr
    methods, _ = select_all(spec, ROOT)
    with pytest.raises(SweepError, match="scored for another selection"):
        scoring.test_scored(spec, methods, ROOT)


def test_the_test_table_reports_generated_length_end_of_turn_rate_and_each_knob_against_its_method(tmp_path):
    """Each scored model's mean generated length and end-of-turn rate are rows of the test table (with the same
    user-level intervals): a method that wins ROUGE by writing longer, or by never stopping, shows it. A later
    stage's method (the knob clip_max 2 on PerCE) is also compared with the method it modifies."""
    from perce_ds.sweep import report

    spec = load_spec(write_spec(tmp_path), ROOT)  # grid ce / perce, then stage perce_clip: clip_max 2 on perce
    for i, cell in enumerate(cells_of_grid(spec)):
        fake_finished(spec, cell, 1.0 + i)
    for cell in select_all(spec, ROOT)[1][1]:
        fake_finished(spec, cell, 1.2)
    methods, _ = select_all(spec, ROOT)
    assert [m.label for m in methods] == ["scheme=ce", "scheme=perce", "scheme=perce, clip_max=2.0"]
    # 2 users x 2 records; per model: generated lengths and finish reasons (stop = end of turn)
    generations = {"step0": ([8, 8, 8, 8], ["length"] * 4), "scheme=ce": ([3, 5, 8, 4], ["stop", "stop", "length", "stop"]),
                   "scheme=perce": ([8, 6, 8, 8], ["length", "stop", "length", "length"]),
                   "scheme=perce, clip_max=2.0": ([4, 6, 8, 8], ["stop", "stop", "length", "length"])}  # fmt: skip
    dirs = {"step0": tmp_path / "committed" / "step0" / "test"}
    dirs |= {m.label: committed_dir(spec, m.selected[0], ROOT) / "test" for m in methods}
    for label, (lengths, reasons) in generations.items():
        dirs[label].mkdir(parents=True)
        tokens = {f"r{i}": {"user": f"u{i // 2}", "persona": [1.0, 1, 2], "other": [2.0, 1, 4], "all": [3.0, 2, 6]}
                  for i in range(4)}  # fmt: skip
        (dirs[label] / "tokens.json").write_text(json.dumps(tokens))
        per_record = [{"record_id": f"r{i}", "rougeL": 0.5, "meteor": 0.5, "n_generated_tokens": n,
                       "finish_reason": r} for i, (n, r) in enumerate(zip(lengths, reasons))]  # fmt: skip
        (dirs[label] / "generation_per_record.jsonl").write_text("".join(json.dumps(r) + "\n" for r in per_record))
    table = report.test_table(spec, methods, ROOT, n_resamples=200)
    rows = {r["metric"]: r for r in table["rows"] if r["metric"] in ("generated_tokens", "end_of_turn")}
    assert rows["generated_tokens"]["step0"] == 8.0 and rows["end_of_turn"]["step0"] == 0.0
    assert rows["generated_tokens"]["methods"]["scheme=ce"]["value"] == pytest.approx(5.0)
    assert rows["end_of_turn"]["methods"]["scheme=ce"]["value"] == pytest.approx(0.75)
    vs_ce = rows["end_of_turn"]["methods"]["scheme=perce"]["vs_base"]
    assert vs_ce["diff"] == pytest.approx(0.25 - 0.75) and vs_ce["ci_low"] <= vs_ce["diff"] <= vs_ce["ci_high"]
    knob = rows["end_of_turn"]["methods"]["scheme=perce, clip_max=2.0"]["vs_source"]
    assert knob["diff"] == pytest.approx(0.5 - 0.25) and knob["ci_low"] <= knob["diff"] <= knob["ci_high"]
    assert "vs_source" not in rows["end_of_turn"]["methods"]["scheme=perce"]  # a grid method modifies nothing
    text = report.render(spec, methods, table)
    assert "| generated tokens (mean) | 8.0 | 5.0 | 7.5 (+2.5 [" in text
    assert "| end-of-turn rate (x100) | 0.00 | 75.00 | 25.00 (-50.00 [" in text
    assert "| scheme=perce, clip_max=2.0 - scheme=perce |" in text and "| generated tokens (mean) | -1.0 [" in text


def test_a_second_retrain_keeps_the_first_runs_files(tmp_path):
    from perce_ds.sweep.cells import FIRST_RUN, set_aside_for_retraining

    spec = load_spec(write_spec(tmp_path), ROOT)
    cell = cells_of_grid(spec)[0]
    fake_finished(spec, cell, 2.0)
    d = committed_dir(spec, cell, ROOT)
    set_aside_for_retraining(spec, cell, ROOT)
    assert not is_done(spec, cell, ROOT) and json.loads((d / FIRST_RUN / "best.json").read_text())["value"] == 2.0
    fake_finished(spec, cell, 1.5)  # the retrain finished; its model was lost too: set aside again
    set_aside_for_retraining(spec, cell, ROOT)
    assert json.loads((d / FIRST_RUN / "best.json").read_text())["value"] == 2.0  # still the first run's
    assert not (d / FIRST_RUN / FIRST_RUN).exists() and (d / FIRST_RUN / DONE).is_file()


def test_a_retrain_trains_to_the_first_runs_best_step(tmp_path):
    """A retrain stops where the first run's validation selected (--train.stop_after counted from the run's last
    complete checkpoint, so a killed retrain resumes to the same step); a first run gets no stop."""
    from perce_ds.sweep.cells import retrain_steps_left, retrain_target, run_dir, set_aside_for_retraining

    spec = load_spec(write_spec(tmp_path), ROOT)
    cell = cells_of_grid(spec)[0]
    fake_finished(spec, cell, 2.0, step=36)
    assert retrain_steps_left(spec, cell, ROOT) is None  # a first run: trains its whole schedule
    set_aside_for_retraining(spec, cell, ROOT)
    assert retrain_steps_left(spec, cell, ROOT) == 36 and retrain_target(spec, cell, ROOT) == 36
    checkpoints = run_dir(spec, cell, ROOT) / "checkpoints"
    (checkpoints / "step_18").mkdir(parents=True)
    (checkpoints / "step_27.tmp").mkdir()  # not a complete checkpoint's name: not counted
    assert retrain_steps_left(spec, cell, ROOT) == 18
    (checkpoints / "step_36").mkdir()
    assert retrain_steps_left(spec, cell, ROOT) == 0  # reached: run_cell commits without training


def test_dry_run_step_time_comes_from_cells_of_this_device_and_retrains_count_to_their_best_step(tmp_path):
    """A GPU's step time is no estimate for a CPU: the median is taken over the finished cells that ran on this
    device (summary.json's `device`), cells from before that record only when none matches, and cells of other
    devices only are named beside the fallback. A retrain is estimated to its first run's best step, and
    --retrain-missing --dry-run lists the selected cells it would train again."""
    from perce_ds.sweep import cost, runner
    from perce_ds.sweep.cells import set_aside_for_retraining

    spec = load_spec(write_spec(tmp_path, seeds=[1], cost={"step_seconds": 7, "eval_seconds": 2}), ROOT)
    grid = cells_of_grid(spec)

    def ran(cell, device: str | None, step_times: list[float], best_step: int = 2) -> None:
        fake_finished(spec, cell, 1.0 + cell.lr, step=best_step)
        d = committed_dir(spec, cell, ROOT)
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "step_time_s": t}) + "\n"
                                                 for i, t in enumerate(step_times)))  # fmt: skip
        (d / "summary.json").write_text(json.dumps({} if device is None else {"device": device}))

    ran(grid[0], "NVIDIA H200", [0.5, 0.7, 0.6])
    ran(grid[1], "cpu (2 cores)", [10.0, 14.0, 12.0, 30.0], best_step=4)
    measured = cost.measured_step_seconds(spec, grid[:2], ROOT, device="cpu (2 cores)")
    assert (measured.seconds, measured.source) == (13.0, "measured on cpu (2 cores)")
    assert cost.measured_step_seconds(spec, grid[:2], ROOT, device="NVIDIA H200").seconds == 0.6
    other = cost.measured_step_seconds(spec, grid[:2], ROOT, device="NVIDIA A100")
    assert other.seconds is None and "0.60 s on NVIDIA H200" in other.source and "13.00 s on cpu" in other.source
    est = cost.estimate(spec, grid[0], ROOT, other)
    assert est["step_seconds"] == 7 and other.source in est["source"]  # the recipe's, and why
    ran(grid[2], None, [3.0])
    unrecorded = cost.measured_step_seconds(spec, grid[:3], ROOT, device="NVIDIA A100")
    assert (unrecorded.seconds, unrecorded.source) == (3.0, "measured, device not recorded")

    while (todo := runner.pending(spec, ROOT)) is not None:  # the rest of the grid, then the later stages
        for i in todo[1]:
            ran(select_all(spec, ROOT)[1][todo[0]][i], "cpu (2 cores)", [12.0], best_step=4)
    dry = runner.dry_run(spec, ROOT, retrain_missing=True)  # every method selected, no model here
    methods, _ = select_all(spec, ROOT)
    selected = [c for m in methods for c in m.selected]
    retrain_lines = dry.split("retrain before test scoring (--retrain-missing): ", 1)[1].split("\n\n", 1)[0]
    assert retrain_lines.startswith(f"{len(selected)} selected cells") and len(selected) >= 2
    for c in selected:
        best = json.loads((committed_dir(spec, c, ROOT) / "best.json").read_text())["step"]
        assert f"{c.id}  {{" in retrain_lines and f"[retrain] {best} steps (retrain to" in retrain_lines
    assert "retrain before" not in runner.dry_run(spec, ROOT)  # only with --retrain-missing

    set_aside_for_retraining(spec, grid[1], ROOT)  # its retrain under way: a grid cell to do, to its best step
    line = next(x for x in runner.dry_run(spec, ROOT).splitlines() if grid[1].id in x)
    assert "[todo] 4 steps (retrain to the first run's best step)" in line and "+ 1 evals" in line


def test_committing_a_retrain_keeps_only_the_files_its_run_wrote(tmp_path):
    """The committed cell holds the retrain's files only: a small file its run did not write (here summary.json)
    is not left over from the first run beside the retrain's metrics (it stays in first_run/)."""
    from perce_ds.sweep.cells import FIRST_RUN, SMALL_FILES, commit_cell, run_dir, set_aside_for_retraining

    spec = load_spec(write_spec(tmp_path), ROOT)
    cell = cells_of_grid(spec)[0]
    fake_finished(spec, cell, 2.0)
    d = committed_dir(spec, cell, ROOT)
    (d / "summary.json").write_text(json.dumps({"device": "NVIDIA H200"}))
    set_aside_for_retraining(spec, cell, ROOT)
    rd = run_dir(spec, cell, ROOT)
    rd.mkdir(parents=True)
    for name in ("best.json", "metrics.jsonl", "eval_metrics.jsonl"):
        (rd / name).write_text("{}\n")
    commit_cell(spec, cell, ROOT)
    assert "summary.json" in SMALL_FILES and not (d / "summary.json").exists()
    assert json.loads((d / FIRST_RUN / "summary.json").read_text())["device"] == "NVIDIA H200"
    assert (d / "metrics.jsonl").read_text() == "{}\n" and is_done(spec, cell, ROOT)


def test_an_hf_best_from_another_run_of_the_cell_is_not_its_model(tmp_path):
    """has_model (test scoring, --retrain-missing) accepts a run's hf_best only when the run's best.json is the
    committed cell's: a retrain stopped at step 18 of 36 left an hf_best of step 18, which is not the model the
    committed validation numbers describe (scoring it would put another model's test numbers in the table)."""
    from perce_ds.sweep.cells import has_model, run_dir

    spec = load_spec(write_spec(tmp_path), ROOT)
    cell = cells_of_grid(spec)[0]
    fake_finished(spec, cell, 2.0, step=36)
    rd = run_dir(spec, cell, ROOT)
    (rd / "hf_best").mkdir(parents=True)
    (rd / "hf_best" / "config.json").write_text("{}")
    assert not has_model(spec, cell, ROOT)  # no best.json in the run: whose model is it?
    (rd / "best.json").write_text(json.dumps({"step": 18, "metric": "eval_ce", "mode": "min", "value": 2.5}))
    assert not has_model(spec, cell, ROOT)
    shutil.copy2(committed_dir(spec, cell, ROOT) / "best.json", rd / "best.json")
    assert has_model(spec, cell, ROOT)
