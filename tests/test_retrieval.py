"""Profile retrieval: BM25 against a brute-force scorer, determinism, ties, k > profile, random, recency, contriever."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest

from perce_ds.data.retrieval import (
    BM25_B,
    BM25_K1,
    RetrievalRequest,
    Retriever,
    bm25_scores,
    rank_by_scores,
    recency_order,
    word_tokens,
)

WORDS = [
    "coffee",
    "espresso",
    "grinder",
    "beans",
    "roast",
    "crema",
    "trail",
    "boots",
    "summit",
    "qubit",
    "code",
    "album",
    "vinyl",
    "oven",
    "flour",
]


def brute_bm25(query: str, docs: list[str], k1: float = BM25_K1, b: float = BM25_B) -> list[float]:
    """Lucene BM25, written out: sum over query tokens of idf * tf / (tf + k1 * (1 - b + b * dl / avgdl))."""
    toks = [word_tokens(d) for d in docs]
    n, avgdl = len(docs), sum(map(len, toks)) / len(docs)
    df = Counter(w for t in toks for w in set(t))
    scores = []
    for t in toks:
        tf, s = Counter(t), 0.0
        for w in word_tokens(query):
            if tf[w]:
                idf = math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
                s += idf * tf[w] / (tf[w] + k1 * (1 - b + b * len(t) / avgdl))
        scores.append(s)
    return scores


def _random_case(rng: random.Random) -> tuple[str, list[str]]:
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))) for _ in range(rng.randint(2, 12))]
    query = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
    return query, docs


def test_bm25_equals_brute_force_scores_and_top_k():
    rng = random.Random(0)
    compared = 0
    for _ in range(60):
        query, docs = _random_case(rng)
        expected = brute_bm25(query, docs)
        got = bm25_scores(query, docs)
        assert np.allclose(got, expected, rtol=1e-4, atol=1e-5)
        exact = sorted(expected, reverse=True)
        for k in (1, 2, 4):
            # compare rankings only where float32 rounding cannot flip a near-tie at the cut
            if k < len(exact) and abs(exact[k - 1] - exact[k]) < 1e-4:
                continue
            want = set(rank_by_scores(expected)[:k])
            got_top = Retriever("bm25", k).select([RetrievalRequest("r", query, [{}] * len(docs), docs)])[0]
            assert set(got_top) == want and len(got_top) == min(k, len(docs))
            compared += 1
    assert compared > 100


def test_bm25_edge_cases():
    assert bm25_scores("nothing matches", ["coffee beans", "roast"]).tolist() == [0.0, 0.0]
    assert bm25_scores("", ["coffee"]).tolist() == [0.0]
    assert bm25_scores("coffee", []).tolist() == []
    assert bm25_scores("Coffee!", ["coffee beans", "tea"])[0] > 0  # lower-cased words


def test_ties_are_stable_and_k_larger_than_profile():
    docs = ["same text", "other words", "same text", "same text"]
    req = RetrievalRequest("r", "same", [{}] * 4, docs)
    assert Retriever("bm25", 3).select([req]) == [[0, 2, 3]]
    assert Retriever("bm25", 10).select([req])[0] == [0, 2, 3, 1]
    assert rank_by_scores([1.0, 2.0, 2.0, 1.0]) == [1, 2, 0, 3]
    assert Retriever("all", 2).select([req]) == [[0, 1]]
    assert Retriever("bm25", 4).select([RetrievalRequest("e", "q", [], [])]) == [[]]


def test_deterministic_across_calls_and_batches():
    rng = random.Random(1)
    reqs = [RetrievalRequest(f"r{i}", *(lambda q, d: (q, [{}] * len(d), d))(*_random_case(rng))) for i in range(20)]
    for method in ("bm25", "random", "all"):
        r = Retriever(method, 3, seed=5)
        whole = r.select(reqs)
        assert whole == r.select(reqs)
        assert whole == [r.select([q])[0] for q in reqs]  # batch composition does not matter


def test_random_without_replacement_and_seeded():
    items = [{}] * 9
    req = RetrievalRequest("rec-1", "q", items, ["x"] * 9)
    picks = Retriever("random", 5, seed=0).select([req])[0]
    assert len(picks) == len(set(picks)) == 5 and all(0 <= i < 9 for i in picks)
    assert Retriever("random", 5, seed=0).select([req])[0] == picks
    others = {tuple(Retriever("random", 5, seed=s).select([req])[0]) for s in range(10)}
    assert len(others) > 1
    assert sorted(Retriever("random", 20).select([req])[0]) == list(range(9))


def test_recency():
    items = [{"year": "2010"}, {"year": "2019"}, {"title": "undated"}, {"year": "2019"}, {"year": 2001}]
    assert recency_order(items) == [1, 3, 0, 4, 2]
    assert Retriever("recency", 2).select([RetrievalRequest("r", "q", items, [""] * 5)]) == [[1, 3]]
    with pytest.raises(ValueError, match="dated"):
        recency_order([{"text": "a"}, {"text": "b"}])


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown retrieval method"):
        Retriever("dense", 4)


@pytest.mark.slow  # ~6 s on 2 cores (BERT import + build)
def test_contriever_tiny_random_encoder(tmp_path):
    import torch
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    from tests.test_longlamp import make_bpe_tokenizer

    tok = make_bpe_tokenizer([" ".join(WORDS)] * 20, tmp_path / "tok")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    enc_dir = tmp_path / "encoder"
    BertModel(config).save_pretrained(enc_dir)
    tok.save_pretrained(enc_dir)

    docs = ["coffee espresso grinder", "trail boots summit", "qubit code", "coffee beans roast crema", "vinyl album"]
    reqs = [
        RetrievalRequest("a", "espresso coffee", [{}] * 5, docs),
        RetrievalRequest("b", "album", [{}] * 2, docs[:2]),
    ]
    r = Retriever("contriever", 3, contriever_path=str(enc_dir), batch_size=2)
    got = r.select(reqs)
    assert got == r.select(reqs)
    assert [len(g) for g in got] == [3, 2] and len(set(got[0])) == 3

    # the same ranking by hand: mean over real tokens, dot product
    model, t = AutoModel.from_pretrained(enc_dir).eval(), AutoTokenizer.from_pretrained(enc_dir)

    def embed(text):
        batch = t([text], return_tensors="pt")
        with torch.no_grad():
            return model(**batch).last_hidden_state[0].mean(0).numpy()

    scores = [float(embed(d) @ embed("espresso coffee")) for d in docs]
    assert got[0] == rank_by_scores(scores)[:3]
