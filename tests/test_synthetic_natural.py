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
    EVIDENCE,
    EVIDENCE_PHRASINGS,
    HELDOUT_PHRASINGS,
    INFER,
    INFER_HELDOUT,
    KINDS,
    generate_records,
    phrasings,
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
        assert COPY in record.persona_span_kinds  # every response mixes copyable and inferable values
        assert {INFER, INFER_HELDOUT} & set(record.persona_span_kinds)
        for (start, end), kind in zip(record.persona_spans, record.persona_span_kinds):
            value = record.response[start:end]
            assert value and value == value.strip()
            words = re.findall(r"\w+", record.response[:start].lower())
            assert not words or words[-1] not in ("a", "an")  # no unmarked article depends on the value
            in_profile = re.search(rf"\b{re.escape(value)}\b", _profile_text(record)) is not None
            # copyable: the profile states it word for word; inferable: the profile never does (case-sensitive:
            # "pad thai" is the one dish that shares its cuisine's letters, in lower case and other tokens)
            assert in_profile == (kind == COPY), (kind, value, record.record_id)


def _evidence(p, trait: str) -> str:
    return {"country": p.city, "pet_kind": p.pet_sign, "cuisine": p.dish, "profession": p.work_diary}[trait]


def test_inferable_values_follow_from_the_profile():
    for split in ("train", "eval", "test"):
        for p in split_users(split, 24, 12, 3):
            profile = " ".join(it["text"] for it in profile_items(p, 3))
            values = p.values()
            for trait in EVIDENCE:
                # the evidence of each inferable trait is there, from the pool its split may draw, its value is not
                assert _evidence(p, trait) in profile and values[trait] not in profile, (p.user_id, trait)
                heldout = trait in p.heldout
                assert _evidence(p, trait) in phrasings(trait, values[trait], heldout)
                assert not (heldout and split == "train")


def _stems(answer: str) -> set[str]:
    """The answer and its obvious stems: without its last two letters (>= 6 letters) or a common suffix."""
    a = answer.lower()
    out = {a, a[:-2] if len(a) >= 6 else a}
    for suffix in ("ese", "ian", "an", "yer", "er", "ist"):
        if a.endswith(suffix) and len(a) - len(suffix) >= 3:
            out.add(a[: -len(suffix)])
    return out


def test_no_evidence_names_its_answer_or_a_stem_of_it():
    assert _stems("Thai") == {"thai"} and "ital" in _stems("Italian") and "law" in _stems("lawyer")
    assert re.search(r"\bthai", "Cooked pad thai tonight", re.IGNORECASE)  # the leak this test exists for
    for trait, by_value in EVIDENCE.items():
        for value, evidence in by_value.items():
            assert len(evidence) >= EVIDENCE_PHRASINGS and len(set(evidence)) == len(evidence), (trait, value)
            assert 0 < HELDOUT_PHRASINGS < len(evidence)
            for text in evidence:
                for stem in _stems(value):
                    assert not re.search(rf"\b{re.escape(stem)}", text, re.IGNORECASE), (value, stem, text)


def _text_of(record) -> str:
    return " ".join([record.query, record.response, _profile_text(record)])


def test_three_splits_are_user_disjoint_and_heldout_phrasings_never_reach_training():
    cfg = RunConfig.load(None, ["model.name_or_path=x", "data.synthetic.enabled=true",
                                "data.synthetic.task=persona_natural", "data.synthetic.users=48",
                                "data.synthetic.eval_users=16", "data.synthetic.train_per_user=3"])  # fmt: skip
    records = {s: synthetic.split_records(cfg.data.synthetic, s) for s in ("train", "eval", "test")}
    users = {s: {r.user_id for r in rs} for s, rs in records.items()}
    assert [len(users[s]) for s in ("train", "eval", "test")] == [48, 16, 16]
    assert not (users["train"] & users["eval"] or users["train"] & users["test"] or users["eval"] & users["test"])
    train_text = "\n".join(_text_of(r) for r in records["train"])
    held = [t for by_value in EVIDENCE.values() for ev in by_value.values() for t in ev[-HELDOUT_PHRASINGS:]]
    leaked = [t for t in held if re.search(rf"\b{re.escape(t)}\b", train_text)]
    assert not leaked, leaked[:5]
    assert all(INFER_HELDOUT not in r.persona_span_kinds for r in records["train"])
    for split in ("eval", "test"):
        text = "\n".join(_text_of(r) for r in records[split])
        used = [t for t in held if re.search(rf"\b{re.escape(t)}\b", text)]
        assert len(used) >= 10, (split, len(used))  # the held-out phrasings are evaluated, not merely absent
        kinds = [k for r in records[split] for k in r.persona_span_kinds]
        assert kinds.count(INFER_HELDOUT) >= 0.25 * (kinds.count(INFER) + kinds.count(INFER_HELDOUT))
        for r in records[split]:  # a span is "infer_heldout" exactly when its user's evidence is held out
            p = next(p for p in split_users(split, 48, 16, 0) if p.user_id == r.user_id)
            profile = _profile_text(r)
            for (a, b), kind in zip(r.persona_spans, r.persona_span_kinds):
                if kind != COPY:
                    trait = next(t for t in EVIDENCE if p.values()[t] == r.response[a:b])
                    assert _evidence(p, trait) in profile
                    assert kind == (INFER_HELDOUT if trait in p.heldout else INFER)


def test_splits_hold_disjoint_users_and_are_deterministic():
    users = {s: {p.user_id for p in split_users(s, 20, 6, 0)} for s in ("train", "eval", "test")}
    assert [len(users[s]) for s in ("train", "eval", "test")] == [20, 6, 6]
    assert not (users["train"] & users["eval"]) and not (users["train"] & users["test"])
    assert not (users["eval"] & users["test"])
    a, b = generate_records(20, 6, 2, 5, "eval"), generate_records(20, 6, 2, 5, "eval")
    assert [r.to_dict() for r in a] == [r.to_dict() for r in b] and len(a) == 12
    assert {r.user_id for r in a} == {p.user_id for p in split_users("eval", 20, 6, 5)}
    assert len({r.record_id for r in generate_records(20, 6, 3, 0)}) == 60
    assert [r.to_dict() for r in generate_records(20, 6, 2, 6, "eval")] != [r.to_dict() for r in a]  # seeded


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
    assert (
        {k for k, v in KINDS.items() if v == INFER} == set(EVIDENCE) == {"country", "pet_kind", "cuisine", "profession"}
    )
    assert all(CITIES[c] == country for country, cities in EVIDENCE["country"].items() for c in cities)


def test_commits_recipe_reads_the_committed_author_splits():
    """recipes/commits_smollm2.yaml trains on data/commits/ (a copy of ../shared/data/commits/): train, validation
    and test hold disjoint authors, and the recipe names train and validation only."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = RunConfig.load(root / "recipes" / "commits_smollm2.yaml")
    assert cfg.data.train_files == ["data/commits/train.jsonl"] and cfg.data.eval_files == ["data/commits/val.jsonl"]
    splits = {
        name: load_many([str(root / "data" / "commits" / f"{name}.jsonl")])[0] for name in ("train", "val", "test")
    }
    assert [len(splits[s]) for s in ("train", "val", "test")] == [288, 96, 96]
    users = {s: {r.user_id for r in rs} for s, rs in splits.items()}
    assert [len(users[s]) for s in ("train", "val", "test")] == [36, 12, 12]
    assert not (users["train"] & users["val"] or users["train"] & users["test"] or users["val"] & users["test"])
    assert all(not r.persona_spans and r.profile for rs in splits.values() for r in rs)
