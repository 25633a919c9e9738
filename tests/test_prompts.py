"""Tests for prompt building, tokenisation budgets, collation, tokenize_split and the tokenizer helpers."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from perce_ds.config import RunConfig
from perce_ds.data.collate import collate
from perce_ds.data.pipeline import tokenize_split
from perce_ds.data.prompts import (
    PROFILE_CONNECTOR,
    PROFILE_HEADER,
    PromptSettings,
    TokenizedExample,
    profile_block,
    render_profile_item,
    render_prompt,
    tokenize_record,
)
from perce_ds.data.records import PersonaRecord, RecordError
from perce_ds.data.synthetic import generate_records, write_jsonl
from perce_ds.data.tokenizer import (
    FALLBACK_CHAT_TEMPLATE,
    TEMPLATE_SYMBOLS,
    load_tokenizer,
    prepare_tokenizer,
)

SYSTEM = "You are a helpful assistant who writes in the user's own voice."
ROOMY = PromptSettings(SYSTEM, max_length=1024, max_profile_tokens=512)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def full_response_ids(tok, response: str) -> list[int]:
    return ids_of(tok, response) + [tok.eos_token_id]


@pytest.fixture(scope="module")
def records():
    return generate_records(12, 4, seed=0)


@pytest.fixture(scope="module")
def examples(records, sp_tokenizer):
    return [tokenize_record(r, sp_tokenizer, ROOMY, "synthetic.jsonl") for r in records]


# ---------------------------------------------------------------------------------------------
# rendering


def test_render_profile_item_shapes():
    assert render_profile_item({"title": "T", "text": "body"}) == "T: body"
    assert render_profile_item({"title": "T", "text": "body", "score": 4}) == "T: body (score: 4)"
    assert render_profile_item({"text": "likes rain", "score": 4}) == "text: likes rain; score: 4"


def test_profile_block_layout():
    items = [{"title": "A", "text": "one"}, {"title": "B", "text": "two"}]
    assert profile_block([]) == ""
    assert profile_block(items) == PROFILE_HEADER + "- A: one\n- B: two\n" + PROFILE_CONNECTOR


def test_render_prompt_uses_system_and_user_turn(sp_tokenizer):
    text = render_prompt(sp_tokenizer, "SYS", "hello there")
    assert text == "<|system|>\nSYS<|end|>\n<|user|>\nhello there<|end|>\n<|assistant|>\n"


# ---------------------------------------------------------------------------------------------
# alignment of the two passes, for every synthetic record


def test_every_record_is_aligned(records, examples, sp_tokenizer):
    tok = sp_tokenizer
    assert len(examples) == len(records) == 48
    batch = collate(examples, tok.pad_token_id)
    width = batch.response_ids.shape[1]
    for row, (record, ex) in enumerate(zip(records, examples)):
        assert ex.record_id == record.record_id
        # the response: tokenised alone, ends with EOS, exactly once
        assert ex.response_ids == full_response_ids(tok, record.response)
        assert ex.response_ids[-1] == tok.eos_token_id
        assert tok.eos_token_id not in ex.response_ids[:-1]
        # the same response ids end both passes (the last R columns of the collated batch)
        n = len(ex.response_ids)
        cond_tail = batch.conditioned.input_ids[row, -width:]
        abl_tail = batch.ablated.input_ids[row, -width:]
        assert torch.equal(cond_tail, abl_tail)
        assert cond_tail[:n].tolist() == ex.response_ids
        assert batch.response_ids[row, :n].tolist() == ex.response_ids
        # prompt texts: the ablated one is the conditioned one minus the profile block
        kept = record.profile[: ex.profile_items_kept]
        assert ex.profile_items_kept == len(record.profile) > 0  # roomy budgets keep everything
        block = profile_block(kept)
        cond_text = render_prompt(tok, SYSTEM, block + record.query)
        abl_text = render_prompt(tok, SYSTEM, record.query)
        assert block and block in cond_text
        assert cond_text.replace(block, "", 1) == abl_text
        assert record.query in abl_text and PROFILE_HEADER not in abl_text
        # and the ids are those texts, tokenised
        assert ex.abl_prompt_ids == ids_of(tok, abl_text)
        assert ex.cond_prompt_ids == ids_of(tok, cond_text)
        assert tok.decode(ex.abl_prompt_ids) == abl_text
        assert tok.decode(ex.cond_prompt_ids) == cond_text
        assert len(ex.cond_prompt_ids) > len(ex.abl_prompt_ids)


def test_ablated_prompt_does_not_depend_on_profile(records, sp_tokenizer):
    record = records[0]
    other = PersonaRecord(**{**record.to_dict(), "profile": records[-1].profile})
    a = tokenize_record(record, sp_tokenizer, ROOMY, "s")
    b = tokenize_record(other, sp_tokenizer, ROOMY, "s")
    assert a.abl_prompt_ids == b.abl_prompt_ids
    assert a.response_ids == b.response_ids
    assert a.cond_prompt_ids != b.cond_prompt_ids


# ---------------------------------------------------------------------------------------------
# persona token mask


def test_persona_token_mask_matches_spans(records, examples, sp_tokenizer):
    tok = sp_tokenizer
    for record, ex in zip(records, examples):
        assert record.persona_spans
        assert len(ex.persona_token_mask) == len(ex.response_ids)
        assert ex.persona_token_mask[-1] is False  # EOS
        offsets = tok(record.response, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        assert len(offsets) == len(ex.response_ids) - 1

        def overlaps(start, end, spans=record.persona_spans):
            return any(s < end and start < e for s, e in spans)

        for (start, end), flagged in zip(offsets, ex.persona_token_mask):
            assert flagged == overlaps(start, end)
        for s, e in record.persona_spans:
            hit = [i for i, (a, b) in enumerate(offsets) if a < e and s < b]
            assert hit and all(ex.persona_token_mask[i] for i in hit)
            # the flagged tokens decode to text that contains the persona value
            assert record.response[s:e] in tok.decode([ex.response_ids[i] for i in hit])
        # generic filler is not flagged: well under half of the tokens are persona tokens
        assert 0 < sum(ex.persona_token_mask) < len(ex.persona_token_mask) / 2


def test_persona_mask_empty_without_spans(records, sp_tokenizer):
    record = PersonaRecord(**{**records[0].to_dict(), "persona_spans": []})
    ex = tokenize_record(record, sp_tokenizer, ROOMY, "s")
    assert ex.persona_token_mask == []
    assert ex.response_ids == full_response_ids(sp_tokenizer, record.response)


# ---------------------------------------------------------------------------------------------
# budgets


def _record_with_most_items(records):
    return max(records, key=lambda r: len(r.profile))


def test_profile_budget_drops_whole_items_from_the_end(records, sp_tokenizer):
    tok = sp_tokenizer
    record = _record_with_most_items(records)
    n_items = len(record.profile)
    assert n_items >= 4
    full = tokenize_record(record, tok, ROOMY, "s")
    full_block_tokens = len(full.cond_prompt_ids) - len(full.abl_prompt_ids)
    budget = full_block_tokens // 2
    ex = tokenize_record(record, tok, PromptSettings(SYSTEM, 1024, budget), "s")
    assert 0 < ex.profile_items_kept < n_items
    assert ex.profile_items_kept + ex.profile_items_dropped == n_items
    assert len(ex.cond_prompt_ids) - len(ex.abl_prompt_ids) <= budget
    # kept items are a prefix of the profile, rendered whole
    kept_text = render_prompt(tok, SYSTEM, profile_block(record.profile[: ex.profile_items_kept]) + record.query)
    assert ex.cond_prompt_ids == ids_of(tok, kept_text)
    decoded = tok.decode(ex.cond_prompt_ids)
    for item in record.profile[: ex.profile_items_kept]:
        assert f"- {render_profile_item(item)}\n" in decoded
    for item in record.profile[ex.profile_items_kept :]:
        assert item["text"] not in decoded
    assert ex.abl_prompt_ids == full.abl_prompt_ids
    assert ex.response_ids == full.response_ids


def test_profile_budget_is_respected_for_every_budget(records, sp_tokenizer):
    tok = sp_tokenizer
    record = _record_with_most_items(records)
    full = tokenize_record(record, tok, ROOMY, "s")
    full_block_tokens = len(full.cond_prompt_ids) - len(full.abl_prompt_ids)
    kept_seen = []
    for budget in [*range(0, full_block_tokens, 7), 2 * full_block_tokens]:
        ex = tokenize_record(record, tok, PromptSettings(SYSTEM, 1024, budget), "s")
        block_tokens = len(ex.cond_prompt_ids) - len(ex.abl_prompt_ids)
        assert block_tokens <= budget
        assert ex.profile_items_kept + ex.profile_items_dropped == len(record.profile)
        assert ex.response_ids == full.response_ids
        expected = render_prompt(tok, SYSTEM, profile_block(record.profile[: ex.profile_items_kept]) + record.query)
        assert ex.cond_prompt_ids == ids_of(tok, expected)
        kept_seen.append(ex.profile_items_kept)
    assert kept_seen == sorted(kept_seen)  # more budget never keeps fewer items
    assert kept_seen[0] == 0 and kept_seen[-1] == len(record.profile)


def test_budget_that_fits_the_whole_profile_drops_nothing(records, sp_tokenizer):
    """Items are dropped only "until the budgets hold": a budget the full profile block fits in keeps it all."""
    tok = sp_tokenizer
    over_dropped = []
    for record in records:
        full = tokenize_record(record, tok, ROOMY, "s")
        assert full.profile_items_dropped == 0
        exact = len(full.cond_prompt_ids) - len(full.abl_prompt_ids)
        by_profile_budget = tokenize_record(record, tok, PromptSettings(SYSTEM, 1024, exact), "s")
        room = len(full.cond_prompt_ids) + len(full.response_ids)
        by_max_length = tokenize_record(record, tok, PromptSettings(SYSTEM, room, 10_000), "s")
        for ex in (by_profile_budget, by_max_length):
            if ex.profile_items_dropped:
                over_dropped.append((record.record_id, exact, ex.profile_items_kept, len(record.profile)))
    assert over_dropped == []


def test_zero_profile_budget_gives_identical_prompts(records, sp_tokenizer):
    for record in records[:8]:
        ex = tokenize_record(record, sp_tokenizer, PromptSettings(SYSTEM, 1024, 0), "s")
        assert ex.cond_prompt_ids == ex.abl_prompt_ids
        assert ex.profile_items_kept == 0
        assert ex.profile_items_dropped == len(record.profile)
        assert ex.response_ids == full_response_ids(sp_tokenizer, record.response)


def test_max_length_limits_conditioned_prompt_plus_response(records, sp_tokenizer):
    tok = sp_tokenizer
    record = _record_with_most_items(records)
    full = tokenize_record(record, tok, ROOMY, "s")
    room = len(full.abl_prompt_ids) + len(full.response_ids)
    max_length = room + (len(full.cond_prompt_ids) - len(full.abl_prompt_ids)) // 2
    ex = tokenize_record(record, tok, PromptSettings(SYSTEM, max_length, 10_000), "s")
    assert len(ex.cond_prompt_ids) + len(ex.response_ids) <= max_length
    assert 0 < ex.profile_items_kept < len(record.profile)
    assert ex.response_ids == full.response_ids  # never truncated
    # exactly enough room for the ablated prompt + response: no profile fits, but the record is kept
    ex = tokenize_record(record, tok, PromptSettings(SYSTEM, room, 10_000), "s")
    assert ex.cond_prompt_ids == ex.abl_prompt_ids
    assert ex.response_ids == full.response_ids


def test_too_long_response_raises_naming_response(records, sp_tokenizer):
    record = records[0]
    ex = tokenize_record(record, sp_tokenizer, ROOMY, "s")
    max_length = len(ex.response_ids) - 1
    with pytest.raises(RecordError) as info:
        tokenize_record(record, sp_tokenizer, PromptSettings(SYSTEM, max_length, 512), "data/train.jsonl")
    assert info.value.field_name == "response"
    msg = str(info.value)
    assert "field 'response'" in msg
    assert "data/train.jsonl" in msg
    assert record.record_id in msg
    assert f"max_length={max_length}" in msg


def test_too_long_query_raises_naming_query(records, sp_tokenizer):
    base = records[0]
    long_query = " ".join([base.query] * 30)
    record = PersonaRecord(**{**base.to_dict(), "query": long_query})
    ex = tokenize_record(record, sp_tokenizer, ROOMY, "s")
    # the response alone fits easily, the ablated prompt + response does not
    max_length = len(ex.response_ids) + 10
    assert len(ex.abl_prompt_ids) > 10
    with pytest.raises(RecordError) as info:
        tokenize_record(record, sp_tokenizer, PromptSettings(SYSTEM, max_length, 512), "eval.jsonl")
    assert info.value.field_name == "query"
    assert "field 'query'" in str(info.value)
    assert "eval.jsonl" in str(info.value)


# ---------------------------------------------------------------------------------------------
# tokenize_split through a RunConfig


def _write_split(path, good, bad_lines: dict[int, str]):
    """good records with extra raw lines inserted so that they land on the given 1-based line numbers."""
    write_jsonl(good, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    for line_no in sorted(bad_lines):
        lines.insert(line_no - 1, bad_lines[line_no])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _cfg(path, *overrides):
    return RunConfig.load(
        None,
        [
            "model.config={model_type: qwen3}",
            f"data.train_files={path}",
            f"data.system_prompt={SYSTEM}",
            "data.max_length=256",
            "data.max_profile_tokens=64",
            *overrides,
        ],
    )


def _long_record(base: PersonaRecord, record_id: str) -> dict:
    return {**base.to_dict(), "record_id": record_id, "response": " ".join(["words"] * 400), "persona_spans": []}


def test_tokenize_split_error_names_file_line_and_field(tmp_path, sp_tokenizer):
    good = generate_records(3, 2, seed=0)
    missing = good[0].to_dict()
    missing["record_id"] = "no-response"
    del missing["response"]
    path = tmp_path / "train.jsonl"
    _write_split(path, good, {4: json.dumps(missing)})
    cfg = _cfg(path, "data.on_bad_record=error")
    assert cfg.data.train_files == [str(path)]
    with pytest.raises(RecordError) as info:
        tokenize_split(cfg.data.train_files, sp_tokenizer, cfg)
    msg = str(info.value)
    assert str(path) in msg
    assert "line 4" in msg
    assert "'response'" in msg


def test_tokenize_split_error_on_over_long_record(tmp_path, sp_tokenizer):
    good = generate_records(2, 2, seed=0)
    path = tmp_path / "train.jsonl"
    _write_split(path, good, {2: json.dumps(_long_record(good[0], "too-long"))})
    cfg = _cfg(path, "data.on_bad_record=error")
    with pytest.raises(RecordError) as info:
        tokenize_split([str(path)], sp_tokenizer, cfg)
    assert info.value.field_name == "response"
    assert str(path) in str(info.value)
    assert "too-long" in str(info.value)


def test_tokenize_split_skip_counts_bad_and_over_long(tmp_path, sp_tokenizer):
    good = generate_records(3, 2, seed=0)
    missing = {k: v for k, v in good[1].to_dict().items() if k != "query"}
    missing["record_id"] = "no-query"
    bad = {
        2: json.dumps(missing),
        5: "{this is not json",
        7: json.dumps(_long_record(good[2], "too-long")),
    }
    path = tmp_path / "train.jsonl"
    _write_split(path, good, bad)
    cfg = _cfg(path, "data.on_bad_record=skip")
    examples, report = tokenize_split([str(path)], sp_tokenizer, cfg)
    assert [e.record_id for e in examples] == [r.record_id for r in good]
    assert report.records_read == len(good) + len(bad)
    assert len(report.skipped) == 3
    assert report.summary()["records_skipped"] == 3
    joined = "\n".join(report.skipped)
    assert "line 2" in joined and "'query'" in joined
    assert "line 5" in joined
    assert "too-long" in joined
    # the good examples are exactly what tokenize_record gives with the config's settings
    settings = PromptSettings(SYSTEM, 256, 64)
    for record, ex in zip(good, examples):
        expected = tokenize_record(record, sp_tokenizer, settings, str(path))
        assert ex == expected
        assert len(ex.cond_prompt_ids) + len(ex.response_ids) <= 256
        assert len(ex.cond_prompt_ids) - len(ex.abl_prompt_ids) <= 64
    assert report.profile_items_dropped == sum(e.profile_items_dropped for e in examples) > 0


def test_tokenize_split_no_files(sp_tokenizer, tmp_path):
    path = tmp_path / "x.jsonl"
    cfg = _cfg(path)
    examples, report = tokenize_split([], sp_tokenizer, cfg)
    assert examples == [] and report.records_read == 0 and report.skipped == []


# ---------------------------------------------------------------------------------------------
# collate


def _ex(rid, cond, abl, resp, persona=None):
    return TokenizedExample(rid, cond, abl, resp, persona if persona is not None else [])


def test_collate_layout_by_hand():
    pad = 0
    a = _ex("a", [11, 12, 13], [13], [21, 22, 3], [False, True, False])
    b = _ex("b", [14], [15, 16], [23, 3])  # persona unknown
    batch = collate([a, b], pad)
    assert batch.record_ids == ["a", "b"]
    assert batch.conditioned.input_ids.tolist() == [[11, 12, 13, 21, 22, 3], [0, 0, 14, 23, 3, 0]]
    assert batch.conditioned.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]]
    assert batch.ablated.input_ids.tolist() == [[0, 13, 21, 22, 3], [15, 16, 23, 3, 0]]
    assert batch.ablated.attention_mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch.response_ids.tolist() == [[21, 22, 3], [23, 3, 0]]
    assert batch.response_mask.tolist() == [[True, True, True], [True, True, False]]
    assert batch.persona_mask.tolist() == [[False, True, False], [False, False, False]]
    assert batch.seq_ids().tolist() == [0, 0, 0, 1, 1]
    assert batch.n_response_tokens == 5
    assert batch.conditioned.n_tokens == 9 and batch.ablated.n_tokens == 8
    assert batch.response_mask.dtype == torch.bool and batch.conditioned.input_ids.dtype == torch.long


def test_collate_empty():
    batch = collate([], 0)
    assert batch.conditioned.input_ids.shape[0] == 0
    assert batch.n_response_tokens == 0
    assert batch.seq_ids().numel() == 0


def test_collate_real_examples_with_one_much_longer(records, sp_tokenizer):
    tok = sp_tokenizer
    base = records[5]
    long_record = PersonaRecord(
        **{
            **base.to_dict(),
            "record_id": "long",
            "query": " ".join([base.query] * 6),
            "response": " ".join([base.response] * 4),
            "persona_spans": [],
        }
    )
    chosen = [records[0], long_record, records[1], records[2]]
    examples = [tokenize_record(r, tok, PromptSettings(SYSTEM, 4096, 64), "s") for r in chosen]
    pad = tok.pad_token_id
    batch = collate(examples, pad)
    bsz = len(examples)
    R = max(len(e.response_ids) for e in examples)
    assert len(examples[1].response_ids) > 3 * len(examples[0].response_ids)
    for name, pass_, prompts in (
        ("cond", batch.conditioned, [e.cond_prompt_ids for e in examples]),
        ("abl", batch.ablated, [e.abl_prompt_ids for e in examples]),
    ):
        P = max(len(p) for p in prompts)
        assert pass_.input_ids.shape == pass_.attention_mask.shape == (bsz, P + R), name
        for row, (ex, prompt) in enumerate(zip(examples, prompts)):
            n_pad = P - len(prompt)
            n = len(ex.response_ids)
            ids = pass_.input_ids[row].tolist()
            mask = pass_.attention_mask[row].tolist()
            # prompt part: left-padded, zeros only at the left
            assert ids[:P] == [pad] * n_pad + prompt
            assert mask[:P] == [0] * n_pad + [1] * len(prompt)
            # response part: right-padded
            assert ids[P:] == ex.response_ids + [pad] * (R - n)
            assert mask[P:] == [1] * n + [0] * (R - n)
            # the real tokens, read off with the mask, are exactly prompt + response
            assert [t for t, m in zip(ids, mask) if m] == prompt + ex.response_ids
        assert pass_.n_tokens == sum(len(p) + len(e.response_ids) for p, e in zip(prompts, examples))
    assert batch.response_ids.shape == batch.response_mask.shape == batch.persona_mask.shape == (bsz, R)
    lengths = torch.tensor([len(e.response_ids) for e in examples])
    assert batch.response_mask.sum(1).tolist() == lengths.tolist()
    assert batch.seq_ids().tolist() == torch.repeat_interleave(torch.arange(bsz), lengths).tolist()
    flat = batch.response_ids[batch.response_mask].tolist()
    assert flat == [t for e in examples for t in e.response_ids]
    for row, ex in enumerate(examples):
        n = len(ex.response_ids)
        expected = ex.persona_token_mask or [False] * n
        assert batch.persona_mask[row, :n].tolist() == expected
        assert not batch.persona_mask[row, n:].any()
    assert not batch.persona_mask[1].any()  # the long record has no spans
    assert batch.persona_mask[0].any()
    moved = batch.to("cpu")
    assert torch.equal(moved.conditioned.input_ids, batch.conditioned.input_ids)
    assert moved.record_ids == [r.record_id for r in chosen]


# ---------------------------------------------------------------------------------------------
# tokenizer


def test_trained_tokenizer_basics(sp_tokenizer, records):
    tok = sp_tokenizer
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template == FALLBACK_CHAT_TEMPLATE
    assert 256 < len(tok) <= 600
    for symbol in TEMPLATE_SYMBOLS:
        assert len(ids_of(tok, symbol)) == 1, symbol
    # byte fallback: characters never seen in training still round-trip
    text = "Zürich € 😀 " + records[0].response
    assert tok.decode(ids_of(tok, text)) == text
    assert tok.unk_token_id not in ids_of(tok, text)
    # no BOS is added by default
    assert tok.bos_token_id not in tok("hello")["input_ids"]


def test_trained_tokenizer_save_load_roundtrip(sp_tokenizer, records, tmp_path):
    tok = sp_tokenizer
    tok.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(again) == len(tok)
    assert (again.pad_token_id, again.eos_token_id, again.bos_token_id) == (
        tok.pad_token_id,
        tok.eos_token_id,
        tok.bos_token_id,
    )
    assert again.chat_template == tok.chat_template
    texts = [PROFILE_HEADER, PROFILE_CONNECTOR] + [t for r in records[:12] for t in (r.query, r.response)]
    for text in texts:
        assert again(text, add_special_tokens=False)["input_ids"] == ids_of(tok, text)
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert render_prompt(again, SYSTEM, "hi") == render_prompt(tok, SYSTEM, "hi")
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token_id == tok.pad_token_id
    assert loaded.chat_template == tok.chat_template
    assert loaded(texts[3], add_special_tokens=False)["input_ids"] == ids_of(tok, texts[3])
    # a record tokenises identically with the reloaded tokenizer
    assert tokenize_record(records[3], again, ROOMY, "s") == tokenize_record(records[3], tok, ROOMY, "s")


def _wordlevel_tokenizer(**special):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", **special)


def test_prepare_tokenizer_sets_pad_to_eos_and_template():
    tok = _wordlevel_tokenizer(eos_token="</s>")
    assert tok.pad_token_id is None and not tok.chat_template
    prepare_tokenizer(tok)
    assert tok.pad_token == "</s>"
    assert tok.pad_token_id == tok.eos_token_id == 1
    assert tok.chat_template == FALLBACK_CHAT_TEMPLATE
    assert render_prompt(tok, "s", "hello").endswith("<|assistant|>\n")


def test_prepare_tokenizer_keeps_existing_pad_and_template():
    tok = _wordlevel_tokenizer(eos_token="</s>", pad_token="<unk>")
    tok.chat_template = "{{ 'custom' }}"
    prepare_tokenizer(tok)
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1
    assert tok.chat_template == "{{ 'custom' }}"


def test_prepare_tokenizer_without_eos_raises():
    tok = _wordlevel_tokenizer()
    with pytest.raises(ValueError, match="EOS"):
        prepare_tokenizer(tok)


def test_profiles_cut_to_nothing_are_counted_apart_from_empty_ones_and_warned(tmp_path, sp_tokenizer, caplog):
    """A budget that cuts a whole profile makes both prompts equal (PIR 0): counted separately from profiles
    empty in the source, warned above 5%, and a PerCE run on such data is refused naming the budget keys."""
    from perce_ds.config import ConfigError
    from perce_ds.data.pipeline import require_profiles

    good = generate_records(3, 2, seed=0)
    empty = {**good[0].to_dict(), "record_id": "empty-profile", "profile": []}
    path = tmp_path / "train.jsonl"
    _write_split(path, good, {1: json.dumps(empty)})
    with caplog.at_level(logging.WARNING, logger="perce_ds"):
        examples, report = tokenize_split([str(path)], sp_tokenizer, _cfg(path, "data.max_profile_tokens=0"))
    assert report.empty_profiles == 1
    assert report.profiles_cut_to_nothing == len(good) == report.summary()["profiles_cut_to_nothing"]
    assert all(e.cond_prompt_ids == e.abl_prompt_ids for e in examples)
    assert "lost their whole profile" in caplog.text and "data.max_profile_tokens" in caplog.text
    with pytest.raises(ConfigError, match=r"data\.max_length or data\.max_profile_tokens") as info:
        require_profiles(examples, report, "perce")
    assert str(path) in str(info.value) and "1 empty in the source, 6 cut to nothing" in str(info.value)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="perce_ds"):
        roomy = _cfg(path, "data.max_length=768", "data.max_profile_tokens=512")
        kept, report = tokenize_split([str(path)], sp_tokenizer, roomy)
    assert report.profiles_cut_to_nothing == 0 and "lost their whole profile" not in caplog.text
    require_profiles(kept, report, "perce")  # some record keeps a profile: accepted


def test_no_usable_training_record_is_a_user_error(tmp_path, sp_tokenizer):
    """Every record read but skipped when tokenised (too long): one user error (printed as one line by the entry
    points), not a bare ValueError."""
    from perce_ds.data.pipeline import prepare_data
    from perce_ds.errors import UserError

    base = generate_records(1, 2, seed=0)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(_long_record(r, f"long-{i}")) + "\n" for i, r in enumerate(base)))
    cfg = _cfg(path, "data.on_bad_record=skip", f"model.tokenizer={sp_tokenizer.name_or_path}",
               f"train.output_dir={tmp_path}")  # fmt: skip
    with pytest.raises(UserError, match=r"no usable training records in .*train\.jsonl"):
        prepare_data(cfg, True, lambda: None)


def test_a_few_profiles_cut_to_nothing_are_logged_with_their_count(tmp_path, sp_tokenizer, caplog):
    """One record in 25 (4%, under the 5% warning) loses its whole profile: still logged, with its count."""
    good = generate_records(5, 5, seed=0)
    long_item = {"title": "Diary", "text": " ".join(["a long day at the chess club in Denver"] * 150)}
    cut = {**good[0].to_dict(), "record_id": "cut-profile", "profile": [long_item]}
    path = tmp_path / "train.jsonl"
    _write_split(path, good[1:], {1: json.dumps(cut)})
    with caplog.at_level(logging.INFO, logger="perce_ds"):
        examples, report = tokenize_split(
            [str(path)], sp_tokenizer, _cfg(path, "data.max_length=768", "data.max_profile_tokens=512")
        )
    assert len(examples) == 25 and report.profiles_cut_to_nothing == 1
    lines = [r for r in caplog.records if "lost their whole profile" in r.getMessage()]
    assert len(lines) == 1 and "1 of 25 records" in lines[0].getMessage() and lines[0].levelno == logging.INFO
