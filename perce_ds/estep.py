"""Offline E-step: per-token PIR and weights for a whole dataset, stored with a fingerprint.

Layout of a weights directory:
    shard-<rank>.parquet   record_id, response_ids, pir, weight (one row per record, lists per token)
    index.json             fingerprint + shard list; written last, so its presence means "complete"

The fingerprint has four parts, each a short hash: `data` (the tokenised examples the weights are
aligned to), `tokenizer`, `model` (the model that estimated them) and `settings` (scheme, clip).
An M-step refuses a directory whose fingerprint differs from its own and says which part differs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from perce_ds.config import ConfigError, RunConfig
from perce_ds.data.collate import MicroBatch, collate
from perce_ds.data.order import shard_batches
from perce_ds.data.pipeline import PreparedData
from perce_ds.data.prompts import TokenizedExample
from perce_ds.fingerprints import digest, json_digest, tokenizer_fingerprint, weight_files_fingerprint
from perce_ds.loss import TokenStats, WeightScheme, token_weights

log = logging.getLogger("perce_ds")
INDEX = "index.json"


def data_fingerprint(examples: list[TokenizedExample]) -> str:
    return json_digest([(e.record_id, e.cond_prompt_ids, e.abl_prompt_ids, e.response_ids) for e in examples])[:16]


def model_fingerprint(cfg: RunConfig) -> str:
    """An HF folder: its config plus its weight files (fingerprints.weight_files_fingerprint); a from-scratch
    model: its architecture and seed (deterministic init); a hub id: the id."""
    if cfg.model.name_or_path is None:
        return json_digest({"config": cfg.model.config, "seed": cfg.train.seed})[:16]
    folder = Path(cfg.model.name_or_path)
    if not folder.is_dir():
        return json_digest({"hub_id": cfg.model.name_or_path})[:16]
    config = (folder / "config.json").read_text() if (folder / "config.json").exists() else ""
    return digest([config, weight_files_fingerprint(folder)])[:16]


def settings_fingerprint(cfg: RunConfig) -> str:
    settings = {"scheme": cfg.loss.scheme, "clip_min": cfg.loss.clip_min, "clip_max": cfg.loss.clip_max}
    if cfg.loss.ce_mix:  # the weights hold the mix; absent at 0 so earlier estimates keep their fingerprint
        settings["ce_mix"] = cfg.loss.ce_mix
    return json_digest(settings)[:16]


def fingerprint(cfg: RunConfig, examples: list[TokenizedExample], tokenizer: Any) -> dict[str, str]:
    return {
        "data": data_fingerprint(examples),
        "tokenizer": tokenizer_fingerprint(tokenizer)[:16],
        "model": model_fingerprint(cfg),
        "settings": settings_fingerprint(cfg),
    }


class Scorer(Protocol):
    """What the E-step needs of a trainer (perce_ds.engine.Trainer built with inference_only=True)."""

    cfg: RunConfig
    data: PreparedData
    tokenizer: Any
    scheme: WeightScheme
    rank: int
    world: int
    is_rank0: bool
    device: torch.device

    def token_stats(self, batch: MicroBatch, step: int, micro: int) -> tuple[torch.Tensor, TokenStats]: ...


@torch.no_grad()
def estimate(trainer: Scorer, out_dir: Path) -> dict[str, Any]:
    """Run the no-grad PIR pass over the training split on all ranks and write the weights.

    Every rank scores its shard_batches(); the weights come from Trainer.token_stats, the very
    function online training uses, so offline and online weights agree for the same batch.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    cfg, examples = trainer.cfg, trainer.data.train
    if trainer.scheme.window_statistic is not None:
        raise ConfigError(
            f"loss.scheme={cfg.loss.scheme} normalises its weights over each optimizer step's global batch, which "
            "an offline E-step cannot know; estimate weights for perce or shuffled_perce, or train this scheme online"
        )
    rank, world = trainer.rank, trainer.world
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"record_id": [], "response_ids": [], "pir": [], "weight": []}
    batches = shard_batches(len(examples), rank, world, cfg.train.micro_batch_size)
    for number, (idx, keep) in enumerate(tqdm(batches, disable=not trainer.is_rank0, desc="E-step")):
        batch = collate([examples[i] for i in idx], trainer.tokenizer.pad_token_id, scored=keep)
        batch = batch.to(trainer.device)
        # Each batch its own draws (shuffled_perce), as each training micro-batch has: the batch's number on this
        # rank plays the step (the trainer's generator also keys on the rank), so a rerun draws the same.
        _, stats = trainer.token_stats(batch, step=number, micro=0)
        weights = token_weights(stats, cfg.loss, trainer.scheme)
        for i, counted, pir, w in zip(idx, keep, _split(batch, stats.pir), _split(batch, weights), strict=True):
            if not counted:
                continue
            rows["record_id"].append(examples[i].record_id)
            rows["response_ids"].append(examples[i].response_ids)
            rows["pir"].append(pir.float().cpu().tolist())
            rows["weight"].append(w.float().cpu().tolist())
    schema = pa.schema([("record_id", pa.string()), ("response_ids", pa.list_(pa.int64())),
                        ("pir", pa.list_(pa.float32())), ("weight", pa.list_(pa.float32()))])  # fmt: skip
    pq.write_table(pa.table(rows, schema=schema), out_dir / f"shard-{rank}.parquet")
    dist.barrier()
    index = {
        "fingerprint": fingerprint(cfg, examples, trainer.tokenizer),
        "model": cfg.model.name_or_path,
        "shards": [f"shard-{r}.parquet" for r in range(world)],
        "records": len(examples),
        "scheme": cfg.loss.scheme,
    }
    if trainer.is_rank0:
        (out_dir / INDEX).write_text(json.dumps(index, indent=2))
    dist.barrier()
    return index


def _split(batch: MicroBatch, flat: torch.Tensor) -> list[torch.Tensor]:
    """Per-row pieces of a flat per-token tensor (row-major over response_mask)."""
    return list(torch.split(flat, batch.response_mask.sum(1).tolist()))


class OfflineWeights:
    """Stored weights for an M-step, checked against this run's fingerprint."""

    def __init__(self, path: str | Path, expected: dict[str, str]):
        import pyarrow.parquet as pq

        self.path = Path(path)
        index_path = self.path / INDEX
        if not index_path.is_file():
            raise ConfigError(
                f"loss.weights_from={self.path}: no {INDEX} (the E-step did not finish); run launch/estimate.py"
            )
        index = json.loads(index_path.read_text())
        differ = [k for k in expected if index["fingerprint"].get(k) != expected[k]]
        if differ:
            detail = "; ".join(f"{k}: stored {index['fingerprint'].get(k)} vs this run {expected[k]}" for k in differ)
            raise ConfigError(
                f"loss.weights_from={self.path} was estimated for a different {', '.join(differ)} ({detail}). "
                "Re-run the E-step (launch/estimate.py) with this run's data, tokenizer, model and loss settings"
            )
        self.by_record: dict[str, tuple[list[int], list[float], list[float]]] = {}
        for shard in index["shards"]:
            table = pq.read_table(self.path / shard).to_pydict()
            for rid, ids, pir, w in zip(
                table["record_id"], table["response_ids"], table["pir"], table["weight"], strict=True
            ):
                self.by_record[rid] = (ids, pir, w)

    def for_batch(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, pir) in the flat token order of the batch; checks token alignment."""
        weights, pirs = [], []
        for row, rid in enumerate(batch.record_ids):
            n = int(batch.response_mask[row].sum())
            if n == 0:
                continue
            if rid not in self.by_record:
                raise KeyError(f"{self.path}: no stored weights for record {rid}")
            ids, pir, w = self.by_record[rid]
            if ids[:n] != batch.response_ids[row, :n].tolist() or len(w) != n:
                raise ValueError(f"{self.path}: stored response tokens of record {rid} differ from this run's")
            weights.append(torch.tensor(w, dtype=torch.float32))
            pirs.append(torch.tensor(pir, dtype=torch.float32))
        empty = torch.zeros(0, dtype=torch.float32)
        device = batch.response_ids.device
        return (torch.cat(weights) if weights else empty).to(device), (torch.cat(pirs) if pirs else empty).to(device)
