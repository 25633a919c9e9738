"""Step time over many steps: pausing activation checkpointing vs re-enabling it through transformers.

    python -m benchmarks.checkpoint_toggle [--steps 400] [--json PATH]     # from the repository root

PerceLM turns checkpointing off around the no-grad ablated pass every micro-batch. Through transformers'
activation_checkpointing_disable/enable that adds one input-embedding hook per call (enable runs
enable_input_require_grads and drops the old handle), so each forward runs one more hook than the last;
`PerceLM.activation_checkpointing_paused` flips the layers' flags instead. Both variants train the same tiny
model side by side in one process (interleaved blocks, so machine noise hits both), and the table compares
the last block's step time with the first's, plus the hook count at the end. A second table times the
embedding forward with as many hooks as 10^2, 10^3, 10^4 re-enabled steps leave (the cost grows linearly).
Ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from benchmarks.common import format_table, machine_info, write_json
from perce_ds.model import PerceLM


@contextlib.contextmanager
def reenabled_through_transformers(lm: PerceLM) -> Iterator[None]:
    """What the code did before: disable, then enable again through transformers."""
    lm.set_activation_checkpointing(False)
    try:
        yield
    finally:
        lm.set_activation_checkpointing(True)


def make_variant(seed: int) -> tuple[PerceLM, dict[str, torch.Tensor]]:
    config = AutoConfig.for_model(
        "qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    )  # fmt: skip
    torch.manual_seed(seed)
    lm = PerceLM(AutoModelForCausalLM.from_config(config)).train()
    lm.set_activation_checkpointing(True)
    ids = torch.randint(0, 512, (2, 48))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_ids": ids[:, -16:],
              "response_mask": torch.ones(2, 16, dtype=torch.bool)}  # fmt: skip
    return lm, inputs


def step(lm: PerceLM, inputs: dict[str, Any], pause: Any) -> float:
    t0 = time.perf_counter()
    with pause(lm), torch.no_grad():  # the ablated pass
        lm.pass_logprobs(inputs["input_ids"], inputs["attention_mask"], None, None, inputs["response_ids"],
                         inputs["response_mask"])  # fmt: skip
    logp = lm.pass_logprobs(inputs["input_ids"], inputs["attention_mask"], None, None, inputs["response_ids"],
                            inputs["response_mask"])[0]  # fmt: skip
    logp.sum().backward()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--block", type=int, default=25, help="steps per interleaved block")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    variants = {
        "paused (flags flipped)": (PerceLM.activation_checkpointing_paused, *make_variant(0)),
        "re-enabled (transformers)": (reenabled_through_transformers, *make_variant(0)),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(0, args.steps, args.block):
        for name, (pause, lm, inputs) in variants.items():
            times[name] += [step(lm, inputs, pause) for _ in range(args.block)]
    rows = []
    for name, (_, lm, _) in variants.items():
        first, last = statistics.median(times[name][: args.block]), statistics.median(times[name][-args.block :])
        rows.append({
            "variant": name, "steps": len(times[name]), "first_ms": 1e3 * first, "last_ms": 1e3 * last,
            "last_over_first": last / first, "embedding_hooks": len(lm.lm.get_input_embeddings()._forward_hooks),
        })  # fmt: skip
    print(format_table(rows, [("variant", "variant", ""), ("steps", "steps", ""), ("first_ms", "first block ms", ".2f"),
                              ("last_ms", "last block ms", ".2f"), ("last_over_first", "last/first", ".2f"),
                              ("embedding_hooks", "embedding hooks", "")]))  # fmt: skip
    hook_rows = embedding_cost_with_hooks()
    print()
    print(format_table(hook_rows, [("hooks", "embedding hooks", ""), ("forward_ms", "embedding forward ms", ".3f"),
                                   ("ratio", "vs 1 hook", ".1f")]))  # fmt: skip
    if args.json:
        write_json(args.json, {"machine": machine_info(), "rows": rows, "embedding_hooks": hook_rows})


def embedding_cost_with_hooks(counts: tuple[int, ...] = (1, 101, 1001, 10001), repeats: int = 200) -> list[dict]:
    """Median time of one embedding forward (micro-batch 2 x 512 tokens, hidden 64) carrying n hooks of the kind
    enable_input_require_grads registers."""
    embed = torch.nn.Embedding(512, 64)
    ids = torch.randint(0, 512, (2, 512))
    rows = []
    for n in counts:
        handles = [embed.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True)) for _ in range(n)]
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            embed(ids)
            samples.append(time.perf_counter() - t0)
        for h in handles:
            h.remove()
        rows.append({"hooks": n, "forward_ms": 1e3 * statistics.median(samples)})
    for row in rows:
        row["ratio"] = row["forward_ms"] / rows[0]["forward_ms"]
    return rows


if __name__ == "__main__":
    main()
