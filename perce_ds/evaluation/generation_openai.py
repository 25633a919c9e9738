"""Generation (and judging) through any OpenAI-compatible server: vLLM serve, llama.cpp's server, TGI.

Generation uses the completions endpoint (`/v1/completions`) with the prompt text perce_ds rendered itself:
the run's own chat template with its kwargs, the retrieved profile block, the system prompt, decoded from the
very ids the hf backend feeds `generate`. The chat endpoint would apply the server's template instead (a GGUF's
embedded one, vLLM's default, TGI's), which need not be the one the model was trained with: SmolLM2's, for one,
adds a default system prompt when a conversation has none. A server without `/v1/completions` is refused
with that reason rather than silently given other prompts. The end-of-turn token's text is sent as a stop
string (servers stop on EOS themselves); `finish_reason` "stop" / "length" and `usage.completion_tokens`
give the same per-record fields as the in-process backends. The judge (judge.py) uses `chat`, since the judge
is any model whose template is the server's business.

The API key is read from an environment variable named by the user and goes only into the Authorization
header (never into logs, meta.json or errors). Requests run on a bounded thread pool; connection errors,
timeouts, 429 and 5xx are retried with exponential backoff (honouring Retry-After); other 4xx fail at once
with the server's message.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from perce_ds.errors import UserError
from perce_ds.evaluation.generation import Completion, GenerationSettings, stop_token_ids

log = logging.getLogger("perce_ds")
FINISH = {"stop": "stop", "eos": "stop", "eos_token": "stop", "stop_sequence": "stop", "length": "length"}


class ServerError(UserError, RuntimeError):
    """An OpenAI-compatible server refused a request, or kept failing after every retry."""


@dataclass
class ServerSpec:
    """Where and how to reach the server. `api_key_env` names the environment variable holding the key."""

    base_url: str
    model: str
    api_key_env: str | None = None
    concurrency: int = 8
    timeout_s: float = 600.0
    max_retries: int = 6
    backoff_s: float = 1.0

    def identity(self) -> dict[str, Any]:
        """What identifies the generations (no key, no URL: the same model served elsewhere is the same model)."""
        return {"name": "openai", "model": self.model}


class OpenAIClient:
    """A minimal, retrying JSON client for the completions and chat endpoints (standard library only)."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.base = spec.base_url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self._key = None
        if spec.api_key_env:
            self._key = os.environ.get(spec.api_key_env)
            if not self._key:
                raise ServerError(f"--api-key-env {spec.api_key_env}: that environment variable is unset or empty")
        self.requests_sent = 0

    def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST `payload` to base/path; retry transient failures with exponential backoff."""
        url = f"{self.base}/{path}"
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        for attempt in range(self.spec.max_retries + 1):
            wait = self.spec.backoff_s * 2**attempt
            try:
                self.requests_sent += 1
                request = urllib.request.Request(url, body, headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.spec.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:500]
                if e.code != 429 and e.code < 500:
                    hint = " (the server has no completions endpoint: see perce_ds/evaluation/generation_openai.py)"
                    raise ServerError(
                        f"{url}: HTTP {e.code} {detail}" + (hint if e.code == 404 and path == "completions" else "")
                    ) from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
                wait = float(retry_after) if retry_after and retry_after.isdigit() else wait
                reason = f"HTTP {e.code} {detail[:120]}"
            except (TimeoutError, urllib.error.URLError, ConnectionError, http.client.HTTPException) as e:
                reason = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt == self.spec.max_retries:
                raise ServerError(f"{url}: gave up after {attempt + 1} attempts; last failure: {reason}")
            log.warning("%s: %s; retry %d/%d in %.1f s", url, reason, attempt + 1, self.spec.max_retries, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def sampling(self, settings: GenerationSettings, seed: int) -> dict[str, Any]:
        """Greedy (temperature 0) unless the settings sample."""
        if not settings.do_sample:
            return {"temperature": 0.0, "top_p": 1.0, "seed": seed}
        return {"temperature": settings.temperature, "top_p": settings.top_p, "seed": seed}

    def complete_text(
        self, prompt: str, max_tokens: int, stop: list[str], settings: GenerationSettings, seed: int
    ) -> tuple[str, dict[str, Any], str]:
        """(text, the answer's `usage` ({} when the server reports none), raw finish_reason)."""
        payload = {"model": self.spec.model, "prompt": prompt, "max_tokens": max_tokens, "stop": stop}
        answer = self.post("completions", {**payload, **self.sampling(settings, seed)})
        choice = _first_choice(answer, self.base)
        return choice.get("text") or "", answer.get("usage") or {}, choice.get("finish_reason")

    def chat(self, messages: list[dict[str, str]], max_tokens: int, settings: GenerationSettings, seed: int) -> str:
        """The assistant message's text for `messages` (the server applies its own chat template)."""
        payload = {"model": self.spec.model, "messages": messages, "max_tokens": max_tokens}
        answer = self.post("chat/completions", {**payload, **self.sampling(settings, seed)})
        return (_first_choice(answer, self.base).get("message") or {}).get("content") or ""


def _first_choice(answer: dict[str, Any], base: str) -> dict[str, Any]:
    choices = answer.get("choices") or []
    if not choices:
        raise ServerError(f"{base}: an answer without choices: {json.dumps(answer)[:300]}")
    return choices[0]


class OpenAIBackend:
    """GenerationBackend over an OpenAI-compatible server: each prompt is one request, `concurrency` at a time."""

    name = "openai"
    synced = False
    pads_batches = False

    def __init__(self, spec: ServerSpec, tokenizer: Any) -> None:
        self.client = OpenAIClient(spec)
        self.spec, self.tokenizer = spec, tokenizer
        self.stop_ids = stop_token_ids(tokenizer)
        self.stop_texts = [tokenizer.decode([i], skip_special_tokens=False) for i in self.stop_ids]
        self.prompt_token_mismatches = 0

    def _one(self, prompt_ids: list[int], max_new_tokens: int, settings: GenerationSettings, seed: int) -> Completion:
        prompt = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        text, usage, reason = self.client.complete_text(prompt, max_new_tokens, self.stop_texts, settings, seed)
        served = usage.get("prompt_tokens")
        if served is not None and served != len(prompt_ids):  # the server tokenised our text differently
            self.prompt_token_mismatches += 1
            if self.prompt_token_mismatches == 1:
                log.warning(
                    "%s counts %d prompt tokens where the run's tokenizer has %d: the served model's tokenizer "
                    "differs from the run's (special tokens not parsed? a BOS added?); its answers are to other prompts",
                    self.client.base, served, len(prompt_ids),
                )  # fmt: skip
        n_tokens = usage.get("completion_tokens")
        if reason not in FINISH:
            raise ServerError(
                f"{self.client.base}: unknown finish_reason {reason!r} (expected one of {sorted(FINISH)})"
            )
        for stop in self.stop_texts:  # a server that echoes the stop string: cut it as the hf backend cuts the id
            text = text.split(stop, 1)[0]
        if n_tokens is None:  # no usage reported: count the answer's tokens ourselves
            n_tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return Completion(text.strip(), int(n_tokens), FINISH[reason])

    def complete(
        self, prompts: list[list[int]], max_new_tokens: int, settings: GenerationSettings, seed: int
    ) -> Iterator[tuple[int, Completion]]:
        with ThreadPoolExecutor(max_workers=max(1, self.spec.concurrency)) as pool:
            futures = {
                pool.submit(self._one, ids, max_new_tokens, settings, seed + pos): pos
                for pos, ids in enumerate(prompts)
            }
            try:
                for future in as_completed(futures):
                    yield futures[future], future.result()
            finally:  # an error or a kill: do not start the queued requests
                for future in futures:
                    future.cancel()
