"""Tests for the run config (YAML + dotted overrides), the DeepSpeed config resolver and CLI override parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from perce_ds.cli import parse_overrides
from perce_ds.config import ConfigError, LossConfig, RunConfig, TrainConfig
from perce_ds.ds_config import load_ds_config, resolve_ds_config, zero_stage

REPO = Path(__file__).resolve().parents[1]
DS_DIR = REPO / "ds_configs"

RECIPE = {
    "model": {"config": {"model_type": "qwen3", "hidden_size": 16}, "tokenizer_vocab_size": 256},
    "data": {"synthetic": {"enabled": True, "users": 5}},
    "loss": {"scheme": "perce", "clip_min": 0.5, "clip_max": 8.0},
    "train": {"lr": 1.0e-3, "micro_batch_size": 2},
}


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "my_recipe.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


def _load_raw(tmp_path, raw, overrides=(), name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return RunConfig.load(path, list(overrides))


# --------------------------------------------------------------------------- RunConfig.load


def test_load_recipe_values_and_defaults(recipe):
    cfg = RunConfig.load(recipe)
    assert cfg.model.config == {"model_type": "qwen3", "hidden_size": 16}
    assert cfg.model.name_or_path is None
    assert cfg.model.tokenizer_vocab_size == 256
    assert cfg.data.synthetic.enabled is True and cfg.data.synthetic.users == 5
    assert cfg.loss.clip_min == 0.5 and cfg.loss.clip_max == 8.0
    assert cfg.train.lr == 1e-3 and cfg.train.micro_batch_size == 2
    # Defaults for everything the recipe does not set.
    assert cfg.data.synthetic.train_per_user == 8
    assert cfg.model.attn_implementation == "auto" and cfg.model.activation_checkpointing is True
    assert cfg.train.grad_accum == 1 and cfg.train.adam_betas == [0.9, 0.95]
    assert cfg.train.lr_scheduler == "cosine" and cfg.train.seed == 42
    assert cfg.loss.allow_nonpositive_clip_min is False and cfg.loss.logprob_chunk_size == 1024
    assert cfg.recipe == str(recipe)
    assert cfg.train.run_name == "my_recipe"
    assert cfg.run_dir == Path("runs") / "my_recipe"


def test_load_without_recipe_uses_defaults_and_overrides():
    cfg = RunConfig.load(None, ["model.name_or_path=some/model", "data.synthetic.enabled=true"])
    assert cfg.model.name_or_path == "some/model"
    assert cfg.recipe == ""
    assert cfg.train.run_name == "run"
    assert cfg.loss == LossConfig()
    assert cfg.train == TrainConfig(run_name="run")


def test_overrides_of_nested_values(recipe):
    cfg = RunConfig.load(
        recipe,
        [
            "data.synthetic.users=3",
            "train.lr=1e-4",
            "train.adam_betas=[0.9,0.99]",
            "loss.clip_max=3",
            "train.run_name=custom",
            "model.activation_checkpointing=false",
            "data.train_files=a.jsonl",
        ],
    )
    assert cfg.data.synthetic.users == 3 and isinstance(cfg.data.synthetic.users, int)
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.adam_betas == [0.9, 0.99] and all(isinstance(b, float) for b in cfg.train.adam_betas)
    assert cfg.loss.clip_max == 3.0 and isinstance(cfg.loss.clip_max, float)
    assert cfg.train.run_name == "custom"
    assert cfg.model.activation_checkpointing is False
    assert cfg.data.train_files == ["a.jsonl"]
    # Values not overridden keep the recipe's; named train files replace the recipe's synthetic data.
    assert cfg.data.synthetic.enabled is False and cfg.train.micro_batch_size == 2


def test_exponent_strings_become_floats(tmp_path):
    raw = {**RECIPE, "train": {"lr": "2e-5", "weight_decay": "1e-2"}}
    cfg = _load_raw(tmp_path, raw, ["loss.clip_min=5e-1"])
    assert cfg.train.lr == pytest.approx(2e-5) and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == pytest.approx(0.01)
    assert cfg.loss.clip_min == pytest.approx(0.5) and isinstance(cfg.loss.clip_min, float)


def test_override_without_equals_is_rejected(recipe):
    with pytest.raises(ConfigError, match="train.lr"):
        RunConfig.load(recipe, ["train.lr"])


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        RunConfig.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        RunConfig.load(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        RunConfig.load(lst)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lrr=1e-4", "train.lrr"),
        ("data.synthetic.userz=3", "data.synthetic.userz"),
        ("optim.lr=1", "optim"),
    ],
)
def test_unknown_keys_name_the_dotted_key(recipe, override, key):
    with pytest.raises(ConfigError, match=f"unknown config key {key}"):
        RunConfig.load(recipe, [override])


def test_unknown_key_in_recipe_file(tmp_path):
    raw = {**RECIPE, "loss": {"scheme": "perce", "clipmin": 0.5}}
    with pytest.raises(ConfigError, match="loss.clipmin"):
        _load_raw(tmp_path, raw)
    raw = {**RECIPE, "extra": 1}
    with pytest.raises(ConfigError, match="unknown config key extra"):
        _load_raw(tmp_path, raw)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.max_steps=abc", "train.max_steps"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("train.epochs=true", "train.epochs"),
        ("model.activation_checkpointing=5", "model.activation_checkpointing"),
        ("train.lr=abc", "train.lr"),
        ("train.adam_betas=0.9", "train.adam_betas"),
        ("train.adam_betas=[0.9,x]", r"train.adam_betas\[1\]"),
        ("model.name_or_path=[a,b]", "model.name_or_path"),
        ("model.config=5", "model.config"),
        ("data.synthetic=3", "data.synthetic"),
        ("model.attn_implementation=foo", "model.attn_implementation"),
        ("model.dtype=bf32", "model.dtype"),
        ("train.lr_scheduler=step", "train.lr_scheduler"),
    ],
)
def test_wrong_types_name_the_key(recipe, override, key):
    with pytest.raises(ConfigError, match=key):
        RunConfig.load(recipe, [override])


def test_keep_best_patience_needs_the_metric_and_evaluations(recipe):
    with pytest.raises(ConfigError, match="train.keep_best_patience=2.*train.keep_best"):
        RunConfig.load(recipe, ["train.keep_best_patience=2", "train.eval_every=4"])
    with pytest.raises(ConfigError, match="train.keep_best_patience=2.*train.eval_every"):
        RunConfig.load(recipe, ["train.keep_best_patience=2", "train.keep_best=eval_ce", "train.eval_every=0"])
    with pytest.raises(ConfigError, match="train.keep_best_patience must be >= 0"):
        RunConfig.load(recipe, ["train.keep_best_patience=-1"])
    cfg = RunConfig.load(recipe, ["train.keep_best_patience=2", "train.keep_best=eval_ce", "train.eval_every=4"])
    assert cfg.train.keep_best_patience == 2


def test_literal_error_lists_choices(recipe):
    with pytest.raises(ConfigError) as exc:
        RunConfig.load(recipe, ["model.attn_implementation=foo"])
    assert "foo" in str(exc.value) and "sdpa" in str(exc.value)
    cfg = RunConfig.load(recipe, ["model.attn_implementation=sdpa"])
    assert cfg.model.attn_implementation == "sdpa"


def test_unknown_scheme_rejected(recipe):
    with pytest.raises(ConfigError, match="loss.scheme"):
        RunConfig.load(recipe, ["loss.scheme=foo"])


def test_clip_bounds_validation(recipe):
    with pytest.raises(ConfigError, match="clip_min"):
        RunConfig.load(recipe, ["loss.clip_min=6", "loss.clip_max=5"])
    cfg = RunConfig.load(recipe, ["loss.clip_min=5", "loss.clip_max=5"])
    assert cfg.loss.clip_min == cfg.loss.clip_max == 5.0
    for bad in ("0", "-0.5"):
        with pytest.raises(ConfigError, match="allow_nonpositive_clip_min"):
            RunConfig.load(recipe, [f"loss.clip_min={bad}"])
        cfg = RunConfig.load(recipe, [f"loss.clip_min={bad}", "loss.allow_nonpositive_clip_min=true"])
        assert cfg.loss.clip_min == float(bad)


def test_model_source_validation(tmp_path):
    both = {**RECIPE, "model": {"name_or_path": "x/y", "config": {"model_type": "qwen3"}}}
    with pytest.raises(ConfigError, match="exactly one"):
        _load_raw(tmp_path, both)
    neither = {**RECIPE, "model": {"tokenizer_vocab_size": 256}}
    with pytest.raises(ConfigError, match="exactly one"):
        _load_raw(tmp_path, neither)
    no_type = {**RECIPE, "model": {"config": {"hidden_size": 8}}}
    with pytest.raises(ConfigError, match="model_type"):
        _load_raw(tmp_path, no_type)
    cfg = _load_raw(tmp_path, {**RECIPE, "model": {"name_or_path": "x/y"}})
    assert cfg.model.name_or_path == "x/y" and cfg.model.config is None


def test_no_data_is_an_error(tmp_path):
    raw = {**RECIPE, "data": {}}
    with pytest.raises(ConfigError, match="data"):
        _load_raw(tmp_path, raw)
    cfg = _load_raw(tmp_path, raw, ["data.train_files=[a.jsonl,b.parquet]"])
    assert cfg.data.train_files == ["a.jsonl", "b.parquet"]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("train.grad_accum=0", "train.grad_accum"),
        ("train.max_steps=-1", "train.max_steps"),
        ("train.adam_betas=[0.9]", "train.adam_betas"),
        ("data.max_length=4", "data.max_length"),
    ],
)
def test_range_validation(recipe, override, key):
    with pytest.raises(ConfigError, match=key):
        RunConfig.load(recipe, [override])


def test_dump_then_load_round_trips(recipe, tmp_path):
    cfg = RunConfig.load(recipe, ["train.lr=2e-5", "train.adam_betas=[0.8,0.9]", "data.train_files=[x.jsonl]"])
    out = tmp_path / "dumped" / "config.yaml"
    out.parent.mkdir()
    cfg.dump(out)
    again = RunConfig.load(out)
    a, b = cfg.to_dict(), again.to_dict()
    # `recipe` records where the config was loaded from, so it now names the dumped file ...
    assert b["recipe"] == str(out)
    assert a["recipe"] == str(recipe)
    # ... while run_name was already set in the dump, so it is kept (not replaced by "config").
    assert b["train"]["run_name"] == a["train"]["run_name"] == "my_recipe"
    a.pop("recipe")
    b.pop("recipe")
    assert a == b
    assert again.train.lr == pytest.approx(2e-5) and isinstance(again.train.lr, float)


# --------------------------------------------------------------------------- parse_overrides


def test_parse_overrides_forms():
    assert parse_overrides([]) == []
    assert parse_overrides(["--a.b", "1"]) == ["a.b=1"]
    assert parse_overrides(["--a.b=1"]) == ["a.b=1"]
    assert parse_overrides(["--a.b", "1", "--c.d.e=x=y", "--loss.clip_min", "-1"]) == [
        "a.b=1",
        "c.d.e=x=y",
        "loss.clip_min=-1",
    ]


@pytest.mark.parametrize(
    "args",
    [["--a.b"], ["--a.b", "1", "--c.d"], ["--ab", "1"], ["--ab=1"], ["a.b=1"], ["-a.b", "1"], ["--a.b", "1", "x"]],
)
def test_parse_overrides_errors(args):
    with pytest.raises(ConfigError):
        parse_overrides(args)


def test_parse_overrides_feed_runconfig(recipe):
    cfg = RunConfig.load(recipe, parse_overrides(["--train.lr", "3e-4", "--data.synthetic.users=7"]))
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.data.synthetic.users == 7


# --------------------------------------------------------------------------- DeepSpeed config


def _walk(node, prefix=""):
    """Every (dotted key, leaf value), descending into dicts and lists."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{prefix}[{i}]")
    else:
        yield prefix, node


def _run_cfg(recipe, *overrides):
    return RunConfig.load(recipe, ["train.micro_batch_size=3", "train.grad_accum=4", "train.lr=2e-5", *overrides])


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json", "zero2.json"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_resolve_shipped_configs(recipe, name, dtype):
    raw = load_ds_config(DS_DIR / name)
    raw_copy = json.loads(json.dumps(raw))
    cfg = _run_cfg(recipe, "train.max_grad_norm=0.5", "train.weight_decay=0.1", "train.adam_betas=[0.9,0.99]")
    world, hidden = 4, 64
    ds = resolve_ds_config(raw, cfg, world_size=world, hidden_size=hidden, dtype=dtype)
    assert raw == raw_copy  # the input is not modified

    autos = [k for k, v in _walk(ds) if v == "auto"]
    assert autos == []
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 3 * 4 * world
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is (dtype == torch.bfloat16)
    assert ds.get("fp16", {}).get("enabled", False) is False
    params = ds["optimizer"]["params"]
    assert params["lr"] == pytest.approx(2e-5)
    assert list(params["betas"]) == [0.9, 0.99]
    assert params["weight_decay"] == pytest.approx(0.1)
    assert params["eps"] == pytest.approx(1e-8)
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == hidden**2
    stage = zero_stage(ds)
    assert stage == (2 if name == "zero2.json" else 3)
    if stage == 3:
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * hidden**2)
        assert zero["stage3_param_persistence_threshold"] == 10 * hidden
    else:
        assert "stage3_prefetch_bucket_size" not in zero
    if not torch.cuda.is_available():
        assert params["torch_adam"] is True
        for key in ("offload_optimizer", "offload_param"):
            if key in zero:
                assert zero[key]["pin_memory"] is False
    # Values the JSON fixes are kept.
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["steps_per_print"] == raw["steps_per_print"]


@pytest.mark.parametrize(
    ("prebuilt", "nvcc", "user", "want"),
    [
        (False, False, None, True),  # CUDA, no nvcc, FusedAdam not prebuilt: torch's AdamW, no JIT build
        (False, True, None, True),  # nvcc there: still no JIT build by default (it failed on the H200 image)
        (True, False, None, None),  # FusedAdam prebuilt: DeepSpeed's FusedAdam, nothing to build
        (False, False, True, True),  # the user's explicit choice runs
        (False, True, False, False),  # explicit FusedAdam with nvcc: JIT-built as asked
        (False, False, False, "error"),  # explicit FusedAdam that cannot be built: refused, naming the key
    ],
)
def test_gpu_optimizer_needs_no_jit_build_without_nvcc(recipe, monkeypatch, prebuilt, nvcc, user, want):
    import perce_ds.ds_config as dsc

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dsc, "fused_adam_needs_jit", lambda: not prebuilt)
    monkeypatch.setattr(dsc, "jit_toolchain_available", lambda: nvcc)
    raw = load_ds_config(DS_DIR / "zero3.json")
    if user is not None:
        raw["optimizer"]["params"]["torch_adam"] = user
    if want == "error":
        with pytest.raises(ConfigError, match="torch_adam"):
            resolve_ds_config(raw, _run_cfg(recipe), world_size=1, hidden_size=8, dtype=torch.bfloat16)
        return
    ds = resolve_ds_config(raw, _run_cfg(recipe), world_size=1, hidden_size=8, dtype=torch.bfloat16)
    assert ds["optimizer"]["params"].get("torch_adam") is want
    offload = load_ds_config(DS_DIR / "zero3_offload.json")  # ZeRO-Offload keeps DeepSpeed's CPU Adam
    ds = resolve_ds_config(offload, _run_cfg(recipe), world_size=1, hidden_size=8, dtype=torch.bfloat16)
    assert "torch_adam" not in ds["optimizer"]["params"]


def test_jit_toolchain_detection_reads_path_and_cuda_home(tmp_path, monkeypatch):
    import perce_ds.ds_config as dsc

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    dsc.jit_toolchain_available.cache_clear()
    assert dsc.jit_toolchain_available() is False
    (tmp_path / "cuda" / "bin").mkdir(parents=True)
    (tmp_path / "cuda" / "bin" / "nvcc").write_text("")
    dsc.jit_toolchain_available.cache_clear()
    assert dsc.jit_toolchain_available() is True
    dsc.jit_toolchain_available.cache_clear()


def test_resolve_world_size_scales_batch(recipe):
    raw = load_ds_config(DS_DIR / "zero3.json")
    cfg = _run_cfg(recipe)
    for world in (1, 2, 8):
        ds = resolve_ds_config(raw, cfg, world_size=world, hidden_size=8, dtype=torch.float32)
        assert ds["train_batch_size"] == 12 * world


def test_resolve_fp16_and_minimal_config(recipe):
    cfg = _run_cfg(recipe)
    ds = resolve_ds_config({}, cfg, world_size=2, hidden_size=10, dtype=torch.float16)
    assert ds["fp16"]["enabled"] is True
    assert "bf16" not in ds
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["zero_optimization"]["stage"] == 0
    assert ds["zero_optimization"]["reduce_bucket_size"] == 100
    assert ds["train_batch_size"] == 24
    assert [k for k, v in _walk(ds) if v == "auto"] == []


def test_resolve_rejects_fixed_micro_batch_mismatch(recipe):
    raw = load_ds_config(DS_DIR / "zero3.json")
    cfg = _run_cfg(recipe)
    with pytest.raises(ConfigError, match="micro"):
        resolve_ds_config({**raw, "train_micro_batch_size_per_gpu": 5}, cfg, 1, 8, torch.float32)
    with pytest.raises(ConfigError, match="accumulation"):
        resolve_ds_config({**raw, "gradient_accumulation_steps": 1}, cfg, 1, 8, torch.float32)
    # Fixed values that agree are fine.
    ds = resolve_ds_config({**raw, "train_micro_batch_size_per_gpu": 3}, cfg, 1, 8, torch.float32)
    assert ds["train_micro_batch_size_per_gpu"] == 3


def test_resolve_rejects_fixed_dtype_mismatch(recipe):
    raw = load_ds_config(DS_DIR / "zero3.json")
    cfg = _run_cfg(recipe)
    with pytest.raises(ConfigError, match="bf16"):
        resolve_ds_config({**raw, "bf16": {"enabled": True}}, cfg, 1, 8, torch.float32)
    with pytest.raises(ConfigError, match="bf16"):
        resolve_ds_config({**raw, "bf16": {"enabled": False}}, cfg, 1, 8, torch.bfloat16)


def test_resolve_rejects_unknown_auto(recipe):
    cfg = _run_cfg(recipe)
    with pytest.raises(ConfigError, match="foo.bar"):
        resolve_ds_config({"foo": {"bar": "auto"}}, cfg, 1, 8, torch.float32)
    raw = load_ds_config(DS_DIR / "zero2.json")
    raw["zero_optimization"]["allgather_bucket_size"] = "auto"
    with pytest.raises(ConfigError, match="zero_optimization.allgather_bucket_size"):
        resolve_ds_config(raw, cfg, 1, 8, torch.float32)


def test_resolve_rejects_auto_inside_a_list(recipe):
    # The module promises that no "auto" ever reaches DeepSpeed; one inside a list must not slip through.
    cfg = _run_cfg(recipe)
    raw = load_ds_config(DS_DIR / "zero3.json")
    raw["optimizer"]["params"]["betas"] = ["auto", "auto"]
    with pytest.raises(ConfigError, match="betas"):
        resolve_ds_config(raw, cfg, 1, 8, torch.float32)


def test_load_ds_config_errors(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(ConfigError, match="missing.json"):
        load_ds_config(missing)
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": "auto",')
    with pytest.raises(ConfigError, match="bad.json"):
        load_ds_config(bad)
    good = tmp_path / "good.json"
    good.write_text('{"a": {"b": 1}}')
    assert load_ds_config(good) == {"a": {"b": 1}}


def test_named_data_files_replace_the_recipes_synthetic_data(tmp_path):
    """The default recipe enables synthetic data; a user's --data.train_files must win, not be ignored."""
    demo = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
    assert RunConfig.load(demo).data.synthetic.enabled
    cfg = RunConfig.load(demo, ["data.train_files=my.jsonl", "data.eval_files=my_eval.jsonl"])
    assert not cfg.data.synthetic.enabled
    assert (cfg.data.train_files, cfg.data.eval_files) == (["my.jsonl"], ["my_eval.jsonl"])
    from perce_ds.data.pipeline import data_files

    assert data_files(cfg) == (["my.jsonl"], ["my_eval.jsonl"])
    with pytest.raises(ConfigError, match="name data.train_files too"):
        RunConfig.load(demo, ["data.eval_files=my_eval.jsonl"])


@pytest.mark.parametrize("source", ["longlamp", "lamp"])
@pytest.mark.parametrize("key", ["train_files", "eval_files"])
def test_data_files_with_a_task_source_are_an_error_naming_both_keys(source, key):
    """A task source reads its own splits: files named beside it would be ignored, so the config is refused and
    the message names data.source, the files key and both ways out."""
    base = ["model.config={model_type: qwen3}", f"data.source={source}", "data.lamp.path=/data/lamp"]
    RunConfig.load(None, base)  # the source alone is fine
    with pytest.raises(ConfigError) as info:
        RunConfig.load(None, [*base, f"data.{key}=my.jsonl"])
    message = str(info.value)
    assert f"data.source={source}" in message and f"data.{key}" in message and "data.source=files" in message
