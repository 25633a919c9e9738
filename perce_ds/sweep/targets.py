"""The comparison's targets, declared before any result (issue 16) and judged on the test table.

The challenger is the best-validated method other than the baseline (the grid's first method): the best mean, over
all its seeds at its selected lr, of each run's best validation value of `select.metric`. Validation picks it, so
the test split cannot. Against the baseline, on test, with the user-level paired intervals of the table:
  - persona-token NLL lower, its interval excluding 0 (upper end < 0);
  - other-token NLL within 5 % (relative difference of the point estimates <= +5 %);
  - ROUGE-L and METEOR not lower: the interval reaches 0 or above (upper end >= 0).
A target whose row the table lacks (data without persona spans, e.g. commit subjects) is not applicable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from perce_ds.sweep.select import MethodSelection
from perce_ds.sweep.spec import SweepSpec

# (metric, class, what is required, test on the table's vs_base entry {diff, ci_low, ci_high, rel})
TARGETS: tuple[tuple[str, str | None, str, Callable[[dict[str, Any]], bool]], ...] = (
    ("nll", "persona", "lower, interval excluding 0", lambda d: d["ci_high"] < 0),
    ("nll", "other", "within +5 % (relative)", lambda d: d["rel"] is not None and d["rel"] <= 0.05),
    ("rougeL", None, "not lower (interval reaching 0 or above)", lambda d: d["ci_high"] >= 0),
    ("meteor", None, "not lower (interval reaching 0 or above)", lambda d: d["ci_high"] >= 0),
)


def challenger(spec: SweepSpec, methods: list[MethodSelection]) -> MethodSelection | None:
    """The best-validated method other than the baseline (ties: the earlier method)."""
    sign = 1.0 if spec.select_mode == "min" else -1.0
    scored = [(sign * v, i, m) for i, m in enumerate(methods[1:]) if (v := m.selected_mean()) is not None]
    return min(scored, key=lambda t: (t[0], t[1]))[2] if scored else None


def judge(spec: SweepSpec, methods: list[MethodSelection], table: dict[str, Any]) -> dict[str, Any]:
    """{"challenger", "validation", "targets": [{metric, class, required, diff, ci_low, ci_high, rel, met}]}."""
    best = challenger(spec, methods)
    if best is None:
        return {"challenger": None, "targets": []}
    rows = {(r["metric"], r["class"]): r for r in table["rows"]}
    out = []
    for metric, cls, required, test in TARGETS:
        row = rows.get((metric, cls))
        entry: dict[str, Any] = {"metric": metric, "class": cls, "required": required, "met": None}
        d = row["methods"][best.label].get("vs_base") if row else None
        if d is not None and d["diff"] is not None:
            entry.update(d, met=bool(test(d)))
        out.append(entry)
    values = {m.label: m.selected_mean() for m in methods}
    return {"challenger": best.label, "baseline": table["base"], "validation": values, "targets": out}


def render(result: dict[str, Any], select_metric: str) -> list[str]:
    """Markdown lines: which method was judged, why, and each target's verdict."""
    if not result["challenger"]:
        return []
    chosen = ", ".join(f"{k} {v:.4f}" for k, v in result["validation"].items() if v is not None)
    lines = ["", "## Targets (declared before the results)", "",
             f"Challenger: **{result['challenger']}**, the best-validated method other than {result['baseline']} "
             f"(mean best validation {select_metric} over all seeds at the selected lr: {chosen}).", "",
             "| target | required | difference [95 % interval] | met |", "|---|---|---|---|"]  # fmt: skip
    for t in result["targets"]:
        name = (
            f"NLL, {t['class']} tokens"
            if t["metric"] == "nll"
            else {"rougeL": "ROUGE-L", "meteor": "METEOR"}[t["metric"]]
        )
        scale = 1.0 if t["metric"] == "nll" else 100.0
        if t["met"] is None:
            lines.append(f"| {name} | {t['required']} | n/a (not in the table) | n/a |")
            continue
        rel = f", {100 * t['rel']:+.1f} %" if t["metric"] == "nll" and t.get("rel") is not None else ""
        diff = f"{scale * t['diff']:+.3f} [{scale * t['ci_low']:+.3f}, {scale * t['ci_high']:+.3f}]{rel}"
        lines.append(f"| {name} | {t['required']} | {diff} | {'yes' if t['met'] else '**no**'} |")
    return lines
