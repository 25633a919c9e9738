"""LLM-as-judge: reply parsing, retries of malformed replies counted as unscored, the verdict cache, and the real
SmolLM2 as judge through launch/judge.py and launch/compare.py."""

from __future__ import annotations

import json

import pytest

from perce_ds.evaluation import judge
from perce_ds.evaluation.judge import JudgeItem, VerdictCache, judge_items, load_rubric, parse_verdict
from perce_ds.evaluation.judge_backends import parse_judge_spec
from tests.launch_utils import EVALUATE, ROOT, build_smollm2, check, make_smollm2_run, run_python

JUDGE = ROOT / "launch" / "judge.py"
COMPARE = ROOT / "launch" / "compare.py"


@pytest.mark.parametrize(
    "reply, parsed",
    [
        ("personalisation: 4\nquality: 3", {"personalisation": 4, "quality": 3}),
        ('{"personalization": 5, "quality": 2}', {"personalisation": 5, "quality": 2}),
        ("**Personalisation:** 1\n**Quality:** 5\n\nThe answer is generic.", {"personalisation": 1, "quality": 5}),
        ("personalisation: 6\nquality: 3", None),  # off the scale
        ("quality: 3", None),  # a score missing
        ("personalisation: 4\nquality: 2\npersonalisation: 2", None),  # conflicting values: no guess
        ("I would rate it highly.", None),
        ("", None),
    ],
)
def test_parse_verdict(reply, parsed):
    assert parse_verdict(reply) == parsed


def test_judge_specs_are_checked():
    assert parse_judge_spec("openai:http://h:8000,model=m,api_key_env=K") == (
        "openai", "http://h:8000", {"model": "m", "api_key_env": "K"}
    )  # fmt: skip
    assert parse_judge_spec("vllm:/m,tp=4") == ("vllm", "/m", {"tp": "4"})
    for bad, msg in (("gpt4", "expected hf:PATH"), ("hf:", "expected"), ("hf:/m,tp=2", "unknown option"),
                     ("openai:http://h,model", "not key=value")):  # fmt: skip
        with pytest.raises(judge.JudgeError, match=msg):
            parse_judge_spec(bad)


class ScriptedJudge:
    """Replies from a script per record id and attempt (the retry/count/cache logic is what is under test)."""

    model_id = "scripted:judge"

    def __init__(self, script):
        self.script, self.asked = script, []

    def ask(self, system, prompts, attempt, reply_prefix=""):
        replies = []
        for p in prompts:
            rid = next(r for r in self.script if f"request {r}" in p)
            self.asked.append((rid, attempt, p.endswith(judge.REMINDER)))
            replies.append(self.script[rid][min(attempt, len(self.script[rid]) - 1)])
        return replies


def _items():
    return [JudgeItem(r, "t", f"- likes {r}", f"request {r}", "ref", f"answer {r}") for r in ("a", "b", "c")]


def test_malformed_replies_are_retried_then_counted_unscored(tmp_path):
    script = {
        "a": ["personalisation: 4\nquality: 5"],
        "b": ["Sure! It is a nice answer.", "personalisation: 2\nquality: 3"],  # malformed, then well-formed
        "c": ["no idea", "still no scores", "personalisation: 9\nquality: 9"],  # malformed at every attempt
    }
    scripted = ScriptedJudge(script)
    rubric = load_rubric("v1")
    verdicts = judge_items(scripted, _items(), rubric, VerdictCache(tmp_path / "cache.jsonl"), max_attempts=3)
    by_id = {v.record_id: v for v in verdicts}
    assert [(v.status, v.attempts, v.personalisation, v.quality) for v in verdicts] == [
        ("scored", 1, 4, 5), ("scored", 2, 2, 3), ("unscored", 3, None, None)
    ]  # fmt: skip
    assert by_id["c"].last_reply == "personalisation: 9\nquality: 9"  # kept, never guessed into a score
    # only malformed ones were asked again, each retry with the format reminder
    assert scripted.asked == [("a", 0, False), ("b", 0, False), ("c", 0, False), ("b", 1, True), ("c", 1, True),
                              ("c", 2, True)]  # fmt: skip
    summary = judge.write_judge_outputs(tmp_path, verdicts, scripted.model_id, rubric, {"seed": 0})["overall"]
    assert (summary["n_records"], summary["n_scored"], summary["n_unscored"], summary["n_retried"]) == (3, 2, 1, 2)
    assert summary["personalisation"]["mean"] == 3.0 and summary["quality"]["mean"] == 4.0  # over scored only
    assert "| all | 3 | 2 | 1 | 2 |" in (tmp_path / "judge.md").read_text()


def test_the_cache_answers_a_rerun_and_notices_a_changed_answer(tmp_path):
    script = {"a": ["personalisation: 4\nquality: 5"], "b": ["personalisation: 1\nquality: 2"], "c": ["bad"]}
    rubric, path = load_rubric("v1"), tmp_path / "cache.jsonl"
    first = judge_items(ScriptedJudge(script), _items(), rubric, VerdictCache(path), max_attempts=2)
    again = ScriptedJudge(script)
    second = judge_items(again, _items(), rubric, VerdictCache(path), max_attempts=2)
    assert again.asked == [] and all(v.cached for v in second)
    assert [(v.status, v.personalisation) for v in second] == [(v.status, v.personalisation) for v in first]
    items = _items()
    items[0].answer = "a different answer"  # a new generation for record a: asked again
    retried = ScriptedJudge(script)
    judge_items(retried, items, rubric, VerdictCache(path), max_attempts=2, retry_unscored=True)
    assert sorted({rid for rid, *_ in retried.asked}) == ["a", "c"]  # a: new answer, c: unscored, re-asked


def test_a_rubric_without_its_placeholders_is_refused(tmp_path, monkeypatch):
    (tmp_path / "v9.txt").write_text("system\n---\nno placeholders here\n")
    monkeypatch.setattr(judge, "PROMPT_DIR", tmp_path)
    with pytest.raises(judge.JudgeError, match="v9.txt: expected a system line"):
        load_rubric("v9")
    with pytest.raises(judge.JudgeError, match="known versions: \\['v9'\\]"):
        load_rubric("v0")


@pytest.mark.slow
def test_smollm2_judges_an_evaluation_and_a_rerun_comes_from_the_cache(tmp_path):
    """~3-6 min on 2 shared cores: evaluate 3 records of SmolLM2 (hf), judge them with SmolLM2, judge again."""
    model = build_smollm2()
    runs = [make_smollm2_run(tmp_path / name, model) for name in ("base", "other")]
    for i, run in enumerate(runs):
        tokens = ["--max-new-tokens", str(12 + 4 * i), "--limit", "3", "--batch-size", "3"]
        check(run_python(EVALUATE, ["--run", str(run), *tokens], timeout=900))
    spec = f"hf:{model}"
    proc = check(run_python(JUDGE, ["--run", str(runs[0]), "--judge", spec], timeout=1200))
    result = json.loads((runs[0] / "eval" / "judge.json").read_text())
    overall = result["overall"]
    assert result["prompt_version"] == "v1" and result["judge"].startswith("hf:SmolLM2-135M-Instruct:")
    assert overall["n_records"] == 3 and overall["n_scored"] + overall["n_unscored"] == 3
    assert overall["n_scored"] >= 1, proc.stdout  # the reply prefix gets the format out of a 135M judge
    rows = [json.loads(x) for x in (runs[0] / "eval" / "judge.jsonl").read_text().splitlines()]
    for row in rows:
        assert (row["status"] == "scored") == (row["personalisation"] is not None)
        assert row["status"] == "unscored" or 1 <= row["personalisation"] <= 5 and 1 <= row["quality"] <= 5
    assert result["meta"]["judge_calls"] >= 3 and result["meta"]["n_from_cache"] == 0

    check(run_python(JUDGE, ["--run", str(runs[0]), "--judge", spec], timeout=600))
    rerun = json.loads((runs[0] / "eval" / "judge.json").read_text())
    assert rerun["meta"]["judge_calls"] == 0 and rerun["meta"]["n_from_cache"] == 3  # the model never loaded
    assert rerun["overall"] == result["overall"]

    check(run_python(JUDGE, ["--run", str(runs[1]), "--judge", spec], timeout=1200))
    out = tmp_path / "cmp"
    proc = check(run_python(COMPARE, [str(runs[0]), str(runs[1]), "--out", str(out)], timeout=300))
    md = (out / "compare.md").read_text()
    assert "LLM judge" in md and "rubric `v1`" in md and result["judge"] in md
    assert "| personalisation |" in md and "| quality |" in md
    assert "| run | mean generated tokens | end of turn (%) |" in md and "| other |" in md
