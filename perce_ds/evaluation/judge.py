"""LLM-as-judge: a personalisation score and a quality score per generated answer, from a versioned rubric.

The rubric (judge_prompts/<version>.txt: a system line, `---`, the user message with <<PROFILE>>, <<QUERY>>,
<<REFERENCE>> and <<ANSWER>>, and optionally `---` and a reply prefix that judges whose chat template is ours
(hf, vllm) are given as the start of their reply: a small judge then continues the format instead of
restating the rubric; an openai judge, whose template is the server's, gets the format from the instructions) shows the judge the profile items retrieved into the model's prompt,
the request, the reference and the answer (think block removed, as the metrics score it). Scores are integers
on SCALE. The judge must answer with two lines `personalisation: N` / `quality: N` (a JSON object with the
same keys is read too); an answer without both, with an out-of-scale value or with conflicting values is
malformed and asked again (with a reminder of the format, sampled so that a retry can differ) up to
`max_attempts` times, then counted as unscored: never dropped, never guessed.

Every verdict, scored or not, is cached in a JSONL file keyed by (judge model id, prompt version, record id,
answer hash): re-judging an evaluation asks the judge only about answers it has not seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from perce_ds.errors import UserError
from perce_ds.evaluation.metrics import bootstrap_ci

log = logging.getLogger("perce_ds")
PROMPT_DIR = Path(__file__).resolve().parent / "judge_prompts"
DEFAULT_PROMPT_VERSION = "v1"
SCALE = (1, 5)
JUDGE_METRICS = ("personalisation", "quality")
PLACEHOLDERS = ("<<PROFILE>>", "<<QUERY>>", "<<REFERENCE>>", "<<ANSWER>>")
NO_PROFILE = "(no profile items: the user's profile was empty or nothing of it fit the prompt)"
REMINDER = (
    "\n\nYour previous reply did not follow the required format. Reply with exactly these two lines and nothing "
    "else:\npersonalisation: <an integer from 1 to 5>\nquality: <an integer from 1 to 5>"
)
_LABEL_RE = {
    "personalisation": re.compile(r"personali[sz]ation\W{0,4}?\s*[:=]\s*[\"'*]*\s*(\d+)", re.IGNORECASE),
    "quality": re.compile(r"quality\W{0,4}?\s*[:=]\s*[\"'*]*\s*(\d+)", re.IGNORECASE),
}


class JudgeError(UserError, ValueError):
    """A judge spec, rubric or evaluation directory the judge cannot work with."""


@dataclass(frozen=True)
class Rubric:
    version: str
    system: str
    template: str
    reply_prefix: str = ""

    def render(self, profile: str, query: str, reference: str, answer: str) -> str:
        text = self.template
        for key, value in zip(PLACEHOLDERS, (profile or NO_PROFILE, query, reference, answer)):
            text = text.replace(key, value.strip())
        return text


def load_rubric(version: str = DEFAULT_PROMPT_VERSION) -> Rubric:
    """The rubric judge_prompts/<version>.txt; JudgeError naming the known versions when there is none."""
    path = PROMPT_DIR / f"{version}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in PROMPT_DIR.glob("*.txt"))
        raise JudgeError(f"--prompt-version {version!r}: no {path}; known versions: {known}")
    system, sep, rest = path.read_text(encoding="utf-8").partition("\n---\n")
    template, _, prefix = rest.partition("\n---\n")
    missing = [k for k in PLACEHOLDERS if k not in template]
    if not sep or missing:
        raise JudgeError(f"{path}: expected a system line, a '---' line, then a template with {list(PLACEHOLDERS)}")
    return Rubric(version, system.strip(), template.strip(), prefix.strip())


def parse_verdict(text: str) -> dict[str, int] | None:
    """{"personalisation": n, "quality": n} from a judge's reply, or None when it is malformed: a label missing,
    a value off SCALE, or one label given two different values."""
    out = {}
    for metric, pattern in _LABEL_RE.items():
        values = {int(v) for v in pattern.findall(text or "")}
        if len(values) != 1:
            return None
        (value,) = values
        if not SCALE[0] <= value <= SCALE[1]:
            return None
        out[metric] = value
    return out


class JudgeModel(Protocol):
    """What answers the rubric: `model_id` names the judge in caches and reports; `ask` returns one reply per
    prompt (system + user message), starting with `reply_prefix` when the judge could be given it as the start of
    its reply. `attempt` 0 is greedy; later attempts sample (seeded by the attempt)."""

    model_id: str

    def ask(self, system: str, prompts: list[str], attempt: int, reply_prefix: str = "") -> list[str]: ...


@dataclass
class JudgeItem:
    record_id: str
    task: str
    profile: str
    query: str
    reference: str
    answer: str


@dataclass
class Verdict:
    record_id: str
    task: str
    personalisation: int | None
    quality: int | None
    attempts: int
    status: str  # "scored" | "unscored"
    last_reply: str
    answer_hash: str
    judge: str = ""
    prompt_version: str = ""
    cached: bool = field(default=False, compare=False)


def answer_hash(answer: str) -> str:
    return hashlib.sha256(answer.encode("utf-8")).hexdigest()[:16]


def cache_key(judge_id: str, version: str, record_id: str, answer_sha: str) -> str:
    return json.dumps([judge_id, version, record_id, answer_sha])


class VerdictCache:
    """Verdicts in a JSONL file (one per line, appended and flushed as they come); a torn last line is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a kill mid-write: that verdict is asked again
                self.entries[row["key"]] = row

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, verdict: Verdict) -> None:
        row = {"key": key, **{k: v for k, v in asdict(verdict).items() if k != "cached"}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.entries[key] = row


def judge_items(
    judge: JudgeModel,
    items: list[JudgeItem],
    rubric: Rubric,
    cache: VerdictCache,
    max_attempts: int = 3,
    batch_size: int = 8,
    retry_unscored: bool = False,
) -> list[Verdict]:
    """A Verdict per item, in order: cached ones as they were (unscored ones re-asked with `retry_unscored`),
    the rest asked in batches, each malformed reply asked again up to `max_attempts` times in all."""
    if max_attempts < 1:
        raise JudgeError(f"--max-attempts {max_attempts}: must be at least 1")
    verdicts: dict[str, Verdict] = {}
    todo: list[JudgeItem] = []
    for it in items:
        hit = cache.get(cache_key(judge.model_id, rubric.version, it.record_id, answer_hash(it.answer)))
        if hit and not (retry_unscored and hit["status"] == "unscored"):
            fields = {k: hit[k] for k in Verdict.__dataclass_fields__ if k in hit}
            verdicts[it.record_id] = Verdict(**{**fields, "cached": True})
        else:
            todo.append(it)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        prompts = {it.record_id: rubric.render(it.profile, it.query, it.reference, it.answer) for it in batch}
        pending, replies = list(batch), {}
        for attempt in range(max_attempts):
            asked = [prompts[it.record_id] + (REMINDER if attempt else "") for it in pending]
            for it, reply in zip(pending, judge.ask(rubric.system, asked, attempt, rubric.reply_prefix), strict=True):
                replies[it.record_id] = (reply, attempt + 1)
            pending = [it for it in pending if parse_verdict(replies[it.record_id][0]) is None]
            if not pending:
                break
        for it in batch:
            reply, attempts = replies[it.record_id]
            parsed = parse_verdict(reply)
            verdict = Verdict(
                it.record_id, it.task, parsed and parsed["personalisation"], parsed and parsed["quality"], attempts,
                "scored" if parsed else "unscored", reply, answer_hash(it.answer), judge.model_id, rubric.version,
            )  # fmt: skip
            if not parsed:
                log.warning(
                    "judge: %s unscored after %d malformed replies; last: %r", it.record_id, attempts, reply[:200]
                )
            cache.put(cache_key(judge.model_id, rubric.version, it.record_id, verdict.answer_hash), verdict)
            verdicts[it.record_id] = verdict
    return [verdicts[it.record_id] for it in items]


def summarise_verdicts(verdicts: list[Verdict], seed: int = 0) -> dict[str, Any]:
    """Per metric: mean over scored records with a seeded bootstrap 95% interval; counts of scored and unscored."""
    scored = [v for v in verdicts if v.status == "scored"]
    out: dict[str, Any] = {
        "n_records": len(verdicts),
        "n_scored": len(scored),
        "n_unscored": len(verdicts) - len(scored),
    }
    out["n_retried"] = sum(v.attempts > 1 for v in verdicts)
    for metric in JUDGE_METRICS:
        values = np.array([getattr(v, metric) for v in scored], dtype=np.float64)
        lo, hi = bootstrap_ci(values, seed=seed)
        out[metric] = {"mean": float(values.mean()) if values.size else None, "ci_low": lo, "ci_high": hi}
    return out


def write_judge_outputs(
    eval_dir: Path, verdicts: list[Verdict], judge_id: str, rubric: Rubric, meta: dict[str, Any]
) -> dict[str, Any]:
    """judge.jsonl (per record), judge.json (overall and per task) and judge.md in `eval_dir`; returns judge.json."""
    with (eval_dir / "judge.jsonl").open("w", encoding="utf-8") as f:
        for v in verdicts:
            f.write(json.dumps(asdict(v), ensure_ascii=False) + "\n")
    tasks = sorted({v.task for v in verdicts})
    seed = int(meta.get("seed", 0))
    result = {
        "judge": judge_id, "prompt_version": rubric.version, "scale": list(SCALE),
        "overall": summarise_verdicts(verdicts, seed),
        "by_task": {t: summarise_verdicts([v for v in verdicts if v.task == t], seed) for t in tasks}, "meta": meta,
    }  # fmt: skip
    (eval_dir / "judge.json").write_text(json.dumps(result, indent=2))
    (eval_dir / "judge.md").write_text(render_judge_report(result))
    return result


def render_judge_report(result: dict[str, Any]) -> str:
    """judge.json as Markdown."""

    def cell(s: dict[str, Any]) -> str:
        return "n/a" if s["mean"] is None else f"{s['mean']:.2f} [{s['ci_low']:.2f}, {s['ci_high']:.2f}]"

    lines = [
        f"# LLM judge: `{result['judge']}`, rubric `{result['prompt_version']}`",
        "",
        f"Integer scores {result['scale'][0]}-{result['scale'][1]} (higher is better), means over scored records; "
        "brackets: seeded percentile bootstrap 95% interval. Unscored: the judge's reply stayed malformed after "
        "every attempt (counted, not guessed).",
        "",
        "| task | n | scored | unscored | retried | personalisation | quality |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in [("all", result["overall"]), *result["by_task"].items()]:
        lines.append(
            f"| {name} | {s['n_records']} | {s['n_scored']} | {s['n_unscored']} | {s['n_retried']} | "
            f"{cell(s['personalisation'])} | {cell(s['quality'])} |"
        )
    return "\n".join(lines) + "\n"
