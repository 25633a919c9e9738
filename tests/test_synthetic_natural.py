"""The natural synthetic persona task: readable profiles, copyable vs inferable persona tokens, unseen eval users."""

from __future__ import annotations

import re

import pytest

from perce_ds.config import ConfigError, RunConfig
from perce_ds.data import synthetic
from perce_ds.data.records import RecordError, record_from_dict
from perce_ds.data.sources import load_many
from perce_ds.data.synthetic_natural import (
    CITIES,
    COPY,
    CUISINES,
    INFER,
    KINDS,
    PET_SIGNS,
    PROFESSIONS,
    generate_records,
    profile_items,
    split_users,
)  # fmt: skip


def _profile_text(record) -> str:
    return " ".join(f"{it['title']}: {it['text']}" for it in record.profile)


def test_spans_slice_the_values_with_their_kinds():
    for record in generate_records(24, 8, 3, 1):
        assert len(record.persona_spans) == len(record.persona_span_kinds) >= 3
        assert record.persona_spans == sorted(record.persona_spans)
        assert all(a[1] <= b[0] for a, b in zip(record.persona_spans, record.persona_spans[1:]))
        assert {COPY, INFER} <= set(record.persona_span_kinds)  # every response mixes both kinds
        for (start, end), kind in zip(record.persona_spans, record.persona_span_kinds):
            value = record.response[start:end]
            assert value and value == value.strip()
            words = re.findall(r"\w+", record.response[:start].lower())
            assert not words or words[-1] not in ("a", "an")  # no unmarked article depends on the value
            in_profile = re.search(rf"\b{re.escape(value)}\b", _profile_text(record)) is not None
            # copyable: the profile states it word for word; inferable: the profile never does (case-sensitive:
            # "pad thai" is the one dish that shares its cuisine's letters, in lower case and other tokens)
            assert in_profile == (kind == COPY), (kind, value, record.record_id)


def test_inferable_values_follow_from_the_profile():
    for p in split_users("train", 24, 0, 3):
        profile = " ".join(it["text"] for it in profile_items(p, 3))
        # the evidence of each inferable trait is there, its value is not
        assert p.city in profile and CITIES[p.city] not in profile
        assert PROFESSIONS[p.profession] in profile and p.profession not in profile
        assert all(sign in profile for sign in PET_SIGNS[p.pet_kind]) and p.pet_kind not in profile
        assert all(dish in profile for dish in CUISINES[p.cuisine]) and p.cuisine not in profile


def test_splits_hold_disjoint_users_and_are_deterministic():
    users = {s: {p.user_id for p in split_users(s, 20, 6, 0)} for s in ("train", "eval", "test")}
    assert [len(users[s]) for s in ("train", "eval", "test")] == [20, 6, 6]
    assert not (users["train"] & users["eval"]) and not (users["train"] & users["test"])
    assert not (users["eval"] & users["test"])
    a, b = generate_records(20, 6, 2, 5, "eval"), generate_records(20, 6, 2, 5, "eval")
    assert [r.to_dict() for r in a] == [r.to_dict() for r in b] and len(a) == 12
    assert {r.user_id for r in a} == {p.user_id for p in split_users("eval", 20, 6, 5)}
    assert len({r.record_id for r in generate_records(20, 6, 3, 0)}) == 60


def test_kinds_survive_files_and_bad_kinds_name_the_field(tmp_path):
    records = generate_records(4, 2, 2, 0)
    synthetic.write_jsonl(records, tmp_path / "train.jsonl")
    loaded, _ = load_many([str(tmp_path / "train.jsonl")])
    assert [r.to_dict() for r in loaded] == [r.to_dict() for r in records]
    raw = records[0].to_dict() | {"persona_span_kinds": ["copy"]}
    with pytest.raises(RecordError, match="persona_span_kinds"):
        record_from_dict(raw, "f.jsonl", "line 1")
    assert "persona_span_kinds" not in synthetic.generate_records(2, 1, 0)[0].to_dict()  # old task: files unchanged


def test_config_selects_the_task_and_demands_unseen_users():
    base = ["model.name_or_path=x", "data.synthetic.enabled=true"]
    cfg = RunConfig.load(None, [*base, "data.synthetic.task=persona_natural", "data.synthetic.eval_users=3",
                                "data.synthetic.users=5", "data.synthetic.eval_per_user=2"])  # fmt: skip
    ev = synthetic.split_records(cfg.data.synthetic, "eval")
    assert len(ev) == 6 and {r.task for r in ev} == {"synthetic_persona_natural"}
    assert not {r.user_id for r in ev} & {r.user_id for r in synthetic.split_records(cfg.data.synthetic, "train")}
    with pytest.raises(ConfigError, match="eval_users"):
        RunConfig.load(None, [*base, "data.synthetic.task=persona_natural"])
    with pytest.raises(ConfigError, match="eval_users"):
        RunConfig.load(None, [*base, "data.synthetic.eval_users=2"])  # the template task has no unseen users


def test_every_trait_kind_is_declared():
    assert set(KINDS.values()) == {COPY, INFER}
    assert {k for k, v in KINDS.items() if v == INFER} == {"country", "pet_kind", "cuisine", "profession"}
