"""Lay out a micro-batch for the two passes, padded or packed.

Padded: prompts left-padded, responses right-padded; both passes end in the same [B, R] response
block, so response position j is column T-R+j in either pass.
Packed (data.packing): all sequences of a pass in one row, no padding; position ids restart per
sequence (transformers then masks attention block-diagonally: flash-attn varlen on GPU, a masked
kernel elsewhere) and `predict_index` [B, R] holds the flat position whose hidden state predicts
each response token. Either way the model returns log-probs in the row-major order of
response_mask's True entries, so everything downstream is layout-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from perce_ds.data.prompts import TokenizedExample


@dataclass
class PassInputs:
    input_ids: torch.Tensor  # padded [B, P + R]; packed [1, total]
    attention_mask: torch.Tensor | None  # None when packed (position ids carry the sequence boundaries)
    position_ids: torch.Tensor | None = None  # packed only
    predict_index: torch.Tensor | None = None  # packed only: [B, R] flat position predicting each response token

    def to(self, device: torch.device | str) -> PassInputs:
        return PassInputs(*(t.to(device) if t is not None else None for t in
                            (self.input_ids, self.attention_mask, self.position_ids, self.predict_index)))  # fmt: skip

    def as_kwargs(self) -> dict[str, torch.Tensor | None]:
        """This pass's tensors as PerceLM.forward keywords (also the form of its `ablated` argument)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids, "predict_index": self.predict_index}  # fmt: skip

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens in this pass."""
        return int(self.input_ids.numel() if self.attention_mask is None else self.attention_mask.sum())

    @property
    def n_positions(self) -> int:
        """Positions the model computes, padding included."""
        return int(self.input_ids.numel())


@dataclass
class MicroBatch:
    record_ids: list[str]
    conditioned: PassInputs
    ablated: PassInputs
    response_ids: torch.Tensor  # [B, R], pad where response_mask is False
    response_mask: torch.Tensor  # [B, R] bool
    persona_mask: torch.Tensor  # [B, R] bool, ground-truth persona tokens (all False when unknown)

    @property
    def n_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    def seq_ids(self) -> torch.Tensor:
        """Row index of each real response token, in the flat order the model returns them."""
        rows = torch.arange(self.response_mask.shape[0], device=self.response_mask.device)
        return rows[:, None].expand_as(self.response_mask)[self.response_mask]

    def to(self, device: torch.device | str) -> MicroBatch:
        return MicroBatch(
            self.record_ids,
            self.conditioned.to(device),
            self.ablated.to(device),
            self.response_ids.to(device),
            self.response_mask.to(device),
            self.persona_mask.to(device),
        )


def _pass(prompts: list[list[int]], response: torch.Tensor, response_mask: torch.Tensor, pad_id: int) -> PassInputs:
    width = max((len(p) for p in prompts), default=0)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
    return PassInputs(torch.cat([ids, response], 1), torch.cat([mask, response_mask.long()], 1))


def _packed_pass(prompts: list[list[int]], responses: list[list[int]], width: int) -> PassInputs:
    ids, positions, predict = [], [], torch.zeros((len(prompts), width), dtype=torch.long)
    offset = 0
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        seq = prompt + response
        ids += seq
        positions += range(len(seq))
        predict[row, : len(response)] = offset + len(prompt) - 1 + torch.arange(len(response))
        offset += len(seq)
    return PassInputs(torch.tensor([ids]), None, torch.tensor([positions]), predict)


def collate(
    examples: list[TokenizedExample], pad_id: int, packed: bool = False, scored: list[bool] | None = None
) -> MicroBatch:
    """Stack examples into one MicroBatch (an empty list gives a batch with no rows).

    Rows with `scored` False still run through both passes (every rank must run the same passes) but
    have no response tokens counted: they pad a rank's shard to the common number of micro-batches."""
    width = max((len(e.response_ids) for e in examples), default=0)
    response = torch.full((len(examples), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    persona = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, ex in enumerate(examples):
        n = len(ex.response_ids)
        response[row, :n] = torch.tensor(ex.response_ids)
        response_mask[row, :n] = True
        if ex.persona_token_mask:
            persona[row, :n] = torch.tensor(ex.persona_token_mask)
    cond_prompts, abl_prompts = [e.cond_prompt_ids for e in examples], [e.abl_prompt_ids for e in examples]
    if packed:
        responses = [e.response_ids for e in examples]
        conditioned, ablated = _packed_pass(cond_prompts, responses, width), _packed_pass(abl_prompts, responses, width)
    else:
        conditioned = _pass(cond_prompts, response, response_mask, pad_id)
        ablated = _pass(abl_prompts, response, response_mask, pad_id)
    if scored is not None:
        response_mask &= torch.tensor(scored, dtype=torch.bool)[:, None]
    return MicroBatch(
        record_ids=[e.record_id for e in examples],
        conditioned=conditioned,
        ablated=ablated,
        response_ids=response,
        response_mask=response_mask,
        persona_mask=persona,
    )


def fuse_passes(batch: MicroBatch, pad_id: int) -> tuple[PassInputs, torch.Tensor, torch.Tensor]:
    """Both passes as one forward: conditioned rows first, then ablated rows.

    Returns (inputs, response_ids, response_mask) for the fused pass; the model's output then holds
    the conditioned tokens' log-probs followed by the ablated ones, each in the usual order.
    """
    cond, abl = batch.conditioned, batch.ablated
    ids2, mask2 = (
        torch.cat([batch.response_ids, batch.response_ids]),
        torch.cat([batch.response_mask, batch.response_mask]),
    )
    if cond.attention_mask is None:  # packed: one longer row
        shift = cond.input_ids.shape[1]
        fused = PassInputs(torch.cat([cond.input_ids, abl.input_ids], 1), None,
                           torch.cat([cond.position_ids, abl.position_ids], 1),
                           torch.cat([cond.predict_index, abl.predict_index + shift]))  # fmt: skip
        return fused, ids2, mask2
    width = max(cond.input_ids.shape[1], abl.input_ids.shape[1])

    def left_pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

    fused = PassInputs(torch.cat([left_pad(cond.input_ids, pad_id), left_pad(abl.input_ids, pad_id)]),
                       torch.cat([left_pad(cond.attention_mask, 0), left_pad(abl.attention_mask, 0)]))  # fmt: skip
    return fused, ids2, mask2
