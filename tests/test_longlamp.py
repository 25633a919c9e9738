"""LongLaMP / LaMP adapters: fixture layouts load as the hub does, bad input is named, per-task prompts keep their
budgets and alignment for every fixture row with two tokenizer families, recipes build through prepare_data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from perce_ds.config import RunConfig
from perce_ds.data.lamp import LAMP_TASKS, load_lamp
from perce_ds.data.longlamp import LONGLAMP_TASKS, DataSourceError, load_longlamp, task_for_config
from perce_ds.data.pipeline import prepare_data
from perce_ds.data.prompts import PromptSettings, profile_format, render_prompt, tokenize_record
from perce_ds.data.records import RecordError
from perce_ds.data.tokenizer import FALLBACK_CHAT_TEMPLATE, TEMPLATE_SYMBOLS

FIX = Path(__file__).parent / "fixtures"
HUB = FIX / "longlamp"
LOCAL = FIX / "longlamp_local"
CONFIGS = ("abstract_generation_user", "product_review_user", "topic_writing_user")
USER_FIELD = {"abstract_generation_user": "name", "product_review_user": "reviewerId", "topic_writing_user": "author"}
SYSTEM = "You write as the user."


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_cache"))


def make_bpe_tokenizer(texts: list[str], out_dir: Path):
    """A byte-level BPE tokenizer trained locally, with EOS/pad and the fallback chat template; saved and reloaded."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=700, min_frequency=2, special_tokens=["<|eos|>", "<|pad|>", *TEMPLATE_SYMBOLS]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|eos|>", pad_token="<|pad|>")
    tok.chat_template = FALLBACK_CHAT_TEMPLATE
    tok.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir))


def _fixture_texts() -> list[str]:
    texts = []
    for f in sorted(FIX.rglob("*.parquet")):
        for row in pq.read_table(f).to_pylist():
            texts += [row["input"], row["output"], *(json.dumps(it) for it in row["profile"])]
    return texts


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    return make_bpe_tokenizer(_fixture_texts(), tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def fixture_records(hf_cache):
    """Every fixture row of every config and task, as PersonaRecords."""
    out = []
    for config in CONFIGS:
        for split in ("train", "val", "test"):
            out += load_longlamp(str(HUB), config, split, cache_dir=hf_cache)[0]
    for config in ("topic_writing_user", "email_generation_user"):
        out += load_longlamp(str(LOCAL), config, "train", cache_dir=hf_cache)[0]
    for task in LAMP_TASKS:
        out += load_lamp(str(FIX / "lamp" / task), task, "train", cache_dir=hf_cache)[0]
    return out


# ------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_hub_layout_gives_expected_records(config, split, hf_cache):
    records, report = load_longlamp(str(HUB), config, split, cache_dir=hf_cache)
    rows = pq.read_table(HUB / config / f"{split}-00000-of-00001.parquet").to_pylist()
    assert len(records) == len(rows) == report.read == report.kept >= 6 and not report.skipped
    spec = task_for_config(config)
    for i, (rec, row) in enumerate(zip(records, rows)):
        assert rec.task == spec.name and rec.record_id == f"{config}/{split}/{i}"
        assert rec.user_id == str(row[USER_FIELD[config]])
        assert (rec.query, rec.response) == (row["input"], row["output"])
        assert rec.profile == [{k: v for k, v in it.items() if v is not None} for it in row["profile"]]
    assert [i for i, r in enumerate(records) if not r.profile] == [3]  # row 3: an empty profile


def test_local_jsonl_variant_and_email(hf_cache):
    records, _ = load_longlamp(str(LOCAL), "topic_writing_user", "train", cache_dir=hf_cache)
    raw = [json.loads(line) for line in (LOCAL / "topic_writing_user" / "train.jsonl").read_text().splitlines()]
    assert len(records) == 24
    for rec, row in zip(records, raw):  # the input/output variant mapped onto summary/content
        assert rec.profile == [{"summary": it["input"], "content": it["output"]} for it in row["profile"]]
    email, _ = load_longlamp(str(LOCAL), "email_generation_user", "val", cache_dir=hf_cache)
    assert len(email) == 6 and email[0].task == "longlamp/email_generation" and email[0].user_id == "eval0"


def test_save_to_disk_copy_matches_hub_layout(tmp_path, hf_cache):
    from datasets import DatasetDict, load_dataset

    config = "product_review_user"
    dd = DatasetDict({s: load_dataset(str(HUB), config, split=s, cache_dir=hf_cache) for s in ("train", "val")})
    dd.save_to_disk(str(tmp_path / config))
    a, _ = load_longlamp(str(tmp_path), config, "val", cache_dir=hf_cache)
    b, _ = load_longlamp(str(HUB), config, "val", cache_dir=hf_cache)
    assert a == b


def test_max_records_is_a_seeded_ordered_subset(hf_cache):
    full, _ = load_longlamp(str(HUB), "abstract_generation_user", "train", cache_dir=hf_cache)
    sub, report = load_longlamp(
        str(HUB), "abstract_generation_user", "train", max_records=10, seed=3, cache_dir=hf_cache
    )
    assert len(sub) == report.read == 10
    ids = [r.record_id for r in sub]
    assert ids == sorted(ids, key=lambda s: int(s.rsplit("/", 1)[1])) and set(ids) <= {r.record_id for r in full}
    again, _ = load_longlamp(str(HUB), "abstract_generation_user", "train", max_records=10, seed=3, cache_dir=hf_cache)
    assert again == sub


@pytest.mark.parametrize("task", sorted(LAMP_TASKS))
def test_lamp_questions_joined_with_outputs(task, hf_cache):
    root = FIX / "lamp" / task
    records, _ = load_lamp(str(root), task, "dev", cache_dir=hf_cache)
    questions = json.loads((root / "dev" / "dev_questions.json").read_text())
    golds = {g["id"]: g["output"] for g in json.loads((root / "dev" / "dev_outputs.json").read_text())["golds"]}
    assert [r.query for r in records] == [q["input"] for q in questions]
    assert [r.response for r in records] == [golds[q["id"]] for q in questions]
    assert all(r.task == f"lamp/{task}" and r.user_id == q["id"] for r, q in zip(records, questions))


# ------------------------------------------------------------------------------------------ bad input


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _good_rows(n=3):
    return [
        {
            "reviewerId": f"R{i}",
            "input": "Write.",
            "output": "A review.",
            "profile": [{"overall": 5.0, "summary": "s", "description": "d", "reviewText": "t"}],
        }
        for i in range(n)
    ]


def test_missing_config_and_split_are_named(hf_cache):
    with pytest.raises(DataSourceError) as e:
        load_longlamp(str(HUB), "product_review_temporal", "train", cache_dir=hf_cache)
    assert "product_review_temporal" in str(e.value) and str(HUB) in str(e.value)
    with pytest.raises(DataSourceError) as e:
        load_longlamp(str(HUB), "product_review_user", "validation", cache_dir=hf_cache)
    assert "validation" in str(e.value) and "val" in str(e.value) and "product_review_user" in str(e.value)
    with pytest.raises(DataSourceError, match="known configs"):
        load_longlamp(str(HUB), "news_headline_user", "train", cache_dir=hf_cache)
    with pytest.raises(DataSourceError, match="configs found"):
        load_longlamp(str(LOCAL), "product_review_user", "train", cache_dir=hf_cache)
    with pytest.raises(DataSourceError, match="split 'val'"):
        _write_jsonl(Path(hf_cache) / "loc" / "product_review_user" / "train.jsonl", _good_rows())
        load_longlamp(str(Path(hf_cache) / "loc"), "product_review_user", "val", cache_dir=hf_cache)


@pytest.mark.parametrize(
    "mutate, field_name, problem",
    [
        (lambda r: r.pop("output"), "output", "missing"),
        (lambda r: r.update(profile="not a list"), "profile", "expected a list"),
        (lambda r: r.update(output=""), "output", "empty"),
        (lambda r: r.update(profile=None), "profile", "missing"),
    ],
)
def test_bad_rows_name_dataset_config_split_row_field(tmp_path, hf_cache, mutate, field_name, problem):
    rows = _good_rows(4)
    mutate(rows[2])
    _write_jsonl(tmp_path / "product_review_user" / "train.jsonl", rows)
    with pytest.raises(RecordError) as e:
        load_longlamp(str(tmp_path), "product_review_user", "train", cache_dir=hf_cache)
    msg = str(e.value)
    for part in (str(tmp_path), "config product_review_user", "split train", "row 2", f"field '{field_name}'", problem):
        assert part in msg
    records, report = load_longlamp(str(tmp_path), "product_review_user", "train", "skip", cache_dir=hf_cache)
    assert len(records) == 3 and report.read == 4 and len(report.skipped) == 1 and "row 2" in report.skipped[0]


def test_empty_profile_is_allowed_and_counted(tmp_path, hf_cache):
    rows = _good_rows(3)
    rows[1]["profile"] = []
    _write_jsonl(tmp_path / "product_review_user" / "train.jsonl", rows)
    records, _ = load_longlamp(str(tmp_path), "product_review_user", "train", cache_dir=hf_cache)
    assert records[1].profile == []


def test_schema_mismatch_names_fields(tmp_path, hf_cache):
    rows = [{"author": "a", "input": "q", "output": "o", "profile": [{"title": "t", "body": "b"}]}]
    _write_jsonl(tmp_path / "topic_writing_user" / "train.jsonl", rows)
    with pytest.raises(DataSourceError) as e:
        load_longlamp(str(tmp_path), "topic_writing_user", "train", cache_dir=hf_cache)
    msg = str(e.value)
    assert "topic_writing_user" in msg and "['body', 'title']" in msg and "summary" in msg and "input" in msg


# ------------------------------------------------------------------------------------------ prompts and budgets


@pytest.mark.parametrize("family", ["sentencepiece", "byte_level_bpe"])
@pytest.mark.parametrize("profile_budget", [40, 160, 100_000])
def test_every_fixture_row_keeps_budget_and_alignment(family, profile_budget, request, fixture_records):
    tok = request.getfixturevalue("sp_tokenizer" if family == "sentencepiece" else "bpe_tokenizer")
    settings = PromptSettings(SYSTEM, max_length=100_000, max_profile_tokens=profile_budget)
    n_trimmed = n_dropped = 0
    assert len(fixture_records) > 200
    for full_record in fixture_records:
        record = dataclasses.replace(full_record, profile=full_record.profile[:4])  # what top-4 retrieval hands over
        ex = tokenize_record(record, tok, settings, "fixture")
        fmt = profile_format(record.task)
        assert fmt is not None
        # the response: tokenised alone, never trimmed by the profile budget
        assert ex.response_ids == tok(record.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert not ex.response_capped
        # the budget holds on the real prompt
        assert len(ex.cond_prompt_ids) - len(ex.abl_prompt_ids) <= profile_budget
        # ablated = conditioned minus the profile block, same template
        abl_text = render_prompt(tok, SYSTEM, record.query)
        cond_text = render_prompt(tok, SYSTEM, ex.profile_block + record.query)
        assert ex.abl_prompt_ids == tok(abl_text, add_special_tokens=False)["input_ids"]
        assert ex.cond_prompt_ids == tok(cond_text, add_special_tokens=False)["input_ids"]
        assert cond_text.replace(ex.profile_block, "", 1) == abl_text
        if ex.profile_items_kept:
            assert ex.profile_block.startswith("- ") and ex.profile_block.endswith(fmt.connector)
            assert ex.profile_block.count("\n- ") + 1 == ex.profile_items_kept
        else:
            assert ex.profile_block == "" and ex.cond_prompt_ids == ex.abl_prompt_ids
        assert ex.profile_items_kept + ex.profile_items_dropped == len(record.profile)
        if profile_budget == 100_000:  # roomy: every item whole
            assert ex.profile_items_kept == len(record.profile) and ex.profile_tokens_trimmed == 0
            assert ex.profile_block == fmt.block(record.profile)
        n_trimmed += ex.profile_items_trimmed
        n_dropped += ex.profile_items_dropped
    assert (n_trimmed + n_dropped > 0) == (profile_budget < 100_000)
    if profile_budget == 160:
        assert n_trimmed > 0


def test_unused_budget_rolls_over_to_later_items(sp_tokenizer):
    from perce_ds.data.prompts import build_block

    fmt = LONGLAMP_TASKS["abstract_generation"].format
    long_text = " ".join(["graph neural message passing"] * 40)
    items = [{"title": "A", "abstract": "short."}, {"title": "B", "abstract": long_text}]
    fit = build_block(
        items,
        fmt,
        sp_tokenizer,
        120,
        SYSTEM,
        "q",
        len(sp_tokenizer(render_prompt(sp_tokenizer, SYSTEM, "q"))["input_ids"]),
    )
    alone = build_block(items[1:], fmt, sp_tokenizer, 60, SYSTEM, "q", 0)
    assert fit.kept == 2 and fit.trimmed_items == 1
    second = fit.block.split("\n- ")[1]
    # the second item got its own half of the budget plus what the short first item left unused
    assert len(second) > len(alone.block)


def test_response_cap_counts_and_keeps_prefix(sp_tokenizer, hf_cache):
    records, _ = load_longlamp(str(HUB), "abstract_generation_user", "train", cache_dir=hf_cache)
    lengths = sorted(len(sp_tokenizer(r.response)["input_ids"]) + 1 for r in records)
    cap = lengths[len(lengths) // 2]
    settings = PromptSettings(SYSTEM, 100_000, 200, max_response_tokens=cap)
    capped = 0
    for r in records:
        ex = tokenize_record(r, sp_tokenizer, settings, "fixture")
        full = sp_tokenizer(r.response, add_special_tokens=False)["input_ids"] + [sp_tokenizer.eos_token_id]
        assert len(ex.response_ids) <= cap and ex.response_ids == full[: len(ex.response_ids)]
        assert ex.response_capped == (len(full) > cap)
        capped += ex.response_capped
    assert 0 < capped < len(records)


# ------------------------------------------------------------------------------------------ recipes


def recipe_overrides(tokenizer_dir: str, cache_dir: Path) -> list[str]:
    return [
        f"data.longlamp.dataset={HUB}",
        f"model.tokenizer={tokenizer_dir}",
        f"train.output_dir={cache_dir / 'runs'}",
        f"data.cache_dir={cache_dir / 'cache'}",
    ]


def test_every_longlamp_recipe_loads_and_builds_examples(sp_tokenizer, tmp_path):
    recipes = sorted((Path(__file__).parents[1] / "recipes" / "longlamp").glob("*.yaml"))
    assert len(recipes) == 19
    for path in recipes:
        cfg = RunConfig.load(path, recipe_overrides(sp_tokenizer.name_or_path, tmp_path))
        d, t = cfg.data, cfg.train
        assert d.source == "longlamp" and d.retrieval.top_k == 4 and d.max_train_records == 2000
        assert d.longlamp.config.endswith("_user") and t.epochs == 3
        assert t.micro_batch_size * t.grad_accum * 8 == 64
        assert (cfg.loss.clip_min, cfg.loss.clip_max) == (0.8, 5.0)
        assert cfg.loss.scheme == ("ce" if path.stem.endswith("_ce") else "perce")
        if path.stem.endswith("_lora"):  # LoRA: MIRROR's r 16, alpha 32, all projections, lr 1e-4
            assert (cfg.model.lora.r, cfg.model.lora.alpha, len(cfg.model.lora.target_modules), t.lr) == (
                16,
                32,
                7,
                1e-4,
            )
        else:
            assert cfg.model.lora is None and t.lr in (2e-6, 5e-6, 8e-6, 2e-5, 5e-5)
        assert cfg.model.dtype == "bf16" and cfg.model.activation_checkpointing and cfg.model.config is None
        data = prepare_data(cfg, True, lambda: None)
        assert len(data.train) == 24 and len(data.eval) == 6
        assert data.reports["train"].empty_profiles == 1
        assert all(len(e.cond_prompt_ids) + len(e.response_ids) <= d.max_length for e in data.train)


def test_lamp_source_through_prepare_data(sp_tokenizer, tmp_path):
    cfg = RunConfig.load(
        None,
        [
            "model.name_or_path=unused",
            f"model.tokenizer={sp_tokenizer.name_or_path}",
            "data.source=lamp",
            f"data.lamp.path={FIX / 'lamp' / 'LaMP_5'}",
            "data.lamp.task=LaMP_5",
            "data.max_profile_tokens=128",
            f"data.cache_dir={tmp_path}",
        ],
    )
    data = prepare_data(cfg, True, lambda: None)
    assert len(data.train) == 24 and len(data.eval) == 6
    assert all(len(e.cond_prompt_ids) - len(e.abl_prompt_ids) <= 128 for e in data.train)


def test_prepare_data_command_writes_inspection(sp_tokenizer, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "prepare_data_cli", Path(__file__).parents[1] / "launch" / "prepare_data.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    recipe = Path(__file__).parents[1] / "recipes" / "longlamp" / "review_qwen3_4b.yaml"
    args = ["--recipe", str(recipe)]
    for o in recipe_overrides(sp_tokenizer.name_or_path, tmp_path) + ["data.max_response_tokens=48"]:
        key, value = o.split("=", 1)
        args += [f"--{key}", value]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    for word in (
        "[train] 24 records",
        "24 users",
        "conditioned_prompt_tokens",
        "ablated_prompt_tokens",
        "capped responses",
        "empty profiles: 1",
    ):
        assert word in out
    inspect = tmp_path / "runs" / "review_qwen3_4b" / "data_inspection"
    report = json.loads((inspect / "report.json").read_text())
    assert report["train"]["responses_capped"] > 0 and report["train"]["users"] == 24
    cond, abl = (inspect / "train_conditioned.txt").read_text(), (inspect / "train_ablated.txt").read_text()
    assert "is the rating for the product" in cond and "is the rating for the product" not in abl


@pytest.mark.slow
def test_prepare_data_command_offline_subprocess(sp_tokenizer, tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    args = [
        sys.executable,
        str(root / "launch" / "prepare_data.py"),
        "--recipe",
        str(root / "recipes/longlamp/topic_qwen3_4b.yaml"),
    ]
    for o in recipe_overrides(sp_tokenizer.name_or_path, tmp_path):
        args += ["--" + o.split("=", 1)[0], o.split("=", 1)[1]]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[train] 24 records" in out.stdout and "[eval] 6 records" in out.stdout
