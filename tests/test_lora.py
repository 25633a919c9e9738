"""LoRA (model.lora, peft) on the shared ZeRO-3 engine: config, adapters, exports, and real 2-rank runs checked
against a plain-PyTorch LoRA step."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from perce_ds.config import LORA_TARGETS, ConfigError, RunConfig
from perce_ds.data.order import DataOrder
from perce_ds.data.pipeline import tokenize_split
from perce_ds.data.tokenizer import load_tokenizer
from tests.launch_utils import (
    ROOT,
    TINY_QWEN3,
    assert_weights_exercise_perce,
    build_tiny_setup,
    check,
    load_safetensors,
    read_jsonl,
    recipe,
    reference_perce_loss,
    run_deepspeed,
    run_job,
    train,
    write_recipe,
)

peft = pytest.importorskip("peft", reason="the lora extra (pip install -e '.[lora]') is part of the test extra")
SMALL_LORA = {"r": 4, "alpha": 8.0}
MLP = ["gate_proj", "up_proj", "down_proj"]


def tiny_lm(tie: bool = False) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(TINY_QWEN3, vocab_size=300, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch), dtype=torch.float32)


def lora_cfg(**kw):
    from perce_ds.config import LoraConfig

    return LoraConfig(**(SMALL_LORA | kw))


def base_recipe(tmp_path: Path, model: dict) -> Path:
    return write_recipe(tmp_path / "r.yaml", {"model": model, "data": {"synthetic": {"enabled": True}}})


# ------------------------------------------------------------------ config and adapters (fast)
def test_config_defaults_and_errors(tmp_path):
    cfg = RunConfig.load(base_recipe(tmp_path, {"name_or_path": "m", "lora": {}}))
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout) == (16, 32.0, 0.0)
    assert cfg.model.lora.target_modules == LORA_TARGETS == ["q_proj", "k_proj", "v_proj", "o_proj", *MLP]
    assert RunConfig.load(base_recipe(tmp_path, {"name_or_path": "m"})).model.lora is None  # full fine-tuning
    assert RunConfig.load(base_recipe(tmp_path, {"name_or_path": "m"}), ["model.lora.r=8"]).model.lora.r == 8
    with pytest.raises(ConfigError, match="model.lora needs r >= 1"):
        RunConfig.load(base_recipe(tmp_path, {"name_or_path": "m", "lora": {"r": 0}}))
    with pytest.raises(ConfigError, match="target_modules is empty"):
        RunConfig.load(base_recipe(tmp_path, {"name_or_path": "m", "lora": {"target_modules": []}}))
    with pytest.raises(ConfigError, match="model.lora adapts a pretrained model"):
        RunConfig.load(base_recipe(tmp_path, {"config": dict(TINY_QWEN3), "lora": {}}))
    with pytest.raises(ConfigError, match="unknown config key model.lora.rank"):
        RunConfig.load(base_recipe(tmp_path, {"name_or_path": "m", "lora": {"rank": 4}}))


def test_missing_peft_is_a_clear_error(monkeypatch):
    from perce_ds import lora

    monkeypatch.setitem(sys.modules, "peft", None)  # what an environment without the lora extra imports
    with pytest.raises(ConfigError, match=r"model.lora needs peft.*pip install -e '\.\[lora\]'"):
        lora.add_adapters(tiny_lm(), lora_cfg())


def test_adapters_are_the_only_trainable_parameters_and_bad_targets_are_refused():
    from perce_ds.lora import add_adapters, count_parameters

    lm = tiny_lm()
    names_before = {n for n, _ in lm.named_parameters()}
    add_adapters(lm, lora_cfg())
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # 2 layers x 7 projections, A [4, in] and B [out, 4]
    h, i, q, kv = 64, 128, 4 * 16, 2 * 16
    per_layer = sum(4 * (a + b) for a, b in ((h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)))
    assert count_parameters(lm)[0] == 2 * per_layer
    assert {n.replace(".base_layer.", ".") for n, p in lm.named_parameters() if not p.requires_grad} == names_before
    # LoRA dropout counts as the model's dropout (PIR then gets its eval-mode pass); 0 adds none.
    from perce_ds.model import active_dropout

    assert active_dropout(lm) == []
    dropping = tiny_lm()
    add_adapters(dropping, lora_cfg(dropout=0.1))
    assert len(active_dropout(dropping)) == 2 * 7 and all(".lora_dropout." in d for d in active_dropout(dropping))
    with pytest.raises(ConfigError, match="target_modules=\\['nope'\\]"):
        add_adapters(tiny_lm(), lora_cfg(target_modules=["nope"]))
    with pytest.raises(ConfigError, match="adapts the output embedding"):
        add_adapters(tiny_lm(), lora_cfg(target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ConfigError, match="only linear layers"):
        add_adapters(tiny_lm(), lora_cfg(target_modules=["embed_tokens"]))
    with pytest.raises(ConfigError, match="tied"):
        add_adapters(tiny_lm(tie=True), lora_cfg(modules_to_save=["lm_head"]))


def _randomise_adapters(model: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1)


def test_merged_export_equals_peft_merge_and_adapter_round_trips(tmp_path):
    """merged_state_dict == peft's merge_and_unload (also with modules_to_save); save_adapter writes peft's folder,
    which PeftModel.from_pretrained and model.lora.adapter both load back exactly."""
    from perce_ds import lora

    lm = tiny_lm()
    model = lora.add_adapters(lm, lora_cfg(modules_to_save=["lm_head"]))
    _randomise_adapters(model)
    adapter = {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
    merged = lora.merged_state_dict(lm, rank0=True)
    lora.save_adapter(model, tmp_path / "adapter", rank0=True)
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    expected = model.merge_and_unload().state_dict()
    assert set(merged) == set(expected)
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(merged["lm_head.weight"], tiny_lm().lm_head.weight)  # the trained copy is exported

    reloaded = peft.PeftModel.from_pretrained(tiny_lm(), tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 200, 17]])
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(lm.config)
    plain.load_state_dict(merged)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)

    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps(json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()) | {"base_model_name_or_path": "b"})
    )  # fmt: skip
    overrides = lora.adapter_settings(tmp_path / "adapter")
    cfg = RunConfig.load(base_recipe(tmp_path, {"name_or_path": "x"}), overrides)
    assert cfg.model.name_or_path == "b" and cfg.model.lora.modules_to_save == ["lm_head"]
    again = tiny_lm()
    lora.add_adapters(again, cfg.model.lora)
    assert {n: p for n, p in again.named_parameters() if p.requires_grad}.keys() == adapter.keys()
    for n, p in again.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, adapter[n]), n
    with pytest.raises(ConfigError, match="its adapter_config.json has r=4"):
        lora.add_adapters(tiny_lm(), lora_cfg(r=8, adapter=str(tmp_path / "adapter")))


def test_dry_run_sizes_lora_on_adapter_parameters():
    """LoRA: the trainable count is the adapters'; model states per GPU drop to ~2 bytes per base parameter."""
    from transformers import AutoConfig

    from perce_ds.dryrun import count_parameters, lora_model_states_mem

    arch = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=4, vocab_size=1000)  # fmt: skip
    total, largest, trainable = count_parameters(arch)
    assert trainable == total
    total_l, largest_l, trainable_l = count_parameters(arch, lora_cfg(r=16))
    h, i = 256, 512
    assert trainable_l == 4 * 16 * (4 * (h + h) + 2 * (h + i) + (i + h))
    assert total_l == total + trainable_l and largest_l == largest
    _, full_gpu = lora_model_states_mem(0, total, largest, 8, 1, False, False)
    _, lora_gpu = lora_model_states_mem(total, trainable_l, largest, 8, 1, False, False)
    assert full_gpu == 4 * largest + int(18 * total / 8)  # DeepSpeed's own estimate when everything trains
    assert lora_gpu == 4 * largest + int((2 * total + 18 * trainable_l) / 8)


# ------------------------------------------------------------------ 2-rank ZeRO-3 runs (slow)
@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_setup(tmp_path_factory.mktemp("lora"))


def lora_recipe(setup: dict[str, Path], name: str, **train_overrides) -> dict:
    spec = recipe(setup, name, **train_overrides)
    spec["model"]["lora"] = dict(SMALL_LORA)
    return spec


def peft_state(path: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(path / "adapter_model.safetensors")


@pytest.mark.slow
def test_lora_zero3_steps_equal_plain_pytorch_lora_steps(setup):
    """Two LoRA PerCE steps on 2 ZeRO-3 ranks (SGD, lr 1, fp32) == the same steps in plain PyTorch on peft's model
    from the same initial adapter (hf_init_adapter/); two, because lora_B starts at 0 so step 1 moves B alone.
    Base weights are bit-for-bit the base model's after training; the optimizer holds the adapters only; the
    merged hf/ reloads with transformers and decodes greedily as the in-engine model does."""
    from transformers import AutoModelForCausalLM

    name = "lora-equiv"
    # keep_best with one evaluation (step 2): hf_best/ + hf_best_adapter/ must be that step's model, as hf/ is
    spec = lora_recipe(setup, name, max_steps=2, save_init_model=True, eval_every=2, keep_best="eval_ce")
    path = write_recipe(setup["root"] / f"{name}.yaml", spec)
    out = setup["root"] / f"{name}-out"
    worker = ROOT / "tests" / "workers" / "lora_train.py"
    check(run_deepspeed(worker, ["--recipe", str(path), "--deepspeed", str(setup["sgd"]), "--out", str(out)], 2))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    run = setup["root"] / "runs" / name

    # The frozen base is untouched and the optimizer's fp32 partitions together hold exactly the adapters.
    base_tensors = load_safetensors(setup["model"] / "model.safetensors")
    for res in ranks:
        assert res["frozen_checked"] == len(base_tensors) and res["frozen_differ"] == []
    adapters = ranks[0]["adapter_parameters"]
    assert adapters == 2 * 4 * (64 + 64 + 2 * (64 + 32) + 64 + 64 + 3 * (64 + 128))  # 2 layers, r 4, 7 projections
    assert sum(r["optimizer_partition"] for r in ranks) == adapters

    # Plain PyTorch: peft's LoRA on the base model, initial adapter as exported, the same two global batches.
    cfg = RunConfig.load(path)
    examples, _ = tokenize_split([str(setup["train"])], load_tokenizer(setup["model"]), cfg)
    order = DataOrder(len(examples), 2, 2, 1, cfg.train.seed)
    base = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32, attn_implementation="eager")
    ref = peft.PeftModel.from_pretrained(base, run / "hf_init_adapter", is_trainable=True)
    lo, hi = spec["loss"]["clip_min"], spec["loss"]["clip_max"]
    trainable = [p for p in ref.parameters() if p.requires_grad]
    for step in (0, 1):
        batch = [examples[i] for rank in (0, 1) for micro in order.window(step, rank) for i in micro]
        loss, weights = reference_perce_loss(ref, batch, lo, hi)
        assert_weights_exercise_perce(weights, lo, hi)
        loss.backward()
        with torch.no_grad():
            for p in trainable:
                p -= 1.0 * p.grad
                p.grad = None
    expected = peft.get_peft_model_state_dict(ref)
    got, initial = peft_state(run / "hf_adapter"), peft_state(run / "hf_init_adapter")
    assert set(got) == set(expected)
    # fp32 throughout, adapter entries O(0.3) (ulp 3e-8); the engine's chunked head, padding and rank-averaged
    # gradients reorder sums over ~400 tokens: tens of ulp, so 1e-6. Every tensor's update is checked to exceed
    # the tolerance 50-fold (step 2 trains lora_A through the nonzero B), so none matches trivially.
    atol = 1e-6
    for key, tensor in got.items():
        torch.testing.assert_close(tensor, expected[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
        assert float((tensor - initial[key]).abs().max()) > 50 * atol, key

    # The merged export: transformers alone loads it, and it decodes as the in-engine adapted model did.
    merged = AutoModelForCausalLM.from_pretrained(run / "hf", dtype=torch.float32)
    prompts = torch.tensor(ranks[0]["greedy"])[:, :4]
    with torch.no_grad():
        kwargs = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
        reloaded = merged.generate(input_ids=prompts, **kwargs).tolist()
    assert reloaded == ranks[0]["greedy"] == ranks[1]["greedy"]
    exported = load_safetensors(run / "hf" / "model.safetensors")
    for k, v in ref.merge_and_unload().state_dict().items():
        if k in exported:  # lm_head.weight is tied to embed_tokens: stored once
            torch.testing.assert_close(exported[k], v, atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")

    # keep_best: the merged model and its adapter, renamed from their staging folders together
    assert json.loads((run / "best.json").read_text())["step"] == 2
    assert not [p.name for p in run.iterdir() if p.name.endswith((".tmp", ".old"))]
    for key, tensor in peft_state(run / "hf_best_adapter").items():
        assert torch.equal(tensor, got[key]), key
    best = load_safetensors(run / "hf_best" / "model.safetensors")
    assert best.keys() == exported.keys() and all(torch.equal(best[k], exported[k]) for k in best)


@pytest.mark.slow
def test_lora_resume_universal_reshard_and_offline_scoring(setup, tmp_path):
    """Adam: 4 steps straight == 2 steps + resume auto + 2 steps (1e-6); the checkpoint holds adapters and their
    optimizer state only; its universal copy resumes on 1 rank (same global batch) with the straight run's loss;
    launch/estimate.py scores with the adapter from hf_adapter/ or the checkpoint as with the merged hf/."""
    runs = setup["root"] / "runs"
    common = {"max_steps": 4, "lr": 1e-2, "lr_scheduler": "cosine", "max_grad_norm": 1.0, "weight_decay": 0.01}
    check(train(setup["root"], lora_recipe(setup, "lora-straight", **common), 2, setup["adam"]))
    check(train(setup["root"], lora_recipe(setup, "lora-resumed", stop_after=2, **common), 2, setup["adam"]))
    ckpt = runs / "lora-resumed" / "checkpoints" / "step_2"
    proc = check(train(setup["root"], lora_recipe(setup, "lora-resumed", **common), 2, setup["adam"]))
    assert "resumed from" in proc.stderr
    straight = read_jsonl(runs / "lora-straight" / "metrics.jsonl")
    resumed = read_jsonl(runs / "lora-resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for s, r in zip(straight, resumed, strict=True):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-6, abs=1e-7)
    a, b = peft_state(runs / "lora-straight" / "hf_adapter"), peft_state(runs / "lora-resumed" / "hf_adapter")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)

    # Adapters only: no base weight (nor fragment of one) in the files, Adam's state sized by the adapters.
    adapters = sum(v.numel() for v in a.values())
    model_states, optim_numel = 0, 0
    for rank in (0, 1):
        ms = torch.load(ckpt / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", weights_only=False)
        # ZeRO-3 stores parameters as empty placeholders (their values live in the optimizer's fp32 partitions); the
        # only non-adapter name is the placeholder of lm_head.weight, a second name of the tied input embedding.
        assert sum(".lora_" in k for k in ms["module"]) == len(a) and not ms.get("frozen_param_fragments")
        assert [k for k in ms["module"] if ".lora_" not in k] == ["lm.lm_head.weight"]
        model_states += sum(t.numel() for t in ms["module"].values())
        osd = torch.load(ckpt / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
        osd = osd["optimizer_state_dict"]
        flat = sum(t.numel() for t in osd["fp32_flat_groups"])
        moments = [t.numel() for s in osd["optimizer_state_dict"]["state"].values() for t in s.values() if t.dim()]
        assert moments == [flat, flat]  # exp_avg, exp_avg_sq of this rank's adapter partition
        optim_numel += flat
    assert optim_numel == adapters and model_states == 0

    conv = run_job([sys.executable, ROOT / "launch" / "convert_checkpoint.py", ckpt], timeout=300)
    assert conv.returncode == 0, conv.stderr[-3000:]
    universal = runs / "lora-resumed" / "checkpoints_universal" / "step_2"
    one = lora_recipe(setup, "lora-one-rank", stop_after=1, grad_accum=2, **common)  # global batch 2 x 2 x 1
    check(train(setup["root"], one, 1, setup["adam"], ["--train.resume", str(universal)]))
    single = read_jsonl(runs / "lora-one-rank" / "metrics.jsonl")
    assert [r["step"] for r in single] == [3]
    assert single[0]["loss"] == pytest.approx(straight[2]["loss"], rel=1e-5)

    # Offline EM scores with base + adapter: from hf_adapter/ or from the LoRA checkpoint (with the LoRA recipe),
    # the same PIR as from the merged hf/ (fp32; merged vs unmerged weights differ by rounding alone).
    estimate, straight_recipe = ROOT / "launch" / "estimate.py", setup["root"] / "recipe-lora-straight.yaml"
    pirs = {}
    for kind, model in (("merged", "hf"), ("adapter", "hf_adapter"), ("checkpoint", "checkpoints/step_4")):
        out = tmp_path / f"estimate-{kind}"
        args = ["--recipe", straight_recipe, "--deepspeed", setup["adam"], "--model", runs / "lora-straight" / model]
        proc = run_job([sys.executable, estimate, *args, "--out", out], timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        pirs[kind] = torch.tensor([p for row in read_parquet_rows(out / "shard-0.parquet") for p in row["pir"]])
    assert pirs["merged"].abs().max() > 0.1  # not a model that ignores the profile
    torch.testing.assert_close(pirs["adapter"], pirs["merged"], atol=1e-4, rtol=0)
    torch.testing.assert_close(pirs["checkpoint"], pirs["adapter"], atol=1e-6, rtol=0)


def read_parquet_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
