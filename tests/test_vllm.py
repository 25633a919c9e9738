"""--backend vllm against --backend hf on one model: greedy token agreement >= 0.95 (GPU only).

    python -m pytest -q -m gpu tests/test_vllm.py      # on a CUDA machine with `pip install -e '.[vllm]'`

The model is a small Qwen3 (head_dim 64, which every vLLM attention backend supports) fitted a few hundred
steps on the synthetic persona task's responses, so greedy decoding follows learnt text rather than the near-ties
of random weights; both backends run it in fp32, so they may differ only by kernel rounding.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from perce_ds.evaluation.generation import read_generations
from tests.launch_utils import EVALUATE, check, make_eval_run, run_python

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed: pip install -e '.[vllm]'"),
]
MAX_NEW_TOKENS = 24


def _fit(run_dir, steps: int = 300) -> None:
    """Fit hf/ a little on the run's training responses (plain PyTorch, fp32) and save it back."""
    from transformers import AutoModelForCausalLM

    from perce_ds.data.tokenizer import load_tokenizer

    tok = load_tokenizer(run_dir / "hf")
    lm = AutoModelForCausalLM.from_pretrained(run_dir / "hf", dtype=torch.float32).cuda()
    texts = [json.loads(x)["response"] for x in (run_dir / "data" / "train.jsonl").read_text().splitlines()]
    batch = tok(texts, return_tensors="pt", padding=True).to("cuda")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = lm(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    lm.save_pretrained(run_dir / "hf")


def test_vllm_greedy_tokens_agree_with_hf(tmp_path):
    from perce_ds.config import RunConfig

    run = make_eval_run(tmp_path / "run", users=6, eval_per_user=2)
    run_cfg = RunConfig.load(run / "config.yaml")
    run_cfg.model.dtype = "fp32"  # both backends in fp32: only kernel rounding may differ
    run_cfg.dump(run / "config.yaml")
    cfg = json.loads((run / "hf" / "config.json").read_text())
    cfg.update(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512)
    from transformers import AutoConfig, AutoModelForCausalLM

    (run / "hf" / "config.json").write_text(json.dumps(cfg))
    lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run / "hf"), dtype=torch.float32)
    lm.save_pretrained(run / "hf")
    _fit(run)
    common = ["--run", str(run), "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "1"]
    check(run_python(EVALUATE, [*common, "--name", "hf"], timeout=600))
    check(run_python(EVALUATE, [*common, "--name", "vllm", "--backend", "vllm"], timeout=900))
    from perce_ds.data.tokenizer import load_tokenizer

    tok = load_tokenizer(run / "hf")
    hf = read_generations(run / "eval" / "hf" / "generations.jsonl")
    vl = read_generations(run / "eval" / "vllm" / "generations.jsonl")
    assert set(hf) == set(vl) and len(hf) >= 10
    agree = total = 0
    for rid in hf:
        a = tok(hf[rid]["generation"], add_special_tokens=False)["input_ids"]
        b = tok(vl[rid]["generation"], add_special_tokens=False)["input_ids"]
        assert a, "the fitted model must generate text for the comparison to mean something"
        n = max(len(a), len(b))
        agree += sum(x == y for x, y in zip(a, b))
        total += n
    assert agree / total >= 0.95, (agree, total)
    meta = json.loads((run / "eval" / "vllm" / "meta.json").read_text())
    assert meta["backend"]["name"] == "vllm"
