"""Per-token PIR views of a run: HTML heat map, top personal tokens, PIR F1 on the synthetic task.

    python launch/insight.py --run runs/NAME [--before HF_FOLDER] [--split eval|test] [--samples 8] [--threshold 0]

Writes <run>/insight/index.html, insight.json and pir_hist.png. "Before" is --before when given (e.g. an
initial model saved by the demo), else the pretrained start of the run, else a re-initialisation from
model.config with the run's seed (same distribution, not the identical weights).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--model", help="HF folder (default <run>/hf)")
    p.add_argument("--before", help="HF folder of the model before training")
    p.add_argument("--no-before", action="store_true", help="skip the before-training pass")
    p.add_argument("--split", default="eval", choices=["eval", "test"])
    p.add_argument("--samples", type=int, default=8, help="records shown in the HTML page")
    p.add_argument("--threshold", type=float, default=0.0, help="PIR above this marks a personal token")
    p.add_argument("--limit", type=int, default=0, help="only the first N records")
    args = p.parse_args(argv)
    from perce_ds.insight import run_insight

    summary = run_insight(args.run, args.model, args.before, args.split, args.samples, args.threshold,
                          args.limit, not args.no_before)  # fmt: skip
    for stage in ("before", "after"):
        s = summary.get(stage)
        if s and "marking" in s:
            m, b = s["marking"], s["selected"]
            print(f"{stage}: PIR>{m['threshold']:g} F1 {m['f1']:.3f} (P {m['precision']:.3f}, R {m['recall']:.3f}; "
                  f"random marking at the same rate {m['random_f1']:.3f}); threshold {b['threshold']:.3f} "
                  f"(chosen on {'validation' if b['threshold_from'] == 'validation' else 'this split'}) "
                  f"F1 {b['f1']:.3f} (random {b['random_f1']:.3f})")  # fmt: skip
    print("top personal tokens:", json.dumps(summary["top_personal_tokens"])[:600])
    print(f"wrote {args.run / 'insight'}/index.html, insight.json, pir_hist.png")
    return 0


if __name__ == "__main__":
    from perce_ds.cli import exit_code_of

    sys.exit(exit_code_of(main))
