"""The sweep's table: validation selection per method, then test scores with user-level paired intervals.

Reads only the committed files (`<commit_dir>/cells/<id>/`, `<commit_dir>/step0/`), so a clone of the repository
rebuilds `<commit_dir>/sweep.md` and `sweep.json` without any run directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from perce_ds.sweep import targets
from perce_ds.sweep.bootstrap import __doc__ as INTERVAL_METHOD
from perce_ds.sweep.bootstrap import paired_user_bootstrap, per_user, point, user_index
from perce_ds.sweep.cells import RETRAINED, SweepError, committed_dir, method_key, read_json, read_jsonl
from perce_ds.sweep.scoring import ALL
from perce_ds.sweep.select import MethodSelection
from perce_ds.sweep.spec import SweepSpec

NLL_CLASSES = ("persona", "copy", "infer", "infer_heldout", "other", ALL)
ACC_CLASSES = ("persona", "other", ALL)
GEN_METRICS = (("rougeL", "ROUGE-L"), ("meteor", "METEOR"))
# Per-record statistics of the same greedy generations (issue 16 item 4): a method that wins ROUGE by writing
# longer or never stopping shows it here. end_of_turn: 1 when the generation stopped on EOS / end of turn.
GEN_STATS = (("generated_tokens", "generated tokens (mean)"), ("end_of_turn", "end-of-turn rate (x100)"))
PERCENT = ("rougeL", "meteor", "end_of_turn")  # shown x100


def load_scores(test_dir: Path) -> dict[str, dict[str, Any]]:
    """record_id -> {"user", class: [nll, hits, tokens], "rougeL", "meteor", "generated_tokens", "end_of_turn"}
    of one scored model (the last two when the generations recorded their length and finish reason)."""
    if not (test_dir / "tokens.json").is_file():
        raise SweepError(f"{test_dir}: no test scores (tokens.json); run the sweep (without --only-aggregate) first")
    rows = read_json(test_dir / "tokens.json")
    for g in read_jsonl(test_dir / "generation_per_record.jsonl"):
        if g["record_id"] in rows:
            rows[g["record_id"]].update({m: g[m] for m, _ in GEN_METRICS})
            if g.get("finish_reason") is not None:
                rows[g["record_id"]].update(generated_tokens=float(g["n_generated_tokens"]),
                                            end_of_turn=float(g["finish_reason"] == "stop"))  # fmt: skip
    return rows


def _arrays(
    models: list[dict[str, dict[str, Any]]], ids: list[str], metric: tuple[str, str]
) -> tuple[np.ndarray, np.ndarray]:
    """[seeds, records] numerator and denominator of `metric` ((kind, class) or (generation metric, ""))."""
    kind, cls = metric
    num = np.zeros((len(models), len(ids)))
    den = np.zeros_like(num)
    for s, rows in enumerate(models):
        for r, rid in enumerate(ids):
            row = rows[rid]
            if kind in ("nll", "acc"):
                num[s, r], den[s, r] = row[cls][0 if kind == "nll" else 1], row[cls][2]
            else:
                num[s, r], den[s, r] = row.get(kind, 0.0), 1.0
    return num, den


def test_table(spec: SweepSpec, methods: list[MethodSelection], root: Path, n_resamples: int = 2000) -> dict[str, Any]:
    """Per metric: the starting model's value, each method's (mean over its seeds) and its difference to the
    first method with a user-level paired 95 % interval."""
    scored = {m.label: [load_scores(committed_dir(spec, c, root) / "test") for c in m.selected] for m in methods}
    step0 = load_scores(root / spec.commit_dir / "step0" / "test")
    ids = sorted(step0)
    for label, models in scored.items():
        for rows in models:
            if sorted(rows) != ids:
                raise SweepError(f"method {label}: its test scores cover other records than the starting model's")
    users, idx = user_index([step0[r]["user"] for r in ids])
    metrics: list[tuple[str, str]] = [("nll", c) for c in NLL_CLASSES if step0[ids[0]].get(c) is not None]
    metrics = [m for m in metrics if sum(step0[r][m[1]][2] for r in ids) > 0]
    metrics += [("acc", c) for c in ACC_CLASSES if ("nll", c) in metrics]
    metrics += [(m, "") for m, _ in (*GEN_METRICS, *GEN_STATS) if all(m in step0[r] for r in ids)]
    base = methods[0].label
    source = stage_sources(spec, methods)
    rows = []
    for metric in metrics:
        n0, d0 = (per_user(a, idx, len(users)) for a in _arrays([step0], ids, metric))
        sums = {
            lab: tuple(per_user(a, idx, len(users)) for a in _arrays(models, ids, metric))
            for lab, models in scored.items()
        }
        row: dict[str, Any] = {"metric": metric[0], "class": metric[1] or None, "tokens": int(d0.sum()) if metric[0] == "nll" else None,
                               "step0": point(n0, d0), "methods": {}}  # fmt: skip
        for m in methods:
            entry: dict[str, Any] = {"value": point(*sums[m.label]), "seeds": [c.seed for c in m.selected]}
            if m.label != base:
                entry["vs_base"] = paired_user_bootstrap(sums[base], sums[m.label], n_resamples)
            if m.label in source:  # a knob: its effect on the method it modifies, same users, same intervals
                entry["vs_source"] = paired_user_bootstrap(sums[source[m.label]], sums[m.label], n_resamples)
            row["methods"][m.label] = entry
        rows.append(row)
    table = {"rows": rows, "base": base, "n_users": len(users), "n_records": len(ids), "sources": source}
    table["targets"] = targets.judge(spec, methods, table)
    return table


def stage_sources(spec: SweepSpec, methods: list[MethodSelection]) -> dict[str, str]:
    """label of each later stage's method -> label of the grid method it modifies (its stage's lr_from)."""
    label_of = {m.key: m.label for m in methods}
    lr_from = {st.name: method_key(st.lr_from) for st in spec.stages}
    return {m.label: label_of[lr_from[m.stage]] for m in methods if m.stage in lr_from and lr_from[m.stage] in label_of}


def _name(row: dict[str, Any]) -> str:
    if row["metric"] == "nll":
        return f"NLL, {row['class']} tokens ({row['tokens']})"
    if row["metric"] == "acc":
        return f"accuracy, {row['class']} tokens"
    if row["metric"] in dict(GEN_STATS):
        return dict(GEN_STATS)[row["metric"]]
    return dict(GEN_METRICS)[row["metric"]] + " (x100, greedy)"


def _scale(metric: str) -> tuple[float, int]:
    """How a metric is shown: x100 with 2 decimals (ROUGE-L, METEOR, end-of-turn rate), else as is."""
    return (100.0, 2) if metric in PERCENT else (1.0, 1 if metric == "generated_tokens" else 3)


def _fmt(x: float | None, scale: float, digits: int, sign: bool = False) -> str:
    return "n/a" if x is None else f"{scale * x:{'+' if sign else ''}.{digits}f}"


def render(
    spec: SweepSpec, methods: list[MethodSelection], table: dict[str, Any] | None, retrains: list[str] = ()
) -> str:
    """Markdown: the validation selection (and the cells retrained before test scoring), then the test table (when
    scored)."""
    lines = [f"# Sweep {spec.name}: validated comparison", "",
             f"Base recipe `{spec.base}`; selection on the validation split by `{spec.select_metric}` "
             f"({'lower' if spec.select_mode == 'min' else 'higher'} is better): per method, the learning rate with the "
             "best mean over seeds of each run's best validation value, and each run's best validation checkpoint "
             "(hf_best). The test split was scored once, after selection.", *_confirm_note(spec), "",
             "## Validation selection", "", f"| method | stage | lr | mean best {spec.select_metric} | per seed (value @ step) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for m in methods:
        if m.selected_lr is None:
            lines.append(f"| {m.label} | {m.stage} | pending | | |")
            continue
        for lr, entry in m.by_lr.items():
            mark = " **(selected)**" if lr == m.selected_lr else ""
            lines.append(f"| {m.label} | {m.stage} | {lr:g}{mark} | {entry['mean']:.4f} | {_run_text(entry['runs'])} |")
        if m.confirm:
            lines.append(_confirm_row(m))
    if retrains:
        lines += ["", "Retrained before test scoring (same definition and seed; their models were not on the scoring "
                  "machine; the first runs' files are in `cells/<id>/first_run/`; the table uses the retrains):", "",
                  *retrains]  # fmt: skip
    if table is None:
        why = "every cell must be done first" if not all(m.complete for m in methods) else "run the sweep to score it"
        return "\n".join(lines) + f"\n\nTest split: not scored yet ({why}).\n"
    base = table["base"]
    head = ["test split", "step 0", *(m.label for m in methods)]
    lines += ["", f"## Test ({table['n_records']} records of {table['n_users']} users)", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for row in table["rows"]:
        scale, digits = _scale(row["metric"])
        cells = [_name(row), _fmt(row["step0"], scale, digits)]
        for m in methods:
            e = row["methods"][m.label]
            text = _fmt(e["value"], scale, digits)
            if m.label != base and e["vs_base"]["diff"] is not None:
                d = e["vs_base"]
                text += f" ({_fmt(d['diff'], scale, digits, True)} [{_fmt(d['ci_low'], scale, digits, True)}, {_fmt(d['ci_high'], scale, digits, True)}])"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Differences: method - {base} (mean over each method's seeds), 95 % interval:"
        + INTERVAL_METHOD.split("\n", 1)[1],
    ]
    lines += targets.render(table["targets"], spec.select_metric)
    lines += _knob_lines(methods, table)
    return "\n".join(lines) + "\n"


def _knob_lines(methods: list[MethodSelection], table: dict[str, Any]) -> list[str]:
    """Each later stage's method against the method it modifies, on test: what the knob moves, and by how much."""
    knobs = [m.label for m in methods if m.label in table.get("sources", {})]
    if not knobs:
        return []
    lines = ["", "## Knobs against the method they modify (test)", "",
             "| test split | " + " | ".join(f"{k} - {table['sources'][k]}" for k in knobs) + " |",
             "|" + "---|" * (len(knobs) + 1)]  # fmt: skip
    for row in table["rows"]:
        scale, digits = _scale(row["metric"])
        cells = []
        for k in knobs:
            d = row["methods"][k].get("vs_source") or {}
            cells.append("n/a" if d.get("diff") is None else f"{_fmt(d['diff'], scale, digits, True)} "
                         f"[{_fmt(d['ci_low'], scale, digits, True)}, {_fmt(d['ci_high'], scale, digits, True)}]")  # fmt: skip
        lines.append(f"| {_name(row)} | " + " | ".join(cells) + " |")
    return lines + ["", "Same user-level paired intervals as above, between the knob's runs and its method's."]


def retrain_lines(spec: SweepSpec, methods: list[MethodSelection], root: Path) -> list[str]:
    """One line per selected cell with a retrained.json: both runs' best validation value and step."""
    lines = []
    for cell in (c for m in methods for c in m.selected):
        path = committed_dir(spec, cell, root) / RETRAINED
        if path.is_file():
            r = read_json(path)
            first, again = r["first_run"], r["retrain"]
            lines.append(f"- `{cell.id}`: {spec.select_metric} {first['value']:.4f} @ {first['step']} (first run) -> "
                         f"{again['value']:.4f} @ {again['step']} (retrain)")  # fmt: skip
    return lines


def _confirm_note(spec: SweepSpec) -> list[str]:
    """The seed protocol, stated under the header of a sweep with confirm_seeds (nothing otherwise)."""
    if not spec.confirm_seeds:
        return []
    return [f"The learning rate is selected with seeds {spec.seeds} only; each grid method's selected lr is then "
            f"trained with seeds {spec.confirm_seeds} (stage confirm: they do not change the choice), and the test "
            "split scores all seeds at that lr. The recipe's stages train every seed at their lr_from method's lr."]  # fmt: skip


def _run_text(runs: dict[str, Any]) -> str:
    return ", ".join(f"s{r['seed']}: {r['value']:.4f} @ {r['step']}" for r in runs.values())


def _confirm_row(m: MethodSelection) -> str:
    """The selected lr over all seeds: the selecting runs with the confirmation runs (pending while one is not done)."""
    if not m.complete:
        done = f" ({_run_text(m.confirm_runs)} done)" if m.confirm_runs else ""
        return f"| {m.label} | confirm | {m.selected_lr:g} | pending{done} | |"
    return f"| {m.label} | grid + confirm | {m.selected_lr:g} (all seeds) | {m.selected_mean():.4f} | {_run_text(m.selected_runs())} |"


def write_report(spec: SweepSpec, methods: list[MethodSelection], table: dict[str, Any] | None, root: Path) -> Path:
    """<commit_dir>/sweep.md and sweep.json; returns the Markdown's path."""
    out = root / spec.commit_dir
    out.mkdir(parents=True, exist_ok=True)
    seeds = bool(spec.confirm_seeds)  # which seeds chose the lr and which confirmed it (recorded with confirm_seeds)
    select: dict[str, Any] = {"metric": spec.select_metric, "mode": spec.select_mode}
    if seeds:
        select.update(seeds=spec.seeds, confirm_seeds=spec.confirm_seeds)
    data = {"sweep": spec.name, "base_recipe": str(spec.base), "select": select,
            "methods": [m.to_dict(seeds) for m in methods], "test": table}  # fmt: skip
    (out / "sweep.json").write_text(json.dumps(data, indent=2, sort_keys=True))
    (out / "sweep.md").write_text(render(spec, methods, table, retrain_lines(spec, methods, root)))
    return out / "sweep.md"
