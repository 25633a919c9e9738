"""Which records each rank sees at each optimizer step: a pure function of (seed, step).

Resuming therefore needs only the step number, and the same global batch is seen whatever the
split into ranks x micro-batches x accumulation steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DataOrder:
    n_records: int
    world_size: int
    micro_batch_size: int
    grad_accum: int
    seed: int

    def __post_init__(self) -> None:
        if self.n_records < self.global_batch:
            raise ValueError(
                f"{self.n_records} training records cannot fill one global batch of {self.global_batch} "
                f"(micro_batch_size {self.micro_batch_size} x grad_accum {self.grad_accum} x {self.world_size} ranks): "
                "add data or lower train.micro_batch_size / train.grad_accum"
            )

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.n_records // self.global_batch

    @property
    def dropped_per_epoch(self) -> int:
        """Records left out of each epoch (a different random few each epoch)."""
        return self.n_records - self.steps_per_epoch * self.global_batch

    def _epoch_permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_records, generator=gen)

    def window(self, step: int, rank: int) -> list[list[int]]:
        """Record indices for `rank` at optimizer step `step`: grad_accum lists of micro_batch_size."""
        epoch, within = divmod(step, self.steps_per_epoch)
        batch = self._epoch_permutation(epoch)[within * self.global_batch : (within + 1) * self.global_batch]
        micro = []
        for m in range(self.grad_accum):
            start = (m * self.world_size + rank) * self.micro_batch_size
            micro.append(batch[start : start + self.micro_batch_size].tolist())
        return micro


def shard_batches(n_items: int, rank: int, world_size: int, batch_size: int) -> list[tuple[list[int], list[bool]]]:
    """Micro-batches of this rank's strided shard of range(n_items), for no-grad passes over a split.

    Shards are padded to the same length with item 0 (flag False: score but do not count), so every
    rank runs the same number of forwards: ZeRO-3 forwards are collectives.
    """
    per_rank = -(-n_items // world_size)
    shard = list(range(rank, n_items, world_size))
    counted = [True] * len(shard) + [False] * (per_rank - len(shard))
    shard += [0] * (per_rank - len(shard))
    return [(shard[s : s + batch_size], counted[s : s + batch_size]) for s in range(0, per_rank, batch_size)]
