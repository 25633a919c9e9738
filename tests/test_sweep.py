"""Validated sweeps (launch/sweep.py, perce_ds/sweep/): recipe parsing, cell state, selection, the user-level
bootstrap, train.keep_best, the dry runs, and (slow) the SLURM array path, a killed sweep resumed, and the table
rebuilt from the committed files alone."""

from __future__ import annotations

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
from perce_ds.errors import UserError
from perce_ds.sweep import bootstrap
from perce_ds.sweep.cells import DONE, SweepError, cells_of_grid, committed_dir, config_hash, is_done
from perce_ds.sweep.select import select_all
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


# ------------------------------------------------------------------ train.keep_best (fast)
def test_keep_best_exports_on_improvement_and_resumes_from_the_record(tmp_path):
    best = KeepBest(tmp_path, "eval_ce", "min", resuming=False)
    assert not best.improves({})  # no eval split: nothing to compare
    assert best.improves({"eval_ce": 3.0})
    (tmp_path / "hf_best.tmp").mkdir()
    (tmp_path / "hf_best.tmp" / "config.json").write_text("{}")
    best.commit(4, {"eval_ce": 3.0}, tmp_path / "hf_best.tmp")
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
        best.commit(step, {"eval_ce": value}, tmp_path / "hf_best.tmp")
        assert (tmp_path / "hf_best" / "step").read_text() == str(step)
        assert (tmp_path / "hf_best_adapter" / "step").read_text() == str(step)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "hf_best", "hf_best_adapter"]
        assert json.loads((tmp_path / "best.json").read_text())["step"] == step


# ------------------------------------------------------------------ dry runs and the stub's --array (fast)
@pytest.mark.parametrize("name", ["persona_smollm2_sweep", "commits_smollm2_sweep", "tiny_sweep"])
def test_dry_run_lists_every_cell_with_a_cost(name, tmp_path):
    path = write_spec(tmp_path) if name == "tiny_sweep" else ROOT / "recipes" / f"{name}.yaml"
    spec = yaml.safe_load(path.read_text())

    def files() -> dict[str, float]:  # what the sweep may write (committed cells may already exist: they stay)
        dirs = [ROOT / spec["output_dir"], ROOT / spec["commit_dir"]]
        return {str(f): f.stat().st_mtime for d in dirs if d.exists() for f in d.rglob("*")}

    before = files()
    out = check(run_job([sys.executable, SWEEP, "--recipe", path, "--dry-run"], 120)).stdout
    n_grid = int(np.prod([len(v) for v in spec["grid"].values()])) * len(spec["seeds"])
    n_stage = sum(len(s["variants"]) for s in spec.get("stages") or []) * len(spec["seeds"])
    assert f"grid: {n_grid} cells" in out
    listed = out.count("[todo]") + out.count("[done]")  # a checkout may hold finished (committed) cells
    if out.count("[pending]"):  # stages wait for their lr until the grid is done
        assert listed == n_grid and out.count("[pending]") == n_stage
    else:
        assert listed == n_grid + n_stage
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


# the slow tests' sweep: CE and PerCE at one lr, then PerCE with clip_max 2 at PerCE's (3 cells; lr selection over
# several values is tested above on committed files)
E2E_GRID = {"loss.scheme": ["ce", "perce"], "train.lr": [3.0e-3]}


@pytest.fixture(scope="module")
def slurm_sweep(tmp_path_factory) -> Path:
    """The tiny sweep run through launch/slurm/sweep.sh (`launch/sweep.py --slurm`) under the stub scheduler."""
    tmp = tmp_path_factory.mktemp("sweep_slurm")
    env = launch_env()
    env.update(PATH=f"{STUB}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
               SLURM_STUB_DIR=str(tmp / "slurm"), PERCE_PYTHON=sys.executable)  # fmt: skip
    check(run_job([sys.executable, SWEEP, "--recipe", write_spec(tmp, grid=E2E_GRID), "--slurm"], 400, env=env))
    return tmp


@pytest.mark.slow
def test_slurm_array_path_runs_the_sweep_and_keeps_the_best_checkpoint(slurm_sweep):
    tmp = slurm_sweep
    jobs = sorted(
        (line.split("\t") for line in (tmp / "slurm" / "jobs.tsv").read_text().splitlines()), key=lambda j: int(j[0])
    )
    # in submission order: stage 0 (2 grid cells) as one array, the next step after it, which submitted stage 1
    # (its lr now selected) and the next step after that, which wrote the report (the stub logs a job at its end)
    assert [(j[1], Path(j[2]).name, j[3].split()[-1]) for j in jobs] == [
        ("COMPLETED", "sweep_cell.sbatch", "0"), ("COMPLETED", "sweep_next.sbatch", str(tmp / "tiny_sweep.yaml")),
        ("COMPLETED", "sweep_cell.sbatch", "1"), ("COMPLETED", "sweep_next.sbatch", str(tmp / "tiny_sweep.yaml")),
    ]  # fmt: skip
    assert len(train_lines(tmp)) == 3
    result = json.loads((tmp / "committed" / "sweep.json").read_text())
    assert [m["label"] for m in result["methods"]] == ["scheme=ce", "scheme=perce", "scheme=perce, clip_max=2.0"]
    perce_lr = result["methods"][1]["selected_lr"]
    assert result["methods"][2]["selected_lr"] == perce_lr  # the stage ran at PerCE's selected lr
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
    assert {("nll", "persona"), ("nll", "other"), ("nll", "all"), ("rougeL", None), ("meteor", None)} <= set(rows)
    nll = rows[("nll", "all")]
    assert all(m["value"] < nll["step0"] for m in nll["methods"].values())  # step 0 scored: training moved it
    assert set(nll["methods"]["scheme=perce"]["vs_base"]) >= {"diff", "ci_low", "ci_high"}
    assert (tmp / "committed" / "test_scored.json").is_file() and (tmp / "committed" / "learning_curves.png").is_file()
    out = check(run_job([sys.executable, SWEEP, "--recipe", tmp / "tiny_sweep.yaml", "--dry-run"], 120)).stdout
    assert out.count("[done]") == 3 and "(measured)" in out


@pytest.mark.slow
def test_a_killed_sweep_finishes_only_the_remaining_cells(slurm_sweep, tmp_path):
    recipe = write_spec(tmp_path, grid=E2E_GRID)
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
    lines = train_lines(tmp_path)
    assert lines[:3] == [lines[0], second, second] and len(lines) == 4 and len(set(lines)) == 3
    assert "resumed from" in (tmp_path / "runs" / second / "train.log").read_text()
    assert (tmp_path / "committed" / "sweep.md").read_text() == (slurm_sweep / "committed" / "sweep.md").read_text()


@pytest.mark.slow
def test_the_table_is_rebuilt_from_the_committed_files_alone(slurm_sweep, tmp_path):
    shutil.copytree(slurm_sweep / "committed", tmp_path / "committed")
    (tmp_path / "committed" / "sweep.md").unlink()
    recipe = write_spec(tmp_path, grid=E2E_GRID)  # output_dir tmp_path/runs does not exist: no run directory at all
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
