"""Build or load a causal LM under ZeRO-3 and wrap it so one engine serves both PerCE passes.

`PerceLM.forward` returns log-probs of the response tokens only: it runs the decoder, takes the
hidden states that predict response positions and applies the output embedding in chunks
(perce_ds.loss.chunked_token_logprobs), so no [batch, seq, vocab] tensor is ever built.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from perce_ds.config import ConfigError, ModelConfig
from perce_ds.loss import chunked_argmax_hits, chunked_token_logprobs
from perce_ds.profiling import phase

log = logging.getLogger("perce_ds")


def flash_attn_available() -> bool:
    """True when flash-attn is installed *and* its CUDA extension really imports on a GPU."""
    if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        import flash_attn_2_cuda  # noqa: F401  (the compiled part; the Python package alone is not enough)
    except ImportError:
        return False
    return True


def resolve_attn_implementation(requested: str) -> str:
    """Pick the attention kernel before the model is built (transformers fails late otherwise)."""
    if requested == "flash_attention_2" and not flash_attn_available():
        raise RuntimeError(
            "model.attn_implementation=flash_attention_2 but flash-attn is not usable here "
            f"(cuda available: {torch.cuda.is_available()}, flash_attn installed: "
            f"{importlib.util.find_spec('flash_attn') is not None}). Install the 'flash' extra on a CUDA "
            "machine, or use model.attn_implementation=auto (sdpa uses PyTorch's own flash kernels on CUDA)"
        )
    if requested != "auto":
        return requested
    return "flash_attention_2" if flash_attn_available() else "sdpa"


def check_packing_kernel(packing: bool, device: torch.device, attn_implementation: str) -> None:
    """Packed micro-batches on CUDA need a varlen kernel (flash_attention_2 with its CUDA module importable).

    Under sdpa/eager, packing relies on transformers turning the restarting position ids into a dense
    block-diagonal [total, total] mask: quadratic in the packed length and off sdpa's flash kernel (slower than
    padding), and any path that drops that mask lets sequences attend to each other. On CPU that mask path is
    what tests compare against padding; on a GPU only the varlen kernel is worth packing for.
    """
    if packing and device.type == "cuda" and attn_implementation != "flash_attention_2":
        raise ConfigError(
            f"data.packing=true on CUDA needs flash-attn's varlen kernel, but attention is {attn_implementation}: "
            "packed sequences would go through a dense block mask. Install the 'flash' extra (and keep "
            "model.attn_implementation=auto or flash_attention_2), or set data.packing=false"
        )


def resolve_dtype(requested: str) -> torch.dtype:
    """auto: bf16 on a GPU that supports it, fp32 elsewhere (CPU bf16 matmuls are slow and inexact)."""
    if requested == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[requested]


def hidden_size(cfg: ModelConfig) -> int:
    """The model's hidden size (DeepSpeed's ZeRO-3 bucket sizes follow it): from model.config or the pretrained
    folder's config.json; 1024 when the architecture does not name one."""
    if cfg.config is not None:
        return int(cfg.config.get("hidden_size", 1024))
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(cfg.name_or_path), "hidden_size", 1024))


def build_causal_lm(cfg: ModelConfig, tokenizer: Any, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    """The HF causal LM, pretrained or from `cfg.config`.

    Under ZeRO-3 the caller must hold a live `HfDeepSpeedConfig` so transformers builds the model
    inside zero.Init (weights partitioned at construction and initialised correctly).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    if cfg.name_or_path is not None:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    else:
        arch = dict(cfg.config)
        model_type = arch.pop("model_type")
        arch.setdefault("vocab_size", len(tokenizer))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            arch.setdefault(name, getattr(tokenizer, name))
        config = AutoConfig.for_model(model_type, **arch)
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    unsupported = [k for k in ("final_logit_softcapping", "logit_scale") if getattr(model.config, k, None)]
    if unsupported:
        raise ValueError(
            f"{type(model).__name__} transforms its logits ({unsupported}); the chunked log-prob head "
            "assumes logits = hidden @ lm_head.weight.T and would compute the wrong loss"
        )
    if model.get_output_embeddings() is None or getattr(model.get_output_embeddings(), "bias", None) is not None:
        raise ValueError(f"{type(model).__name__} has no bias-free output embedding; not supported")
    return model


DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def active_dropout(lm: nn.Module) -> list[str]:
    """Where `lm` drops out in train mode: dropout modules with p > 0, and config fields named *dropout* or *pdrop*
    above 0 (attention kernels read those as a functional dropout). Heads a causal LM never runs (classifier,
    sequence summary) do not count. Empty for the shipped Qwen3 / Llama / SmolLM2 recipes."""
    found = [f"{name} (p={m.p})" for name, m in lm.named_modules() if isinstance(m, DROPOUT_MODULES) and m.p > 0]
    config = getattr(lm, "config", None)
    for key, value in (config.to_dict() if hasattr(config, "to_dict") else {}).items():
        named = ("dropout" in key or "pdrop" in key) and not any(head in key for head in ("classifier", "summary"))
        if named and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            found.append(f"config.{key}={value}")
    return found


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0-based positions counted over real tokens only (prompts are left-padded)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class PerceLM(nn.Module):
    """The module handed to deepspeed.initialize: an HF causal LM plus a response-only log-prob head."""

    def __init__(self, lm: nn.Module, logprob_chunk_size: int = 1024):
        super().__init__()
        self.lm = lm
        self.logprob_chunk_size = logprob_chunk_size
        # Found once, at set-up: a model with dropout gets its PIR from eval-mode passes (see `forward`).
        self.dropout_sources = active_dropout(lm)
        head_weight = lm.get_output_embeddings().weight
        if hasattr(head_weight, "ds_id"):
            # forward() reads lm_head.weight without calling lm_head: tell ZeRO-3 to gather it for
            # this module's forward and backward.
            import deepspeed

            deepspeed.zero.register_external_parameter(self, head_weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        with_entropy: bool = False,
        position_ids: torch.Tensor | None = None,
        predict_index: torch.Tensor | None = None,
        ablated: dict[str, torch.Tensor | None] | None = None,
        with_hits: bool = False,
    ) -> dict[str, torch.Tensor | None]:
        """Log-probs of the real response tokens.

        Padded layout: input_ids/attention_mask [B, T], the last R = response_ids.shape[1] columns
        being the (right-padded) response. Packed layout (attention_mask None): input_ids and
        position_ids [1, total], predict_index [B, R] the flat position predicting each response
        token. Returns {"logp": [N] fp32, "entropy": [N] or None} in row-major order of
        response_mask's True entries; `with_hits` adds "hits" ([N] bool: the conditioned argmax is the token).

        `ablated` (input_ids, attention_mask, position_ids, predict_index of the persona-ablated pass, same
        response) adds "logp_ablated": computed first, without grad or activation checkpointing. Both passes
        in one call make one ZeRO-3 step: with two engine calls, DeepSpeed restarts its prefetch trace at
        each, records only the ablated forward, finds the backward longer and drops the trace, so the
        backward and the ablated forward never prefetch (and every layer is gathered once per pass).

        PIR compares two passes, so both must run without dropout (its masks would differ between them and put
        noise in PIR and the weights): the ablated pass always runs in eval mode. On a model with dropout
        (`dropout_sources`) in train mode, a grad call also runs the conditioned pass once more, no-grad and in
        eval mode, first: its log-probs come back as "logp_stats" and its entropy as "entropy", the statistics
        the weights are made of, while "logp" (train mode, dropout on) carries the gradient. A no-grad call runs
        its conditioned pass in eval mode directly. Models without dropout pay nothing.
        """
        out: dict[str, torch.Tensor | None] = {}
        if ablated is not None:
            # Nothing to save without grad; never inference_mode: its tensors break a later ZeRO-3 backward.
            with self.activation_checkpointing_paused(), self.dropout_off(), torch.no_grad(), phase("ablated_fwd"):
                out["logp_ablated"] = self.pass_logprobs(
                    response_ids=response_ids, response_mask=response_mask, **ablated
                )[0]
        cond = (input_ids, attention_mask, position_ids, predict_index, response_ids, response_mask)
        eval_stats = ablated is not None and bool(self.dropout_sources) and self.lm.training
        stats_entropy = None
        if eval_stats and torch.is_grad_enabled():
            with self.activation_checkpointing_paused(), self.dropout_off(), torch.no_grad(), phase("cond_fwd_stats"):
                out["logp_stats"], stats_entropy, _ = self.pass_logprobs(*cond, with_entropy)
            with_entropy = False  # the statistics' entropy is the eval pass's
        eval_cond = eval_stats and not torch.is_grad_enabled()
        with self.dropout_off(eval_cond), phase("cond_fwd" if torch.is_grad_enabled() else "cond_fwd_nograd"):
            logp, entropy, hits = self.pass_logprobs(*cond, with_entropy, with_hits)
        if with_hits:
            out["hits"] = hits
        return {"logp": logp, "entropy": entropy if stats_entropy is None else stats_entropy, **out}

    def pass_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        predict_index: torch.Tensor | None,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        with_entropy: bool = False,
        with_hits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One pass: (logp, entropy or None, argmax hits or None) of the real response tokens (layouts as in
        `forward`). Call it inside `forward` only: under ZeRO-3 the output embedding is gathered by this
        module's forward."""
        if attention_mask is not None:
            position_ids = position_ids_from_mask(attention_mask)
        hidden = (
            self.lm.get_decoder()(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
        ).last_hidden_state
        if predict_index is None:
            # The hidden state at t predicts token t+1: positions T-R-1 .. T-2 predict the response.
            selected = hidden[:, -(response_ids.shape[1] + 1) : -1][response_mask]
        else:
            selected = hidden.flatten(0, 1)[predict_index[response_mask]]
        weight, targets = self.lm.get_output_embeddings().weight, response_ids[response_mask]
        logp, entropy = chunked_token_logprobs(selected, weight, targets, self.logprob_chunk_size, with_entropy)
        hits = chunked_argmax_hits(selected, weight, targets, self.logprob_chunk_size) if with_hits else None
        return logp, entropy, hits

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Turn non-reentrant activation checkpointing on or off for good (once, at set-up).

        transformers' enable also registers an input-embedding hook each time it is called (and drops the
        old handle), so passes that only need it off for a while use `activation_checkpointing_paused`.
        """
        # transformers renamed gradient_checkpointing_* to activation_checkpointing_* during 5.x (5.17 has only
        # the old names, 5.25 both): use whichever this install has.
        renamed = hasattr(self.lm, "activation_checkpointing_enable")
        if enabled == (self.lm.is_activation_checkpointing if renamed else self.lm.is_gradient_checkpointing):
            return
        if enabled and renamed:
            self.lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif enabled:
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            (self.lm.activation_checkpointing_disable if renamed else self.lm.gradient_checkpointing_disable)()

    @contextlib.contextmanager
    def dropout_off(self, active: bool = True) -> Iterator[None]:
        """The LM in eval mode inside (no dropout; `active` False: unchanged); each submodule's own train/eval flag
        comes back on exit, also after an exception. PerceLM's own flag is left alone, so DeepSpeed's engine sees
        no mode change."""
        modes = [(m, m.training) for m in self.lm.modules()] if active else []
        if active:
            self.lm.train(False)
        try:
            yield
        finally:
            for module, training in modes:
                module.training = training

    @contextlib.contextmanager
    def activation_checkpointing_paused(self) -> Iterator[None]:
        """No checkpointing inside (no-grad passes, evaluation, generation); the previous per-layer state
        comes back on exit, also after an exception. Flips the layers' flags only: no hooks are added."""
        layers = [m for m in self.lm.modules() if getattr(m, "gradient_checkpointing", False)]
        for layer in layers:
            layer.gradient_checkpointing = False
        try:
            yield
        finally:
            for layer in layers:
                layer.gradient_checkpointing = True
