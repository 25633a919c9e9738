"""Conditioned and persona-ablated prompts, tokenised from pieces so the response ids are shared.

conditioned user turn = profile block + query;  ablated user turn = query.
Both use the same system message and chat template; the response is tokenised once, on its own,
and appended to both prompts, so the two passes score exactly the same token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from perce_ds.data.records import PersonaRecord, RecordError

PROFILE_HEADER = "Here is what this user wrote before:\n"
PROFILE_CONNECTOR = "Use the above to understand the user's style and preferences, and answer this request:\n"


@dataclass
class PromptSettings:
    system_prompt: str
    max_length: int
    max_profile_tokens: int


@dataclass
class TokenizedExample:
    record_id: str
    cond_prompt_ids: list[int]
    abl_prompt_ids: list[int]
    response_ids: list[int]  # ends with EOS; identical in both passes by construction
    persona_token_mask: list[bool] = field(default_factory=list)  # per response token; [] when unknown
    profile_items_kept: int = 0
    profile_items_dropped: int = 0


def render_profile_item(item: dict[str, Any]) -> str:
    """One profile item as a line: "title: text" for the common shape, else "key: value; ..."."""
    if set(item) >= {"title", "text"}:
        rest = "; ".join(f"{k}: {v}" for k, v in item.items() if k not in ("title", "text"))
        return f"{item['title']}: {item['text']}" + (f" ({rest})" if rest else "")
    return "; ".join(f"{k}: {v}" for k, v in item.items())


def profile_block(items: list[dict[str, Any]]) -> str:
    """The text removed for the ablated pass; empty when no item is kept."""
    if not items:
        return ""
    return PROFILE_HEADER + "".join(f"- {render_profile_item(it)}\n" for it in items) + PROFILE_CONNECTOR


def render_prompt(tokenizer: Any, system_prompt: str, user_content: str) -> str:
    """The chat-templated prompt text up to and including the assistant header."""
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": user_content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def response_token_ids(tokenizer: Any, response: str, spans: list[list[int]]) -> tuple[list[int], list[bool]]:
    """Response ids (+ EOS) and, when spans are given, which tokens overlap a persona span."""
    enc = tokenizer(response, add_special_tokens=False, return_offsets_mapping=bool(spans))
    ids = list(enc["input_ids"]) + [tokenizer.eos_token_id]
    if not spans:
        return ids, []
    mask = [any(s < end and start < e for s, e in spans) for start, end in enc["offset_mapping"]]
    return ids, mask + [False]


def tokenize_record(record: PersonaRecord, tokenizer: Any, settings: PromptSettings, source: str) -> TokenizedExample:
    """Build both prompts; drop whole profile items (from the end) until the budgets hold.

    Budgets: the profile block's tokens <= max_profile_tokens and conditioned prompt + response
    <= max_length. The response is never cut: a record that cannot fit even without its profile
    raises RecordError naming the field to shorten.
    """
    response_ids, persona_mask = response_token_ids(tokenizer, record.response, record.persona_spans)
    abl_ids = _ids(tokenizer, render_prompt(tokenizer, settings.system_prompt, record.query))
    if len(abl_ids) + len(response_ids) > settings.max_length:
        field_name = "response" if len(response_ids) >= settings.max_length else "query"
        raise RecordError(
            source,
            f"record {record.record_id}",
            field_name,
            f"prompt ({len(abl_ids)} tokens) + response ({len(response_ids)} tokens) exceed "
            f"data.max_length={settings.max_length} even without the profile",
            "raise data.max_length, shorten the record, or set data.on_bad_record=skip",
        )
    budget = min(settings.max_profile_tokens, settings.max_length - len(abl_ids) - len(response_ids))

    def cond_prompt(kept: int) -> list[int]:
        user_content = profile_block(record.profile[:kept]) + record.query
        return _ids(tokenizer, render_prompt(tokenizer, settings.system_prompt, user_content))

    def fits(ids: list[int]) -> bool:
        return len(ids) - len(abl_ids) <= budget

    # Start from an estimate built on separately tokenised lines (off by a token or so at item
    # boundaries), then settle it on the real prompt in both directions.
    item_costs = [len(_ids(tokenizer, f"- {render_profile_item(it)}\n")) for it in record.profile]
    kept, used = 0, len(_ids(tokenizer, PROFILE_HEADER + PROFILE_CONNECTOR))
    for cost in item_costs:
        if used + cost > budget:
            break
        kept, used = kept + 1, used + cost
    cond_ids = cond_prompt(kept)
    while kept > 0 and not fits(cond_ids):
        kept -= 1
        cond_ids = cond_prompt(kept)
    while kept < len(record.profile) and fits(bigger := cond_prompt(kept + 1)):
        kept, cond_ids = kept + 1, bigger
    return TokenizedExample(
        record_id=record.record_id,
        cond_prompt_ids=cond_ids,
        abl_prompt_ids=abl_ids,
        response_ids=response_ids,
        persona_token_mask=persona_mask,
        profile_items_kept=kept,
        profile_items_dropped=len(record.profile) - kept,
    )
