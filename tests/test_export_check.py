"""The export-time check that an hf/ folder would load in vLLM: a good export passes, each broken one fails
naming the file and what is wrong (a CPU test: it reads the files, vLLM is not needed)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from perce_ds import checkpoint
from perce_ds.config import ModelConfig
from perce_ds.export_check import ExportCheckError, check_export, expected_state
from perce_ds.model import build_causal_lm
from tests.launch_utils import TINY_QWEN3


def _model(tokenizer, tied: bool):
    cfg = ModelConfig(config={**TINY_QWEN3, "tie_word_embeddings": tied})
    return build_causal_lm(cfg, tokenizer, torch.float32, "sdpa")


@pytest.fixture(scope="module")
def exported(sp_tokenizer, tmp_path_factory):
    """(an export of an untied tiny model, its model, the tokenizer)."""
    out = tmp_path_factory.mktemp("export") / "hf"
    lm = _model(sp_tokenizer, tied=False)
    checkpoint.export_hf(lm, sp_tokenizer, out, True, "card\n")  # runs check_export: a good export passes
    return out, lm, sp_tokenizer


def _broken_copy(exported, tmp_path, edit_config=None, edit_weights=None):
    src, lm, tok = exported
    dst = tmp_path / "hf"
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_weights:
        state = load_file(str(dst / "model.safetensors"))
        edit_weights(state)
        save_file(state, str(dst / "model.safetensors"))
    shapes, embedding = expected_state(lm)
    return lambda: check_export(dst, shapes, embedding, len(tok))


def test_a_good_export_passes_for_tied_and_untied_models(exported, sp_tokenizer, tmp_path):
    out, lm, tok = exported
    shapes, embedding = expected_state(lm)
    assert "lm_head.weight" in shapes and embedding == "model.embed_tokens.weight"
    check_export(out, shapes, embedding, len(tok))
    tied = _model(sp_tokenizer, tied=True)
    checkpoint.export_hf(tied, sp_tokenizer, tmp_path / "tied", True, "card\n")
    tied_shapes, _ = expected_state(tied)
    assert "lm_head.weight" not in tied_shapes  # stored once, as export_hf stores it


def test_an_ungathered_zero3_parameter_is_refused(exported, tmp_path):
    def empty(state):
        state["model.layers.0.mlp.up_proj.weight"] = torch.empty(0)

    with pytest.raises(ExportCheckError, match=r"model.safetensors: tensor model.layers.0.mlp.up_proj.weight .*ZeRO-3"):
        _broken_copy(exported, tmp_path, edit_weights=empty)()


def test_a_missing_weight_and_an_untied_model_without_lm_head_are_refused(exported, tmp_path):
    def drop(state):
        del state["lm_head.weight"]

    with pytest.raises(ExportCheckError, match=r"missing .*lm_head.weight"):
        _broken_copy(exported, tmp_path, edit_weights=drop)()


def test_vocabulary_and_dtype_mismatches_are_refused(exported, tmp_path):
    def vocab(cfg):
        cfg["vocab_size"] += 64

    with pytest.raises(ExportCheckError, match=r"config.json: vocab_size \d+ but model.embed_tokens.weight has"):
        _broken_copy(exported, tmp_path / "a", edit_config=vocab)()

    def int_dtype(cfg):
        cfg.pop("torch_dtype", None)
        cfg["dtype"] = "int8"

    with pytest.raises(ExportCheckError, match=r"config.json: dtype 'int8'"):
        _broken_copy(exported, tmp_path / "b", edit_config=int_dtype)()

    def half_ints(state):
        state["model.norm.weight"] = state["model.norm.weight"].to(torch.int32)

    with pytest.raises(ExportCheckError, match=r"tensor model.norm.weight has dtype I32"):
        _broken_copy(exported, tmp_path / "c", edit_weights=half_ints)()


def test_export_hf_fails_when_the_tokenizer_outgrows_the_embedding(sp_tokenizer, tmp_path):
    lm = _model(sp_tokenizer, tied=False)
    lm.resize_token_embeddings(len(sp_tokenizer) - 8)  # a token id past the last row would crash at run time
    with pytest.raises(ExportCheckError, match=rf"tokenizer has {len(sp_tokenizer)} tokens but the embedding only"):
        checkpoint.export_hf(lm, sp_tokenizer, tmp_path / "hf", True, "card\n")
