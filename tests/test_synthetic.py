"""Tests for the synthetic persona task: determinism, split behaviour, exact persona spans, I/O."""

from __future__ import annotations

import json
import re

import pytest

from perce_ds.data.records import record_from_dict
from perce_ds.data.synthetic import (
    UserPersona,
    generate_records,
    make_personas,
    write_jsonl,
)

N_USERS, PER_USER, SEED = 24, 6, 1234


@pytest.fixture(scope="module")
def records():
    return generate_records(N_USERS, PER_USER, SEED, split="train")


@pytest.fixture(scope="module")
def personas():
    return {p.user_id: p for p in make_personas(N_USERS, SEED)}


def test_same_seed_gives_identical_records(records):
    assert generate_records(N_USERS, PER_USER, SEED, split="train") == records
    assert make_personas(N_USERS, SEED) == make_personas(N_USERS, SEED)


def test_different_seed_gives_different_data(records):
    other = generate_records(N_USERS, PER_USER, SEED + 1, split="train")
    assert [r.to_dict() for r in other] != [r.to_dict() for r in records]
    assert make_personas(N_USERS, SEED + 1) != make_personas(N_USERS, SEED)


def test_personas_and_profiles_do_not_depend_on_split(records):
    eval_records = generate_records(N_USERS, PER_USER, SEED, split="eval")
    profiles = {r.user_id: r.profile for r in records}
    assert {r.user_id: r.profile for r in eval_records} == profiles
    assert [r.user_id for r in eval_records] == [r.user_id for r in records]


def test_train_and_eval_requests_differ(records):
    eval_records = generate_records(N_USERS, PER_USER, SEED, split="eval")
    train_pairs = [(r.query, r.response) for r in records]
    eval_pairs = [(r.query, r.response) for r in eval_records]
    assert train_pairs != eval_pairs
    differing_users = {
        r.user_id for r, e in zip(records, eval_records) if (r.query, r.response) != (e.query, e.response)
    }
    assert len(differing_users) > N_USERS // 2


def test_basic_fields(records, personas):
    assert len(records) == N_USERS * PER_USER
    assert len(personas) == N_USERS
    assert all(isinstance(p, UserPersona) for p in personas.values())
    assert set(personas) == {f"u{i:03d}" for i in range(N_USERS)}
    for r in records:
        assert r.task == "synthetic_persona"
        assert re.fullmatch(r"u\d{3}", r.user_id)
        assert re.fullmatch(rf"synthetic-train-{r.user_id}-\d\d", r.record_id)
        assert 4 <= len(r.profile) <= 6
        assert all(set(item) == {"title", "text"} for item in r.profile)
        assert 1 <= personas[r.user_id].rating <= 5


def test_record_ids_unique(records):
    ids = [r.record_id for r in records]
    assert len(ids) == len(set(ids))
    eval_ids = {r.record_id for r in generate_records(N_USERS, PER_USER, SEED, split="eval")}
    assert not eval_ids & set(ids)


def test_spans_slice_exact_persona_values(records, personas):
    for r in records:
        values = set(personas[r.user_id].traits().values())
        assert r.persona_spans, r.record_id
        prev_end = 0
        for start, end in r.persona_spans:
            assert prev_end <= start < end <= len(r.response), (r.record_id, r.persona_spans)
            assert r.response[start:end] in values, (r.record_id, r.response[start:end])
            prev_end = end


def test_no_persona_value_outside_spans(records, personas):
    """Spans are exhaustive: blanking them leaves no trait value in the response."""
    for r in records:
        chars = list(r.response)
        for start, end in r.persona_spans:
            chars[start:end] = " " * (end - start)
        rest = "".join(chars)
        for value in personas[r.user_id].traits().values():
            assert not re.search(rf"(?<!\w){re.escape(value)}(?!\w)", rest), (r.record_id, value, rest)


def test_query_does_not_reveal_preferences(records, personas):
    for r in records:
        for value in personas[r.user_id].traits().values():
            assert not re.search(rf"(?<!\w){re.escape(value)}(?!\w)", r.query), (r.record_id, value)


def test_profile_mentions_every_preference(records, personas):
    for r in records:
        text = "\n".join(item["title"] + " " + item["text"] for item in r.profile)
        for trait, value in personas[r.user_id].traits().items():
            assert value in text, (r.user_id, trait, value)


def test_personas_are_distinguishable(personas):
    combos = {tuple(p.traits().values()) for p in personas.values()}
    assert len(combos) == N_USERS
    assert len({p.name for p in personas.values()}) == N_USERS


def test_persona_fraction_in_range(records):
    persona_chars = sum(end - start for r in records for start, end in r.persona_spans)
    total_chars = sum(len(r.response) for r in records)
    assert 0.05 <= persona_chars / total_chars <= 0.50


def test_write_jsonl_round_trips(records, tmp_path):
    path = tmp_path / "sub" / "train.jsonl"
    write_jsonl(records, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(records)
    loaded = [record_from_dict(json.loads(line), str(path), f"line {i}") for i, line in enumerate(lines)]
    assert loaded == records


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        generate_records(2, -1, SEED)
    with pytest.raises(ValueError):
        make_personas(-1, SEED)
    assert generate_records(0, 3, SEED) == []
