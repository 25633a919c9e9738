"""Command-line helpers shared by the launch/ scripts."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from perce_ds.config import ConfigError
from perce_ds.errors import UserError
from perce_ds.logging_utils import log_to_files_only

USER_ERROR_EXIT_CODE = 2


def exit_code_of(main: Callable[[], int]) -> int:
    """Run an entry point; a UserError (perce_ds/errors.py: config key or type, missing file, bad record, unusable
    dataset) becomes its one-line message on stderr and exit code 2, its traceback only in the log file
    (train.log, when the run got that far). Any other exception is a bug and propagates with its traceback."""
    try:
        return main()
    except UserError as e:
        log_to_files_only(f"stopped by a user error: {e}", e)
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE


def parse_overrides(args: list[str]) -> list[str]:
    """`--a.b value` / `--a.b=value` pairs into `a.b=value` strings for RunConfig.load."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise ConfigError(f"unrecognised argument {arg!r}: overrides look like --section.key value")
        if "=" in arg:
            out.append(arg[2:])
            i += 1
        elif i + 1 < len(args):
            out.append(f"{arg[2:]}={args[i + 1]}")
            i += 2
        else:
            raise ConfigError(f"override {arg} has no value")
    return out


def print_summary(summary: dict[str, Any]) -> None:
    """The few lines a person reads at the end of a run."""

    def fmt(x: Any) -> str:
        return f"{x:.4f}" if isinstance(x, float) else "n/a"

    final, ev = summary.get("final") or {}, summary.get("eval") or {}
    print(f"run directory: {summary['run_dir']}")
    print(
        f"scheme {summary['scheme']}, {summary['steps']} steps on {summary['world_size']} rank(s); "
        f"final train loss {fmt(final.get('loss'))}, CE {fmt(final.get('ce'))}; refused steps {summary['refused_steps']}"
    )
    print(
        f"eval CE with profile {fmt(ev.get('eval_ce'))} vs without {fmt(ev.get('eval_ce_ablated'))}; "
        f"mean PIR on persona tokens {fmt(ev.get('eval_pir_persona_tokens'))} vs other tokens "
        f"{fmt(ev.get('eval_pir_other_tokens'))}"
    )
    if ev.get("summary_lines"):
        print(ev["summary_lines"])
    skipped = summary.get("records_skipped", {})
    if any(skipped.values()):
        print(f"records skipped as bad: {skipped}")
