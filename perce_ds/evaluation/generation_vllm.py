"""Generation with offline vLLM (`vllm.LLM`) on a run's exported hf/ folder: one process, tensor parallel over
the node's GPUs as an option. Needs a CUDA GPU and `pip install -e '.[vllm]'`.

vLLM is given the prompt token ids themselves (the ones the hf backend feeds `generate`), and its generated ids
are cut at the first EOS / end-of-turn id and decoded by generation.completion_from_ids, exactly as the hf
backend does: the text, the token count and the finish reason mean the same thing under both backends.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from perce_ds.errors import UserError
from perce_ds.evaluation.generation import Completion, GenerationSettings, completion_from_ids, stop_token_ids

NEEDS_GPU = (
    "--backend vllm needs a CUDA GPU (torch sees none here); on CPU use --backend hf, or --backend openai against "
    "a vLLM server running elsewhere"
)


class VLLMUnavailable(UserError, RuntimeError):
    """vLLM cannot run here: no CUDA GPU, or the package is not installed."""


def check_vllm_usable(world_size: int = 1) -> None:
    """Raise VLLMUnavailable with what to do when vLLM cannot run in this process."""
    import torch

    if not torch.cuda.is_available():
        raise VLLMUnavailable(NEEDS_GPU)
    if world_size > 1:
        raise VLLMUnavailable(
            "--backend vllm runs as one process (not under deepspeed/torchrun/srun ranks); spread it over GPUs "
            "with --tensor-parallel-size"
        )
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise VLLMUnavailable(f"--backend vllm: vLLM is not installed ({e}); run `pip install -e '.[vllm]'`") from None


class VLLMBackend:
    """GenerationBackend over `vllm.LLM`: each batch is one `generate` call (vLLM schedules it internally)."""

    name = "vllm"
    synced = False
    pads_batches = False

    def __init__(self, model_dir: Path, tokenizer: Any, dtype: str, tensor_parallel_size: int = 1) -> None:
        check_vllm_usable()
        from vllm import LLM

        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer)
        self.llm = LLM(
            model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, tensor_parallel_size=tensor_parallel_size
        )

    def complete(
        self, prompts: list[list[int]], max_new_tokens: int, settings: GenerationSettings, seed: int
    ) -> Iterator[tuple[int, Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sampling = {"temperature": settings.temperature, "top_p": settings.top_p} if settings.do_sample else {}
        params = SamplingParams(
            max_tokens=max_new_tokens,
            stop_token_ids=self.stop_ids,
            seed=seed,
            **({"temperature": 0.0} | sampling),
        )
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        for pos, out in enumerate(outputs):
            yield pos, completion_from_ids(list(out.outputs[0].token_ids), self.stop_ids, self.tokenizer)
