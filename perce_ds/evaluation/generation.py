"""Batched, resumable, data-parallel generation (optionally ZeRO-3 synced) into a JSONL file.

Every rank gets the same list of items and computes the same plan: items not yet in the output
file are grouped by task (each task has its own max_new_tokens), sorted by prompt length and cut
into batches, dealt round-robin to ranks, and each rank's list is padded with filler batches (a
repeated batch whose outputs are discarded) so all ranks call `generate` the same number of times
— required under ZeRO-3, where every forward is a collective and `synced_gpus=True` keeps ranks
that finish early stepping until all are done. After each round the texts are gathered to rank 0,
which appends them to the file and flushes, so a killed evaluation loses at most one round.

What produces the tokens is a backend (`GenerationBackend`): Hugging Face `generate` in this process
(`HFBackend`, the default), offline vLLM (generation_vllm.py) or any OpenAI-compatible server
(generation_openai.py). Prompts, the stop on the end-of-turn id, decoding settings, the output rows and
resume are this module's, whatever the backend. A backend that does not pad prompts together
(`pads_batches=False`) is asked only for the records not yet answered, and each answer is appended as
it arrives (one process), so a killed evaluation re-asks nothing it had an answer for.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from perce_ds.data.prompts import end_of_turn_id

log = logging.getLogger("perce_ds")


@dataclass
class GenerationSettings:
    """Decoding settings. Greedy by default; `do_sample` enables temperature/top-p sampling."""

    max_new_tokens: int = 512
    max_new_tokens_per_task: dict[str, int] = field(default_factory=dict)
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def tokens_for(self, task: str) -> int:
        """max_new_tokens for `task` (the per-task value when set, else the default)."""
        return int(self.max_new_tokens_per_task.get(task, self.max_new_tokens))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class GenItem:
    """One prompt to complete: ids already chat-templated (perce_ds.data.prompts)."""

    record_id: str
    task: str
    prompt_ids: list[int]


FINISH_REASONS = ("stop", "length")  # stopped on EOS / end-of-turn; ran into max_new_tokens


@dataclass(frozen=True)
class Completion:
    """One generated answer: its text (stop token excluded, stripped), how many tokens were generated before the
    stop (the stop token not counted), and why generation ended: "stop" (EOS / end-of-turn) or "length"."""

    text: str
    n_generated_tokens: int
    finish_reason: str


class GenerationBackend(Protocol):
    """What generates: yields (position in `prompts`, Completion) for every prompt, in any order.

    `synced`: every rank must call `complete` together (ZeRO-3 generate). `pads_batches`: prompts of a batch
    are padded together, so a resumed batch must be sent whole for identical greedy outputs; otherwise only
    unanswered prompts are sent.
    """

    name: str
    synced: bool
    pads_batches: bool

    def complete(
        self, prompts: list[list[int]], max_new_tokens: int, settings: GenerationSettings, seed: int
    ) -> Iterator[tuple[int, Completion]]: ...


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids generation stops on: EOS and the chat template's end-of-turn id."""
    return sorted({tokenizer.eos_token_id, end_of_turn_id(tokenizer)})


def completion_from_ids(ids: list[int], stop_ids: list[int], tokenizer: Any) -> Completion:
    """Cut generated `ids` before the first stop id and decode; "stop" when one was there, else "length"."""
    ends = [i for i, t in enumerate(ids) if t in stop_ids]
    kept = ids[: ends[0]] if ends else ids
    return Completion(tokenizer.decode(kept, skip_special_tokens=True).strip(), len(kept), "stop" if ends else "length")


def read_generations(path: Path) -> dict[str, dict[str, Any]]:
    """record_id -> row of an existing generations file; a torn last line (a kill mid-write) is ignored."""
    rows: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return rows
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                log.warning("%s: ignoring a torn last line (interrupted write)", path)
                continue
            raise ValueError(f"{path}, line {n + 1}: not valid JSON; delete the file or pass --overwrite") from None
        rows[row["record_id"]] = row
    return rows


def _repair_tail(path: Path) -> None:
    """Cut a torn last line so appends start on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def plan_batches(
    items: list[GenItem], batch_size: int, world: int, done: set[str] | frozenset[str] = frozenset()
) -> list[list[list[int] | None]]:
    """Per rank, the same number of batches (lists of item indices); None marks a filler batch.

    Batches are cut from *all* items (by task, then prompt length) before finished ones are dropped, so
    a resumed run pads every prompt exactly as an uninterrupted one and greedy outputs are identical.
    A batch is kept when any of its items is not in `done`; world size does not change the batches.
    """
    order = sorted(range(len(items)), key=lambda i: (items[i].task, len(items[i].prompt_ids), items[i].record_id))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and items[batches[-1][0]].task == items[i].task:
            batches[-1].append(i)
        else:
            batches.append([i])
    batches = [b for b in batches if any(items[i].record_id not in done for i in b)]
    per_rank: list[list[list[int] | None]] = [batches[r::world] for r in range(world)]
    rounds = max((len(b) for b in per_rank), default=0)
    return [b + [None] * (rounds - len(b)) for b in per_rank]


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_completions(
    lm: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    settings: GenerationSettings,
    synced_gpus: bool = False,
    seed: int | None = None,
) -> list[Completion]:
    """Decode continuations of left-padded `prompts`; each stops before the first EOS or end-of-turn id
    (what the chat template closes an assistant turn with, which the model was trained to emit).

    With `synced_gpus=True` (ZeRO-3 over several ranks) every rank must call this together.
    """
    device = next(lm.parameters()).device
    ids, mask = _left_pad(prompts, tokenizer.pad_token_id, device)
    stop_ids = stop_token_ids(tokenizer)
    kwargs: dict[str, Any] = {"do_sample": settings.do_sample}
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
        torch.manual_seed(settings.seed if seed is None else seed)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = lm.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_ids,
        synced_gpus=synced_gpus,
        use_cache=True,
        **kwargs,
    )
    return [completion_from_ids(row, stop_ids, tokenizer) for row in out[:, ids.shape[1] :].tolist()]


def generate_batch(
    lm: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    settings: GenerationSettings,
    synced_gpus: bool = False,
    seed: int | None = None,
) -> list[str]:
    """The texts of generate_completions."""
    return [c.text for c in generate_completions(lm, tokenizer, prompts, max_new_tokens, settings, synced_gpus, seed)]


class HFBackend:
    """Hugging Face `generate` in this process (plain, or ZeRO-3 sharded with synced_gpus)."""

    name = "hf"
    pads_batches = True

    def __init__(self, lm: Any, tokenizer: Any, synced_gpus: bool = False) -> None:
        self.lm, self.tokenizer, self.synced = lm, tokenizer, synced_gpus

    def complete(
        self, prompts: list[list[int]], max_new_tokens: int, settings: GenerationSettings, seed: int
    ) -> Iterator[tuple[int, Completion]]:
        self.lm.eval()
        done = generate_completions(self.lm, self.tokenizer, prompts, max_new_tokens, settings, self.synced, seed)
        yield from enumerate(done)


def _broadcast(obj: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_generation(
    lm: Any,
    tokenizer: Any,
    items: list[GenItem],
    settings: GenerationSettings,
    out_path: Path,
    synced_gpus: bool = False,
    extra_fields: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
    backend: GenerationBackend | None = None,
) -> dict[str, dict[str, Any]]:
    """Generate every item not already in `out_path`; return record_id -> row for all items (every rank).

    Call on every rank with the same `items`. `backend` (default: HFBackend(lm, tokenizer, synced_gpus))
    produces the completions. Rank 0 owns the file: it reads the finished ids (broadcast to all), appends one
    JSON row per item ({"record_id", "task", "generation", "n_generated_tokens", "finish_reason",
    "max_new_tokens", **extra_fields[record_id]}) and flushes: as each answer arrives in one process, after
    each round (gathered from every rank) under a launcher.
    """
    from tqdm import tqdm

    backend = backend or HFBackend(lm, tokenizer, synced_gpus)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    done = _broadcast(read_generations(out_path) if rank == 0 else None)
    todo = [it for it in items if it.record_id not in done]
    plan = plan_batches(items, settings.batch_size, world, set(done))
    if rank == 0:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        _repair_tail(out_path)
        if done:
            log.info("%s: %d of %d already generated; resuming", out_path, len(items) - len(todo), len(items))
    bar = tqdm(total=len(todo), disable=rank != 0 or not progress, desc=f"generate ({backend.name})")
    for r in range(len(plan[rank]) if plan else 0):
        batch = plan[rank][r]
        filler = batch is None
        if filler:  # keep this rank stepping with the others; results discarded
            batch = [items.index(todo[0])]
        chosen = [items[i] for i in batch]
        if not backend.pads_batches:  # each prompt stands alone: ask only for what is missing
            chosen = [it for it in chosen if it.record_id not in done] or chosen[:1]
        rows: list[dict[str, Any]] = []
        if not filler or backend.synced:  # plain data parallel: a filler has nothing to keep in step with
            prompts = [it.prompt_ids for it in chosen]
            answers = backend.complete(prompts, settings.tokens_for(chosen[0].task), settings, settings.seed + batch[0])
            for pos, completion in answers:
                item = chosen[pos]
                if filler or item.record_id in done:
                    continue
                row = _row(item, completion, settings, extra_fields)
                if world == 1:  # append as it arrives: a kill loses nothing answered
                    _append(out_path, [[row]], done)
                    bar.update(1)
                else:
                    rows.append(row)
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, rows)
            if rank == 0:
                _append(out_path, gathered, done)
                bar.update(sum(len(part) for part in gathered))
    bar.close()
    if world > 1:
        done = _broadcast(done if rank == 0 else None)
    return {it.record_id: done[it.record_id] for it in items if it.record_id in done}


def _append(out_path: Path, parts: list[list[dict[str, Any]]], done: dict[str, dict[str, Any]]) -> None:
    with out_path.open("a", encoding="utf-8") as f:
        for part in parts:
            for row in part:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[row["record_id"]] = row
        f.flush()


def _row(
    item: GenItem, completion: Completion, settings: GenerationSettings, extra: dict[str, dict[str, Any]] | None
) -> dict[str, Any]:
    row = {"record_id": item.record_id, "task": item.task, "generation": completion.text}
    row["n_generated_tokens"] = completion.n_generated_tokens
    row["finish_reason"] = completion.finish_reason
    row["max_new_tokens"] = settings.tokens_for(item.task)
    if extra and item.record_id in extra:
        row.update(extra[item.record_id])
    return row


def texts_by_id(rows: Iterable[dict[str, Any]]) -> dict[str, str]:
    """record_id -> generated text."""
    return {r["record_id"]: r.get("generation") or "" for r in rows}
