"""The tokenised cache: built once by rank 0, reused by later runs and other ranks, rebuilt when a setting changes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import perce_ds.data.pipeline as pipeline
from perce_ds.config import RunConfig
from perce_ds.fingerprints import records_fingerprint, tokenizer_fingerprint
from tests.test_longlamp import bpe_tokenizer, offline  # noqa: F401  (fixtures)

HUB = Path(__file__).parent / "fixtures" / "longlamp"


@pytest.fixture
def counted(monkeypatch):
    """Counts records tokenised (every call of tokenize_record made by the pipeline)."""
    calls = {"n": 0}
    real = pipeline.tokenize_record

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "tokenize_record", counting)
    return calls


def _cfg(tokenizer_dir: str, cache_dir: Path, *overrides: str) -> RunConfig:
    return RunConfig.load(
        None,
        [
            "model.name_or_path=unused",
            f"model.tokenizer={tokenizer_dir}",
            "data.source=longlamp",
            f"data.longlamp.dataset={HUB}",
            "data.longlamp.config=abstract_generation_user",
            "data.max_profile_tokens=1500",
            "data.max_length=8192",
            f"data.cache_dir={cache_dir}",
            *overrides,
        ],
    )


def _prepare(cfg: RunConfig, is_rank0: bool = True):
    barriers = []
    data = pipeline.prepare_data(cfg, is_rank0, lambda: barriers.append(1))
    return data, len(barriers)


def test_second_run_reuses_cache_without_tokenising(sp_tokenizer, tmp_path, counted):
    cfg = _cfg(sp_tokenizer.name_or_path, tmp_path)
    t0 = time.perf_counter()
    first, n_barriers = _prepare(cfg)
    t_first = time.perf_counter() - t0
    built_calls = counted["n"]
    assert built_calls == 24 + 6 and first.reports["train"].cache_built and n_barriers == 3  # setup + 2 splits
    t0 = time.perf_counter()
    second, _ = _prepare(cfg)
    t_second = time.perf_counter() - t0
    assert counted["n"] == built_calls  # nothing tokenised again
    assert not second.reports["train"].cache_built and not second.reports["eval"].cache_built
    assert second.train == first.train and second.eval == first.eval
    assert second.reports["train"].summary() == {**first.reports["train"].summary(), "cache_built": False}
    print(f"\ncache: first run {t_first:.3f}s (built), second run {t_second:.3f}s (reused)")


def test_other_rank_loads_what_rank0_built(sp_tokenizer, tmp_path, counted):
    cfg = _cfg(sp_tokenizer.name_or_path, tmp_path)
    rank0, b0 = _prepare(cfg, is_rank0=True)
    n = counted["n"]
    rank1, b1 = _prepare(cfg, is_rank0=False)
    assert counted["n"] == n and b0 == b1  # same barrier sequence on every rank
    assert rank1.train == rank0.train


@pytest.mark.parametrize(
    "change",
    ["data.retrieval.top_k=2", "data.max_profile_tokens=120", "data.retrieval.method=all", "data.max_train_records=10"],
)
def test_changed_setting_builds_a_new_cache(sp_tokenizer, tmp_path, counted, change):
    base, _ = _prepare(_cfg(sp_tokenizer.name_or_path, tmp_path))
    n = counted["n"]
    changed, _ = _prepare(_cfg(sp_tokenizer.name_or_path, tmp_path, change))
    assert changed.reports["train"].cache_built and counted["n"] > n
    assert changed.reports["train"].cache_file != base.reports["train"].cache_file
    if change.startswith("data.retrieval.top_k"):
        assert max(e.profile_items_kept for e in changed.train) <= 2 < max(e.profile_items_kept for e in base.train)


def test_changed_tokenizer_builds_a_new_cache(sp_tokenizer, bpe_tokenizer, tmp_path, counted):  # noqa: F811
    a, _ = _prepare(_cfg(sp_tokenizer.name_or_path, tmp_path))
    n = counted["n"]
    b, _ = _prepare(_cfg(bpe_tokenizer.name_or_path, tmp_path))
    assert b.reports["train"].cache_built and counted["n"] == 2 * n
    assert tokenizer_fingerprint(sp_tokenizer) != tokenizer_fingerprint(bpe_tokenizer)
    assert a.train[0].response_ids != b.train[0].response_ids


def test_on_bad_record_shares_the_cache_and_decides_after_loading(sp_tokenizer, tmp_path, counted):
    # max_length so small that the longest records cannot fit even without a profile
    error_cfg = _cfg(sp_tokenizer.name_or_path, tmp_path, "data.max_length=400", "data.on_bad_record=error")
    with pytest.raises(pipeline.RecordError) as info:
        _prepare(error_cfg)
    assert "abstract_generation_user" in str(info.value) and "train/7" in str(info.value)
    n = counted["n"]
    skip, _ = _prepare(_cfg(sp_tokenizer.name_or_path, tmp_path, "data.max_length=400", "data.on_bad_record=skip"))
    assert not skip.reports["train"].cache_built and counted["n"] == n + 6  # train cache shared; eval built now
    assert len(skip.reports["train"].skipped) >= 1 and len(skip.train) == 24 - len(skip.reports["train"].skipped)


def test_fingerprints_are_content_based(sp_tokenizer, tmp_path):
    from perce_ds.data.longlamp import load_longlamp
    from perce_ds.data.tokenizer import load_tokenizer

    a, _ = load_longlamp(str(HUB), "topic_writing_user", "val", cache_dir=str(tmp_path))
    b, _ = load_longlamp(str(HUB), "topic_writing_user", "val", cache_dir=str(tmp_path))
    assert records_fingerprint(a) == records_fingerprint(b) != records_fingerprint(a[:-1])
    assert tokenizer_fingerprint(load_tokenizer(sp_tokenizer.name_or_path)) == tokenizer_fingerprint(sp_tokenizer)
