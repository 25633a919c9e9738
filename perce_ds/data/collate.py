"""Pad a micro-batch into the two passes: prompts left-padded, responses right-padded.

Both passes end in the same [B, R] response block, so response position j is column T-R+j in
either pass and the per-token log-probs of the two passes line up one to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from perce_ds.data.prompts import TokenizedExample


@dataclass
class PassInputs:
    input_ids: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R]

    def to(self, device: torch.device | str) -> PassInputs:
        return PassInputs(self.input_ids.to(device), self.attention_mask.to(device))

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


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


def collate(examples: list[TokenizedExample], pad_id: int) -> MicroBatch:
    """Stack examples into one MicroBatch (an empty list gives a batch with no rows)."""
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
    return MicroBatch(
        record_ids=[e.record_id for e in examples],
        conditioned=_pass([e.cond_prompt_ids for e in examples], response, response_mask, pad_id),
        ablated=_pass([e.abl_prompt_ids for e in examples], response, response_mask, pad_id),
        response_ids=response,
        response_mask=response_mask,
        persona_mask=persona,
    )
