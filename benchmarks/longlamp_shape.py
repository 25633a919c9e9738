"""Synthetic PersonaRecords with LongLaMP-like lengths, for cost benchmarks (content is meaningless).

LongLaMP prompts are dominated by the retrieved profile: top-4 past items (abstracts, reviews, posts) of a
few hundred tokens each, then the task input, then a long response. `make_records` draws pseudo-words so
that, with a tokenizer trained on the same text (about one token per word), the profile block is
`profile_fraction` of the conditioned prompt and lengths vary per record like real data (+-30%).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from perce_ds.data.records import PersonaRecord

_SYLLABLES = ("ka", "lo", "mi", "ren", "tu", "sa", "vel", "dor", "pi", "an", "es", "ol", "qui", "ba", "ne", "zu")


@dataclass(frozen=True)
class Shape:
    """Mean token lengths of one record; each is drawn in [0.7, 1.3] x the mean."""

    profile_items: int = 4  # LongLaMP's top-k retrieved items
    item_tokens: int = 80  # tokens per profile item
    query_tokens: int = 100  # task input (without the chat template)
    response_tokens: int = 128

    @property
    def expected_profile_fraction(self) -> float:
        profile = self.profile_items * self.item_tokens
        return profile / (profile + self.query_tokens)


def _vocabulary(rng: random.Random, size: int) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))))
    return sorted(words)


def _text(rng: random.Random, vocab: list[str], mean: int) -> str:
    n = max(1, round(mean * rng.uniform(0.7, 1.3)))
    return " ".join(rng.choice(vocab) for _ in range(n))


def make_records(n: int, shape: Shape, seed: int = 0, vocab_size: int = 600) -> list[PersonaRecord]:
    """n records of the given shape, deterministic in (n, shape, seed, vocab_size)."""
    rng = random.Random(seed)
    vocab = _vocabulary(rng, vocab_size)
    records = []
    for i in range(n):
        profile = [
            {"title": _text(rng, vocab, 6), "text": _text(rng, vocab, shape.item_tokens)}
            for _ in range(shape.profile_items)
        ]
        records.append(
            PersonaRecord(
                user_id=f"user{i % 16:02d}",
                task="longlamp_shape",
                query="Write the next text for this user: " + _text(rng, vocab, shape.query_tokens),
                response=_text(rng, vocab, shape.response_tokens),
                profile=profile,
                record_id=f"shape-{i:05d}",
            )
        )
    return records


def tokenizer_texts(records: list[PersonaRecord]) -> list[str]:
    """The text a benchmark tokenizer is trained on (every field the prompts use)."""
    from perce_ds.data.prompts import PROFILE_CONNECTOR, PROFILE_HEADER

    texts = [PROFILE_HEADER, PROFILE_CONNECTOR]
    for r in records:
        texts += [r.query, r.response, *(f"{item['title']}: {item['text']}" for item in r.profile)]
    return texts
