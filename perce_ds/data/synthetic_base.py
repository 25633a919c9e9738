"""What the two synthetic persona tasks (perce_ds/data/synthetic.py, synthetic_natural.py) generate alike.

The shared vocabulary, the seeded draws, rendering with exact persona spans, and the per-user request loop:
one copy, so both tasks keep drawing from their RNGs in the same order and their files stay reproducible.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Mapping, Sequence
from typing import Any

from perce_ds.data.records import PersonaRecord

NAMES = (
    "Ana", "Ben", "Cleo", "Dev", "Elif", "Finn", "Gita", "Hugo", "Ines", "Jonah", "Kofi", "Lena", "Mira",
    "Nico", "Omar", "Priya", "Quinn", "Rosa", "Soren", "Tara", "Umar", "Vera", "Wes", "Yara", "Zane",
)  # fmt: skip
PET_NAMES = (
    "Biscuit", "Pepper", "Mochi", "Waffles", "Luna", "Ziggy", "Noodle", "Pickles", "Maple", "Olive",
    "Pudding", "Bruno", "Socks", "Tofu", "Juniper", "Clover",
)  # fmt: skip
SIGN_OFFS = (
    "Cheers", "Warmly", "Take care", "All the best", "Hugs", "Peace out", "Kind regards", "Ciao",
    "Stay curious", "Onwards",
)  # fmt: skip
# Generic request details: predictable from the query, so never persona tokens.
WHEN = ("last week", "yesterday", "on Sunday", "last month", "on Friday night", "two days ago")
FRIENDS = ("Sam", "Jo", "Alex", "Kim", "Pat", "Lee", "Robin", "Casey")


def balanced(rng: random.Random, vocab: tuple, n: int) -> list:
    """n draws from vocab in reshuffled full passes, so every value is used about equally often."""
    out: list = []
    while len(out) < n:
        out.extend(rng.sample(vocab, len(vocab)))
    return out[:n]


def derived_rng(*parts: object) -> random.Random:
    """An RNG seeded stably from parts (sha256, not the per-process salted hash())."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def render(template: str, values: dict[str, str], persona_keys: set[str]) -> tuple[str, list[list[int]], list[str]]:
    """Fill template piece by piece; return the text, the [start, end) spans of persona fields and each span's
    field name."""
    pieces: list[str] = []
    spans: list[list[int]] = []
    span_fields: list[str] = []
    pos = 0
    for literal, field_name, _spec, _conv in string.Formatter().parse(template):
        pieces.append(literal)
        pos += len(literal)
        if field_name is None:
            continue
        value = values[field_name]
        if field_name in persona_keys and value:
            spans.append([pos, pos + len(value)])
            span_fields.append(field_name)
        pieces.append(value)
        pos += len(value)
    return "".join(pieces), spans, span_fields


def request_records(
    rng: random.Random,
    per_user: int,
    templates: Sequence[tuple[str, str]],
    traits: dict[str, str],
    persona_keys: set[str],
    *,
    user_id: str,
    task: str,
    profile: list[dict[str, Any]],
    record_id_prefix: str,
    span_kinds: Mapping[str, str] | None = None,
) -> list[PersonaRecord]:
    """One user's `per_user` records: each draws a (query, response) template, then a WHEN and a FRIEND, from `rng`.

    The response marks the values of `persona_keys` as persona spans; with `span_kinds` (persona field ->
    kind), each span also gets its field's kind, in text order. Record ids are
    "{record_id_prefix}-{user_id}-{j:02d}"; every record gets its own copy of `profile`.
    """
    records = []
    for j in range(per_user):
        query_t, response_t = rng.choice(templates)
        values = dict(traits, when=rng.choice(WHEN), friend=rng.choice(FRIENDS))
        response, spans, span_fields = render(response_t, values, persona_keys)
        kinds = [span_kinds[f] for f in span_fields] if span_kinds else []
        records.append(
            PersonaRecord(
                user_id=user_id,
                task=task,
                query=query_t.format(**values),
                response=response,
                profile=[dict(item) for item in profile],
                record_id=f"{record_id_prefix}-{user_id}-{j:02d}",
                persona_spans=spans,
                persona_span_kinds=kinds,
            )
        )
    return records
