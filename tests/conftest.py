"""Shared fixtures. Keep each fixture self-contained."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
    """A real sentencepiece BPE tokenizer (vocab 512) trained on the synthetic task's text, loaded via HF."""
    from perce_ds.data.prompts import PROFILE_CONNECTOR, PROFILE_HEADER
    from perce_ds.data.synthetic import generate_records
    from perce_ds.data.tokenizer import train_sentencepiece_tokenizer

    texts = [PROFILE_HEADER, PROFILE_CONNECTOR]
    for record in generate_records(12, 4, seed=0):
        texts += [record.query, record.response]
        texts += [str(value) for item in record.profile for value in item.values()]
    out_dir = tmp_path_factory.mktemp("sp_tokenizer")
    return train_sentencepiece_tokenizer(texts, out_dir, vocab_size=512)
