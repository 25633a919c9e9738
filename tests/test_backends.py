"""Generation backends: the OpenAI client's retries against a scripted HTTP server (the client is under test,
the server only answers), the per-record length / end-of-turn fields, and the vLLM refusal on CPU."""

from __future__ import annotations

import http.server
import json
import logging
import shutil
import threading

import pytest
import torch

from perce_ds.data.tokenizer import load_tokenizer
from perce_ds.evaluation.evaluate import EvalOptions, evaluate_run
from perce_ds.evaluation.generation import GenerationSettings, completion_from_ids, read_generations, stop_token_ids
from perce_ds.evaluation.generation_openai import OpenAIBackend, OpenAIClient, ServerError, ServerSpec
from tests.launch_utils import EVALUATE, make_eval_run, run_python

SECRET = "sk-test-do-not-log-0123456789"


class ScriptedServer(http.server.ThreadingHTTPServer):
    """Answers POSTs from a script: a list of (status, headers, body) consumed in order, the last one repeated."""

    def __init__(self, script):
        self.script, self.seen = list(script), []
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        status, headers, answer = server.script.pop(0) if len(server.script) > 1 else server.script[0]
        if status == "drop":  # a connection reset mid-request
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        data = json.dumps(answer).encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted(request):
    server = ScriptedServer(request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _completion(text, reason, n):
    return {
        "choices": [{"text": text, "finish_reason": reason}],
        "usage": {"prompt_tokens": None, "completion_tokens": n},
    }


OK = (200, {}, _completion("Hello there<|im_end|>", "stop", 2))


@pytest.mark.parametrize(
    "scripted",
    [[(503, {}, {"error": "loading"}), ("drop", {}, {}), (429, {"Retry-After": "0"}, {}), OK]],
    indirect=True,
)
def test_transient_failures_are_retried_with_backoff_and_the_key_never_logged(scripted, monkeypatch, caplog):
    monkeypatch.setenv("PERCE_TEST_KEY", SECRET)
    spec = ServerSpec(f"http://127.0.0.1:{scripted.server_port}", "m", "PERCE_TEST_KEY", backoff_s=0.01)
    client = OpenAIClient(spec)
    with caplog.at_level(logging.WARNING, logger="perce_ds"):
        text, usage, reason = client.complete_text("prompt", 8, ["<|im_end|>"], GenerationSettings(), seed=0)
    assert (text, usage["completion_tokens"], reason) == ("Hello there<|im_end|>", 2, "stop")
    assert len(scripted.seen) == 4 and client.requests_sent == 4  # 503, reset, 429, then the answer
    assert all(s["auth"] == f"Bearer {SECRET}" and s["path"] == "/v1/completions" for s in scripted.seen)
    assert scripted.seen[-1]["body"]["temperature"] == 0.0  # greedy by default
    assert "HTTP 503" in caplog.text and "HTTP 429" in caplog.text and SECRET not in caplog.text


@pytest.mark.parametrize("scripted", [[(400, {}, {"error": "max_tokens too large"})]], indirect=True)
def test_a_client_error_fails_at_once_with_the_servers_message(scripted):
    client = OpenAIClient(ServerSpec(f"http://127.0.0.1:{scripted.server_port}/v1", "m", backoff_s=0.01))
    with pytest.raises(ServerError, match="HTTP 400.*max_tokens too large"):
        client.complete_text("p", 8, [], GenerationSettings(), seed=0)
    assert len(scripted.seen) == 1


@pytest.mark.parametrize("scripted", [[(503, {}, {"error": "down"})]], indirect=True)
def test_retries_are_bounded(scripted):
    client = OpenAIClient(ServerSpec(f"http://127.0.0.1:{scripted.server_port}", "m", max_retries=2, backoff_s=0.01))
    with pytest.raises(ServerError, match="gave up after 3 attempts; last failure: HTTP 503"):
        client.complete_text("p", 8, [], GenerationSettings(), seed=0)
    assert len(scripted.seen) == 3


def test_an_unset_key_variable_is_an_error_naming_it(monkeypatch):
    monkeypatch.delenv("PERCE_TEST_KEY", raising=False)
    with pytest.raises(ServerError, match="--api-key-env PERCE_TEST_KEY"):
        OpenAIClient(ServerSpec("http://127.0.0.1:9", "m", "PERCE_TEST_KEY"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_eval_run(tmp_path_factory.mktemp("backends") / "run")


def test_completion_fields_mean_the_same_for_every_backend(tiny_run):
    tok = load_tokenizer(tiny_run / "hf")
    stops = stop_token_ids(tok)
    words = tok("hello world again", add_special_tokens=False)["input_ids"]
    stopped = completion_from_ids([*words, stops[0], *words], stops, tok)
    assert (stopped.n_generated_tokens, stopped.finish_reason) == (len(words), "stop")  # stop token not counted
    assert stopped.text == tok.decode(words, skip_special_tokens=True).strip()
    ran_out = completion_from_ids(words, stops, tok)
    assert (ran_out.n_generated_tokens, ran_out.finish_reason) == (len(words), "length")


@pytest.mark.parametrize("scripted", [[OK]], indirect=True)
def test_openai_backend_maps_finish_reasons_and_usage(scripted, tiny_run):
    tok = load_tokenizer(tiny_run / "hf")
    backend = OpenAIBackend(ServerSpec(f"http://127.0.0.1:{scripted.server_port}", "m", concurrency=1), tok)
    echoed = f"An answer.{backend.stop_texts[-1]}"  # a server that echoes the stop string: cut as hf cuts the id
    scripted.script[:] = [(200, {}, _completion(echoed, "stop", 3)), (200, {}, _completion("Cut", "length", 4))]
    prompt = tok("a prompt", add_special_tokens=False)["input_ids"]
    out = dict(backend.complete([prompt, prompt], 4, GenerationSettings(max_new_tokens=4), seed=0))
    assert sorted((c.text, c.n_generated_tokens, c.finish_reason) for c in out.values()) == [
        ("An answer.", 3, "stop"), ("Cut", 4, "length")
    ]  # fmt: skip
    sent = scripted.seen[0]["body"]
    assert sent["prompt"] == tok.decode(prompt, skip_special_tokens=False) and sent["max_tokens"] == 4
    assert set(sent["stop"]) == {tok.decode([i], skip_special_tokens=False) for i in stop_token_ids(tok)}


def test_hf_rows_and_scores_carry_length_and_end_of_turn_rate(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    settings = GenerationSettings(max_new_tokens=6, batch_size=4)
    scores = evaluate_run(EvalOptions(run=run, limit=5, name="x", generation=settings))
    rows = read_generations(run / "eval" / "x" / "generations.jsonl")
    assert len(rows) == 5
    for row in rows.values():
        assert row["finish_reason"] in ("stop", "length") and 0 <= row["n_generated_tokens"] <= 6
        assert (row["n_generated_tokens"] == 6) or row["finish_reason"] == "stop"
    gen = scores["overall"]["generation"]
    assert gen["n"] == 5
    assert gen["mean_generated_tokens"] == pytest.approx(sum(r["n_generated_tokens"] for r in rows.values()) / 5)
    assert gen["end_of_turn_rate"] == sum(r["finish_reason"] == "stop" for r in rows.values()) / 5
    assert "| tokens | end of turn |" in (run / "eval" / "x" / "report.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
def test_vllm_backend_refuses_on_cpu_with_one_line(tiny_run):
    proc = run_python(EVALUATE, ["--run", str(tiny_run), "--backend", "vllm", "--name", "v"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip() and "WARNING" not in x and "warn" not in x.lower()]
    assert lines == [lines[0]] and lines[0].startswith("error: --backend vllm needs a CUDA GPU"), proc.stderr
    assert not (tiny_run / "eval" / "v").exists()  # refused before anything was written


def test_backend_option_combinations_are_refused_before_loading(tiny_run):
    from perce_ds.evaluation.runs import EvalInputError

    with pytest.raises(EvalInputError, match="--backend openai needs --base-url URL and --served-model NAME"):
        evaluate_run(EvalOptions(run=tiny_run, backend="openai", server=ServerSpec("", "")))
    with pytest.raises(EvalInputError, match="--backend vllm generates from an exported Hugging Face folder"):
        evaluate_run(EvalOptions(run=tiny_run, backend="vllm", zero3=True))
    assert not (tiny_run / "eval" / "openai").exists()
