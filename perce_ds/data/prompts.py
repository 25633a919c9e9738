"""Conditioned and persona-ablated prompts, tokenised from pieces so the response ids are shared.

conditioned user turn = profile block + query;  ablated user turn = query.
Both use the same system message and chat template; the response is tokenised once, on its own,
and appended to both prompts, so the two passes score exactly the same token ids.

Two profile layouts: the generic one (PersonaRecord files, the synthetic task) drops whole items from the
end to fit the budget; a task registered in perce_ds/data/tasks.py (LongLaMP, LaMP) gets its ProfileFormat's
LongLaMP-style block, whose budget is shared per item, unused tokens rolling over to later items, an item's
tail trimmed to fit. The format is looked up by the record's task name, so every caller of tokenize_record
(training, evaluation, tests) gets the same prompt for the same record.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from perce_ds.data.records import PersonaRecord, RecordError
from perce_ds.data.tasks import ProfileFormat, profile_format
from perce_ds.data.tokenizer import FALLBACK_CHAT_TEMPLATE

PROFILE_HEADER = "Here is what this user wrote before:\n"
PROFILE_CONNECTOR = "Use the above to understand the user's style and preferences, and answer this request:\n"


@dataclass
class PromptSettings:
    system_prompt: str
    max_length: int
    max_profile_tokens: int
    max_response_tokens: int = 0  # 0 = never cut the response
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # extra apply_chat_template arguments


@dataclass
class TokenizedExample:
    record_id: str
    cond_prompt_ids: list[int]
    abl_prompt_ids: list[int]
    response_ids: list[int]  # ends with EOS; identical in both passes by construction
    persona_token_mask: list[bool] = field(default_factory=list)  # per response token; [] when unknown
    # per response token: its class ("other", or the kind of the persona span it overlaps; "persona" for a
    # span without a kind); [] when the record has no spans. The token classes of every per-class score.
    persona_token_kinds: list[str] = field(default_factory=list)
    profile_items_kept: int = 0
    profile_items_dropped: int = 0
    profile_items_trimmed: int = 0  # kept items whose tail was cut to fit the budget
    profile_tokens_trimmed: int = 0  # item tokens left out (tails cut + dropped items), by the item's own count
    response_capped: bool = False  # response cut to max_response_tokens (then it carries no EOS)
    profile_block: str = ""  # the exact text the ablated prompt lacks ("" when nothing was kept)


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


def render_prompt(
    tokenizer: Any, system_prompt: str, user_content: str, template_kwargs: dict[str, Any] | None = None
) -> str:
    """The chat-template text of a system + user turn ending where the assistant's answer begins.

    `template_kwargs` go to apply_chat_template (data.chat_template_kwargs, e.g. Qwen3's
    enable_thinking=False); training, the E-step and generation all build their prompts here.
    """
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": user_content}]
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
    )


_TURN_MARKER = "PERCE-END-OF-TURN-PROBE"


def end_of_turn_id(tokenizer: Any, template_kwargs: dict[str, Any] | None = None) -> int:
    """The id that closes an assistant turn in the tokenizer's chat template, else EOS.

    Read from the template itself: the first token after an assistant message's content, when it is a
    special token (ChatML's <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>). A model must learn to
    end its answer with what its template puts there, which need not be the tokenizer's EOS (Llama-3
    tokenizers may say <|end_of_text|>). perce_ds's own fallback template (tokenizers that have none, models
    built from scratch) ends responses with EOS, as it always did.
    """
    # Rendering and tokenising a probe conversation costs milliseconds; tokenize_record asks once per record.
    # Cached per live tokenizer object (weakly: a freed tokenizer's entry goes with it) and template.
    per_tokenizer = _END_OF_TURN.setdefault(tokenizer, {})
    key = (tokenizer.chat_template, repr(sorted((template_kwargs or {}).items())))
    if key not in per_tokenizer:
        per_tokenizer[key] = _probe_end_of_turn_id(tokenizer, template_kwargs)
    return per_tokenizer[key]


_END_OF_TURN: weakref.WeakKeyDictionary[Any, dict[tuple[Any, str], int]] = weakref.WeakKeyDictionary()


def _probe_end_of_turn_id(tokenizer: Any, template_kwargs: dict[str, Any] | None) -> int:
    if tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE:
        return tokenizer.eos_token_id
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _TURN_MARKER}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **(template_kwargs or {}))
    except Exception:  # a template that cannot render an assistant turn: fall back to EOS
        return tokenizer.eos_token_id
    if _TURN_MARKER not in text:
        return tokenizer.eos_token_id
    after = _ids(tokenizer, text[text.rindex(_TURN_MARKER) + len(_TURN_MARKER) :])
    special = {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    return after[0] if after and after[0] in special else tokenizer.eos_token_id


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def response_token_ids(
    tokenizer: Any, response: str, spans: list[list[int]], end_id: int | None = None
) -> tuple[list[int], list[bool]]:
    """Response ids + the end-of-turn id (default EOS) and, when spans are given, which tokens overlap a span."""
    enc = tokenizer(response, add_special_tokens=False, return_offsets_mapping=bool(spans))
    ids = list(enc["input_ids"]) + [tokenizer.eos_token_id if end_id is None else end_id]
    if not spans:
        return ids, []
    mask = [any(s < end and start < e for s, e in spans) for start, end in enc["offset_mapping"]]
    return ids, mask + [False]


OTHER_TOKEN = "other"
# When spans of several kinds overlap one token, the later kind here wins (an inferable value sharing a token
# with a copied one counts as inferable); kinds not listed rank first.
KIND_PRECEDENCE = ("persona", "copy", "infer", "infer_heldout")


def response_token_kinds(tokenizer: Any, response: str, spans: list[list[int]], kinds: list[str]) -> list[str]:
    """The class of each response token (end-of-turn token included, always "other"): the kind of the span it
    overlaps ("persona" for spans without kinds), "other" outside every span; [] without spans."""
    if not spans:
        return []
    labels = kinds or ["persona"] * len(spans)
    rank = {k: i for i, k in enumerate(KIND_PRECEDENCE)}
    offsets = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    out = []
    for start, end in offsets:
        covering = [k for (s, e), k in zip(spans, labels) if s < end and start < e]
        out.append(max(covering, key=lambda k: rank.get(k, -1)) if covering else OTHER_TOKEN)
    return out + [OTHER_TOKEN]


def cap_response(ids: list[int], mask: list[bool], max_tokens: int) -> tuple[list[int], list[bool], bool]:
    """Cut a response to its first `max_tokens` ids (0 = no cap); a cut response loses its EOS.

    Why no EOS: teaching the model to stop where the cap fell would teach it to end texts mid-sentence.
    """
    if max_tokens <= 0 or len(ids) <= max_tokens:
        return ids, mask, False
    return ids[:max_tokens], mask[:max_tokens], True


def tokenize_record(record: PersonaRecord, tokenizer: Any, settings: PromptSettings, source: str) -> TokenizedExample:
    """Build both prompts; drop whole profile items (from the end) until the budgets hold.

    Budgets: the profile block's tokens <= max_profile_tokens and conditioned prompt + response
    <= max_length. The response is never cut: a record that cannot fit even without its profile
    raises RecordError naming the field to shorten.
    """
    kw = settings.chat_template_kwargs
    end_id = end_of_turn_id(tokenizer, kw)
    response_ids, persona_mask = response_token_ids(tokenizer, record.response, record.persona_spans, end_id)
    response_ids, persona_mask, capped = cap_response(response_ids, persona_mask, settings.max_response_tokens)
    token_kinds = response_token_kinds(tokenizer, record.response, record.persona_spans, record.persona_span_kinds)
    token_kinds = token_kinds[: len(response_ids)]
    abl_ids = _ids(tokenizer, render_prompt(tokenizer, settings.system_prompt, record.query, kw))
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
    fmt = profile_format(record.task)
    if fmt is not None:
        fit = build_block(
            record.profile, fmt, tokenizer, budget, settings.system_prompt, record.query, len(abl_ids), kw
        )
        return TokenizedExample(
            record_id=record.record_id,
            cond_prompt_ids=fit.cond_ids if fit.block else list(abl_ids),
            abl_prompt_ids=abl_ids,
            response_ids=response_ids,
            persona_token_mask=persona_mask,
            persona_token_kinds=token_kinds,
            profile_items_kept=fit.kept,
            profile_items_dropped=len(record.profile) - fit.kept,
            profile_items_trimmed=fit.trimmed_items,
            profile_tokens_trimmed=fit.trimmed_tokens,
            response_capped=capped,
            profile_block=fit.block,
        )

    def cond_prompt(kept: int) -> list[int]:
        user_content = profile_block(record.profile[:kept]) + record.query
        return _ids(tokenizer, render_prompt(tokenizer, settings.system_prompt, user_content, kw))

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
        persona_token_kinds=token_kinds,
        profile_items_kept=kept,
        profile_items_dropped=len(record.profile) - kept,
        profile_tokens_trimmed=sum(item_costs[kept:]),
        response_capped=capped,
        profile_block=profile_block(record.profile[:kept]),
    )


@dataclass
class BlockFit:
    block: str
    cond_ids: list[int]
    kept: int
    trimmed_items: int
    trimmed_tokens: int


def build_block(
    items: list[dict[str, Any]],
    fmt: ProfileFormat,
    tokenizer: Any,
    budget: int,
    system_prompt: str,
    query: str,
    n_abl: int,
    template_kwargs: dict[str, Any] | None = None,
) -> BlockFit:
    """The largest LongLaMP-style block (in item order) whose conditioned prompt is <= n_abl + budget tokens.

    LaMP's allocation: each item gets an equal share of the budget plus whatever earlier items left
    unused; an item's trim fields are cut at a token boundary (text kept verbatim up to that token's
    end) to fit its allowance; an item whose fixed part does not fit is left out and passes its share on.
    The allocation is estimated on separately tokenised pieces, then settled on the real prompt by
    cutting the last kept item further (or dropping it) until the budget holds.
    """
    fields = fmt.trim_fields
    encs = [
        {f: tokenizer(str(it.get(f) or ""), add_special_tokens=False, return_offsets_mapping=True) for f in fields}
        for it in items
    ]
    fixed = [len(_ids(tokenizer, fmt.render_item({**it, **dict.fromkeys(fields, "")}))) for it in items]
    full = [{f: len(e[f]["input_ids"]) for f in fields} for e in encs]
    plans: list[dict[str, int] | None] = []
    available = budget - len(_ids(tokenizer, fmt.header + fmt.connector))
    share, carry = (available // len(items) if items and available > 0 else 0), 0
    for i in range(len(items)):
        allowance, room = share + carry, share + carry - fixed[i]
        keep = {}
        for f in fields:
            keep[f] = min(full[i][f], max(room, 0))
            room -= keep[f]
        if allowance < fixed[i] or (any(full[i].values()) and not any(keep.values())):
            plans.append(None)  # does not fit at all: its share rolls over
            carry = allowance
            continue
        plans.append(keep)
        carry = allowance - fixed[i] - sum(keep.values())

    def cut(i: int, keep: dict[str, int]) -> dict[str, Any]:
        item = dict(items[i])
        for f in fields:
            if keep[f] < full[i][f]:
                offsets = encs[i][f]["offset_mapping"]
                item[f] = str(item.get(f) or "")[: offsets[keep[f] - 1][1]] if keep[f] else ""
        return item

    def render() -> tuple[str, list[int]]:
        block = fmt.block([cut(i, k) for i, k in enumerate(plans) if k is not None])
        return block, _ids(tokenizer, render_prompt(tokenizer, system_prompt, block + query, template_kwargs))

    block, cond_ids = render()
    while block and len(cond_ids) - n_abl > budget:
        over = len(cond_ids) - n_abl - budget
        j = max(i for i, k in enumerate(plans) if k is not None)
        field_name = next((f for f in reversed(fields) if plans[j][f] > 0), None)
        if field_name is None:
            plans[j] = None
        else:
            plans[j][field_name] = max(0, plans[j][field_name] - over)
            if not any(plans[j].values()) and any(full[j].values()):
                plans[j] = None
        block, cond_ids = render()
    kept = [i for i, k in enumerate(plans) if k is not None]
    trimmed_items = sum(1 for i in kept if any(plans[i][f] < full[i][f] for f in fields))
    trimmed_tokens = sum(full[i][f] - plans[i][f] for i in kept for f in fields)
    trimmed_tokens += sum(fixed[i] + sum(full[i].values()) for i, k in enumerate(plans) if k is None)
    return BlockFit(block, cond_ids, len(kept), trimmed_items, trimmed_tokens)
