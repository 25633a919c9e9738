"""Run real multi-process DeepSpeed jobs from tests, and a plain-PyTorch reference of the PerCE step."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_job(
    cmd: list[str], timeout: int, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    """Run `cmd` in a process group of its own and, when it ends or times out, kill whatever is left of the
    group: a launcher killed alone orphans its ranks, which keep ports, memory and cores for the rest of
    the suite. A timeout fails the test with the output so far."""
    with subprocess.Popen(
        [str(c) for c in cmd], cwd=cwd, env=launch_env() if env is None else env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    ) as job:  # fmt: skip
        try:
            out, err = job.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            out, err = job.communicate()
            raise AssertionError(f"timed out after {timeout} s: {' '.join(map(str, cmd))}\n--- stdout\n{out[-6000:]}"
                                 f"\n--- stderr\n{err[-6000:]}") from None  # fmt: skip
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, job.returncode, out, err)


def run_deepspeed(script: Path, args: list[str], nproc: int, timeout: int = 300) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N script args` exactly as a user runs it (gloo on CPU)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
           "--master_port", str(free_port()), str(script), *args]  # fmt: skip
    return run_job(cmd, timeout)


def leftover_shm_segments(proc: subprocess.CompletedProcess) -> list[Path]:
    """DeepSpeed's CPU shared-memory all-reduce segments named after this launch's master port."""
    port = proc.args[proc.args.index("--master_port") + 1]
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def train(
    tmp: Path, recipe: dict[str, Any], nproc: int, ds_config: Path, extra: list[str] = ()
) -> subprocess.CompletedProcess:
    recipe_path = write_recipe(tmp / f"recipe-{recipe['train']['run_name']}.yaml", recipe)
    return run_deepspeed(TRAIN, ["--deepspeed", str(ds_config), "--recipe", str(recipe_path), *extra], nproc)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def reference_logprobs(model: torch.nn.Module, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log P(response_t | prompt, response_<t) with full logits and log_softmax: the textbook way."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).squeeze(1)


def reference_perce_loss(
    model: torch.nn.Module, examples: list[Any], clip_min: float, clip_max: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/method.md's PerCE loss over `examples`, one unpadded sequence at a time, and the weights it used."""
    total, n, weights = torch.zeros(()), 0, []
    for ex in examples:
        logp_cond = reference_logprobs(model, ex.cond_prompt_ids, ex.response_ids)
        with torch.no_grad():
            logp_abl = reference_logprobs(model, ex.abl_prompt_ids, ex.response_ids)
        w = (logp_cond.detach() - logp_abl).clamp(clip_min, clip_max)
        total = total - (w * logp_cond).sum()
        n += len(ex.response_ids)
        weights.append(w)
    return total / n, torch.cat(weights)


def assert_weights_exercise_perce(weights: torch.Tensor, clip_min: float, clip_max: float) -> None:
    """An equivalence test of PerCE means something only when its weights are not all clip_min (that is
    clip_min x CE): many must lie strictly inside the clip range and some on each bound."""
    n = weights.numel()
    at_min, at_max = int((weights <= clip_min).sum()), int((weights >= clip_max).sum())
    inside = n - at_min - at_max
    shares = f"{at_min} at clip_min, {inside} inside, {at_max} at clip_max of {n}"
    assert inside >= 0.2 * n and at_min >= 0.05 * n and at_max >= 0.05 * n, shares


def build_tiny_setup(root: Path) -> dict[str, Path]:
    """Synthetic data files, a trained tokenizer, a saved random tiny model, an SGD ZeRO-3 config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from perce_ds.data.synthetic import generate_records, write_jsonl
    from perce_ds.data.tokenizer import train_sentencepiece_tokenizer

    train_records, eval_records = generate_records(8, 4, 0, "train"), generate_records(8, 1, 0, "eval")
    write_jsonl(train_records, root / "train.jsonl")
    write_jsonl(eval_records, root / "eval.jsonl")
    texts = [t for r in train_records for t in (r.query, r.response, *(i["text"] for i in r.profile))]
    tok = train_sentencepiece_tokenizer(texts, root / "init_model", vocab_size=400)
    torch.manual_seed(0)
    # initializer_range 0.3 (not 0.02): the random model then reads the profile strongly enough that PIR
    # spreads over the whole clip range of recipe() (about 59% at clip_min, 30% inside, 11% at clip_max on
    # the first global batch), so equivalence tests exercise PerCE rather than clip_min x CE.
    config = AutoConfig.for_model(
        "qwen3", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        initializer_range=0.3,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(root / "init_model")
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["optimizer"] = {"type": "SGD", "params": {"lr": "auto"}}  # SGD: updates are gradients, easy to compare
    ds["zero_allow_untested_optimizer"] = True
    (root / "zero3_sgd.json").write_text(json.dumps(ds))
    return {"root": root, "train": root / "train.jsonl", "eval": root / "eval.jsonl", "model": root / "init_model",
            "sgd": root / "zero3_sgd.json", "adam": ROOT / "ds_configs" / "zero3.json"}  # fmt: skip


def recipe(setup: dict[str, Path], run_name: str, **train_overrides) -> dict:
    return {
        "model": {"name_or_path": str(setup["model"]), "attn_implementation": "sdpa", "activation_checkpointing": True},
        "data": {
            "train_files": [str(setup["train"])],
            "eval_files": [str(setup["eval"])],
            # Room for the profiles (prompts up to ~420 tokens): at 256 / 160 every profile was cut away and
            # conditioned == ablated for every record (PIR 0, all weights clip_min).
            "max_length": 512,
            "max_profile_tokens": 384,
        },  # fmt: skip
        # clip_max 3 (paper: 5) so that a share of this random model's tokens reaches the upper bound
        "loss": {"scheme": "perce", "clip_min": 0.8, "clip_max": 3.0},
        "train": {
            "max_steps": 1,
            "micro_batch_size": 2,
            "grad_accum": 1,
            "lr": 1.0,
            "lr_scheduler": "constant",
            "warmup_ratio": 0.0,
            "max_grad_norm": 0.0,
            "weight_decay": 0.0,
            "output_dir": str(setup["root"] / "runs"),
            "run_name": run_name,
            "tensorboard": False,
            "dist_timeout_s": 120,
            **train_overrides,
        },  # fmt: skip
    }


EVALUATE = ROOT / "launch" / "evaluate.py"
TINY_QWEN3 = {
    "model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024,
    "tie_word_embeddings": False,  # a random tied model just repeats its last token
}  # fmt: skip


def make_eval_run(run_dir: Path, users: int = 4, eval_per_user: int = 2, seed: int = 0) -> Path:
    """A run directory as training leaves it (config.yaml, data/, tokenizer/, hf/, metrics.jsonl) holding a
    random tiny Qwen3, so evaluation can be tested without training."""
    from perce_ds.config import RunConfig
    from perce_ds.data.pipeline import setup_files
    from perce_ds.data.tokenizer import load_tokenizer
    from perce_ds.model import build_causal_lm

    recipe = {
        "model": {"config": dict(TINY_QWEN3), "tokenizer_vocab_size": 400, "attn_implementation": "sdpa"},
        "data": {"synthetic": {"enabled": True, "users": users, "train_per_user": 2, "eval_per_user": eval_per_user,
                               "seed": seed}, "max_length": 384, "max_profile_tokens": 256},
        "train": {"output_dir": str(run_dir.parent), "run_name": run_dir.name, "seed": seed},
    }  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig.load(write_recipe(run_dir.parent / f"{run_dir.name}.yaml", recipe))
    cfg.dump(run_dir / "config.yaml")
    setup_files(cfg, True, lambda: None)
    tok = load_tokenizer(run_dir / "tokenizer")
    torch.manual_seed(seed)
    lm = build_causal_lm(cfg.model, tok, torch.float32, "sdpa")
    lm.save_pretrained(run_dir / "hf")
    tok.save_pretrained(run_dir / "hf")
    rows = [
        {"step": s, "loss": 5.0 / s, "ce": 6.0 / s, "pir_mean": 0.1 * s, "personal_ratio": 0.05 * s} for s in (1, 2, 3)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def run_python(script: Path, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`python script args` in one plain process (no launcher)."""
    return run_job([sys.executable, str(script), *args], timeout)


SMOLLM2_DIR = ROOT / ".models" / "SmolLM2-135M-Instruct"


def build_smollm2() -> Path:
    """The SmolLM2-135M-Instruct folder (launch/setup_smollm2.py; built once, reused when complete)."""
    check(run_job([sys.executable, ROOT / "launch" / "setup_smollm2.py", "--out", SMOLLM2_DIR], timeout=1200))
    assert (SMOLLM2_DIR / ".complete").is_file()
    return SMOLLM2_DIR


def make_smollm2_run(run_dir: Path, model_dir: Path) -> Path:
    """A run directory evaluating SmolLM2 itself (recipes/persona_smollm2.yaml's data; hf/ links to the model)."""
    from perce_ds.config import RunConfig

    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"model.name_or_path={model_dir}",
        f"train.output_dir={run_dir.parent}",
        f"train.run_name={run_dir.name}",
    ]
    RunConfig.load(ROOT / "recipes" / "persona_smollm2.yaml", overrides).dump(run_dir / "config.yaml")
    (run_dir / "hf").symlink_to(model_dir.resolve(), target_is_directory=True)
    return run_dir
