"""The sweep recipe: a base training recipe, a grid over dotted config keys, seeds, later stages, selection.

    name: persona_smollm2                  # default: the file name without _sweep
    base: recipes/persona_smollm2.yaml     # the training recipe every cell starts from
    overrides: {train.epochs: 3}           # applied to every cell (before the grid's keys)
    grid: {loss.scheme: [ce, perce], train.lr: [1.0e-5, 3.0e-5, 1.0e-4]}   # every combination, in this order
    seeds: [1, 2]                          # train.seed of each grid cell: the learning rate is selected from these
    confirm_seeds: []                      # optional: each grid method's selected lr trained again with these seeds
    stages:                                # run after the grid, at a method's selected learning rate
      - name: perce_knobs
        lr_from: {loss.scheme: perce}      # the grid method whose selected train.lr these cells take
        variants: [{loss.clip_max: 2.0}, {loss.ce_mix: 0.5}]
    select: {metric: eval_ce, mode: min}   # or {metric: rougeL, mode: max}: validation generations
    evaluate: {max_new_tokens: 64, test_data: []}   # test_data: the test split's files (file data)
    num_gpus: 2                            # 1: `python launch/train.py`, else `deepspeed --num_gpus N`
    deepspeed: ds_configs/zero3.json
    output_dir: runs/sweeps/persona_smollm2          # big artefacts (git-ignored)
    commit_dir: benchmarks/sweeps/persona_smollm2    # cells/<id>/ small files, table, plots (committed)
    cost: {step_seconds: 0.5, eval_seconds: 30, startup_seconds: 30}   # --dry-run's figures before a cell ran

Paths are relative to the repository root. A method is a cell's overrides without train.lr and train.seed.

`confirm_seeds` (default none; integers, none of them in `seeds`) splits the seeds in two: the grid trains every
learning rate with `seeds` only and each grid method's lr is chosen from those runs alone, then the "confirm"
stage trains the selected lr with each confirm seed (the cell the grid would have had with that seed: same id and
config hash). The lr cannot change when these finish; the method's result (test, table) is all seeds at that lr,
complete once they are done. Pipeline order: grid, confirm, then `stages`. A stage's cells take its lr_from method's lr as
soon as it is selected (they do not wait for confirmation) and train every seed, `seeds` + `confirm_seeds`: no lr
is chosen there, so no seed is set aside for choosing it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from perce_ds.errors import UserError

LR_KEY, SEED_KEY = "train.lr", "train.seed"
GRID_STAGE, CONFIRM_STAGE = "grid", "confirm"  # the names of the pipeline's own stages (before the recipe's)
TOP_KEYS = {"name", "base", "overrides", "grid", "seeds", "confirm_seeds", "stages", "select", "evaluate",
            "num_gpus", "deepspeed", "output_dir", "commit_dir", "cost"}  # fmt: skip
SELECT_METRICS = {"eval_ce": "min", "rougeL": "max", "meteor": "max"}


class SweepSpecError(UserError, ValueError):
    """A sweep recipe that cannot be used; the message names the file and the key."""


@dataclass
class Stage:
    """Cells trained after the grid at the learning rate selected for the grid method `lr_from`."""

    name: str
    lr_from: dict[str, Any]
    variants: list[dict[str, Any]]


@dataclass
class SweepSpec:
    path: Path
    name: str
    base: Path
    overrides: dict[str, Any]
    grid: dict[str, list[Any]]
    seeds: list[int]
    confirm_seeds: list[int] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    select_metric: str = "eval_ce"
    select_mode: str = "min"
    max_new_tokens: int = 64
    test_data: list[str] = field(default_factory=list)
    num_gpus: int = 1
    deepspeed: Path = Path("ds_configs/zero3.json")
    output_dir: Path = Path("runs/sweeps")
    commit_dir: Path = Path("benchmarks/sweeps")
    step_seconds: float | None = None
    eval_seconds: float = 60.0
    startup_seconds: float = 30.0

    @property
    def all_seeds(self) -> list[int]:
        """Every seed a method's result has: the selection seeds, then the confirmation seeds."""
        return [*self.seeds, *self.confirm_seeds]

    def stage_names(self) -> list[str]:
        """The pipeline's stages in order (index = `--stage`): the grid, confirmation when any, the recipe's."""
        return [GRID_STAGE, *([CONFIRM_STAGE] if self.confirm_seeds else []), *(st.name for st in self.stages)]

    def grid_overrides(self) -> list[dict[str, Any]]:
        """Every combination of the grid's values (keys in the recipe's order), without the seed."""
        keys = list(self.grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.grid[k] for k in keys))]

    def grid_methods(self) -> list[dict[str, Any]]:
        """The grid's methods in order (first: the baseline every interval is against)."""
        out: list[dict[str, Any]] = []
        for o in self.grid_overrides():
            m = method_of(o)
            if m not in out:
                out.append(m)
        return out


def method_of(overrides: dict[str, Any]) -> dict[str, Any]:
    """A cell's method: its overrides without the learning rate and the seed."""
    return {k: v for k, v in overrides.items() if k not in (LR_KEY, SEED_KEY)}


def _number(value: Any) -> Any:
    """YAML 1.1 reads 1e-5 as a string: make numbers numbers, so cell ids and hashes do not depend on spelling."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


# Keys every cell's command sets itself (perce_ds/sweep/cells.py train_command): a recipe naming one would be
# silently replaced, so it is refused.
SWEEP_OWNED_KEYS = ("train.output_dir", "train.run_name", "train.resume", "train.keep_best", "train.keep_best_mode")


def _dotted(mapping: Any, where: str) -> dict[str, Any]:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and "." in k for k in mapping):
        raise SweepSpecError(f"{where}: expected a mapping of dotted config keys (section.key: value)")
    owned = sorted(set(mapping) & set(SWEEP_OWNED_KEYS))
    if owned:
        raise SweepSpecError(f"{where}: {owned[0]} is set by the sweep for every cell (output_dir / commit_dir and "
                             "select.metric decide it); remove it")  # fmt: skip
    return {k: _number(v) for k, v in mapping.items()}


def load_spec(path: str | Path, root: Path) -> SweepSpec:
    """Read and check a sweep recipe; relative paths in it are relative to `root` (the repository)."""
    path = Path(path)
    if not path.is_file():
        raise SweepSpecError(f"sweep recipe {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise SweepSpecError(f"{path}: the top level must be a mapping")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise SweepSpecError(f"{path}: unknown key {unknown[0]!r}; known: {sorted(TOP_KEYS)}")
    if "base" not in raw or not (root / raw["base"]).is_file():
        raise SweepSpecError(f"{path}: base must name an existing training recipe, got {raw.get('base')!r}")
    grid = _dotted(raw.get("grid"), f"{path}: grid")
    if not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise SweepSpecError(f"{path}: grid must map each dotted key to a non-empty list of values")
    grid = {k: [_number(v) for v in values] for k, values in grid.items()}
    if SEED_KEY in grid:
        raise SweepSpecError(f"{path}: grid: give the seeds with `seeds:`, not {SEED_KEY}")
    seeds = _seeds(raw.get("seeds", [42]), f"{path}: seeds", allow_empty=False)
    confirm = raw.get("confirm_seeds")
    confirm_seeds = _seeds([] if confirm is None else confirm, f"{path}: confirm_seeds", allow_empty=True)
    if set(seeds) & set(confirm_seeds):
        raise SweepSpecError(f"{path}: confirm_seeds {sorted(set(seeds) & set(confirm_seeds))} are also in seeds: "
                             "a confirmation seed must be one the selection did not see; remove it from one list")  # fmt: skip
    if confirm_seeds and LR_KEY not in grid:
        raise SweepSpecError(f"{path}: confirm_seeds confirm a selected learning rate: put {LR_KEY} in the grid")
    name = raw.get("name") or path.stem.removesuffix("_sweep")
    spec = SweepSpec(path=path, name=name, base=Path(raw["base"]), overrides=_dotted(raw.get("overrides"), f"{path}: overrides"),
                     grid=grid, seeds=seeds, confirm_seeds=confirm_seeds, num_gpus=int(raw.get("num_gpus", 1)),
                     deepspeed=Path(raw.get("deepspeed", "ds_configs/zero3.json")),
                     output_dir=Path(raw.get("output_dir", f"runs/sweeps/{name}")),
                     commit_dir=Path(raw.get("commit_dir", f"benchmarks/sweeps/{name}")))  # fmt: skip
    _read_select(spec, raw.get("select") or {}, path)
    _read_evaluate(spec, raw.get("evaluate") or {}, path)
    cost = raw.get("cost") or {}
    spec.step_seconds = cost.get("step_seconds")
    spec.eval_seconds = float(cost.get("eval_seconds", 60.0))
    spec.startup_seconds = float(cost.get("startup_seconds", 30.0))
    methods = spec.grid_methods()
    for i, st in enumerate(raw.get("stages") or []):
        where = f"{path}: stages[{i}]"
        if not isinstance(st, dict) or not {"name", "lr_from", "variants"} <= set(st):
            raise SweepSpecError(f"{where}: needs name, lr_from and variants")
        if str(st["name"]) in (GRID_STAGE, CONFIRM_STAGE):
            raise SweepSpecError(f"{where}: name {st['name']!r} is the sweep's own stage; choose another name")
        if LR_KEY not in grid:
            raise SweepSpecError(f"{where}: lr_from needs {LR_KEY} in the grid")
        lr_from = _dotted(st["lr_from"], f"{where}.lr_from")
        if lr_from not in methods:
            raise SweepSpecError(f"{where}: lr_from {lr_from} is not a method of the grid; its methods: {methods}")
        variants = [_dotted(v, f"{where}.variants[{j}]") for j, v in enumerate(st["variants"] or [])]
        if not variants or any(LR_KEY in v or SEED_KEY in v for v in variants):
            raise SweepSpecError(f"{where}: variants must be non-empty mappings without {LR_KEY} / {SEED_KEY}")
        spec.stages.append(Stage(str(st["name"]), lr_from, variants))
    return spec


def _seeds(value: Any, where: str, allow_empty: bool) -> list[int]:
    """A list of distinct integer seeds (a YAML `true` is not a seed)."""
    ok = isinstance(value, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in value)
    if not ok or (not value and not allow_empty) or len(set(value)) != len(value):
        kind = "a list" if allow_empty else "a non-empty list"
        raise SweepSpecError(f"{where}: must be {kind} of distinct integers, got {value!r}")
    return value


def _read_select(spec: SweepSpec, raw: dict[str, Any], path: Path) -> None:
    spec.select_metric = raw.get("metric", "eval_ce")
    if spec.select_metric not in SELECT_METRICS and not spec.select_metric.startswith("eval_"):
        raise SweepSpecError(
            f"{path}: select.metric {spec.select_metric!r}: use an eval_metrics.jsonl key (eval_ce, eval_nll_persona, "
            f"...) or a validation generation score ({', '.join(k for k in SELECT_METRICS if not k.startswith('eval'))})"
        )
    spec.select_mode = raw.get("mode", SELECT_METRICS.get(spec.select_metric, "min"))
    if spec.select_mode not in ("min", "max"):
        raise SweepSpecError(f"{path}: select.mode must be min or max, got {spec.select_mode!r}")


def _read_evaluate(spec: SweepSpec, raw: dict[str, Any], path: Path) -> None:
    unknown = sorted(set(raw) - {"max_new_tokens", "test_data"})
    if unknown:
        raise SweepSpecError(f"{path}: evaluate: unknown key {unknown[0]!r} (known: max_new_tokens, test_data)")
    spec.max_new_tokens = int(raw.get("max_new_tokens", 64))
    spec.test_data = [str(p) for p in raw.get("test_data") or []]


def base_recipe_text(spec: SweepSpec, root: Path) -> str:
    """The base recipe's text (part of every cell's config hash: an edited base recipe is a different cell)."""
    return (root / spec.base).read_text()


def dump_overrides(overrides: dict[str, Any]) -> str:
    """Stable text of overrides (hashing, display)."""
    return yaml.safe_dump(overrides, sort_keys=True, default_flow_style=True, width=10**6).strip()
