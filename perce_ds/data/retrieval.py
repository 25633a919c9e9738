"""Rank a user's profile items against a query and keep the top k.

Methods: ``bm25`` (lexical, via ``bm25s``, Lucene scoring, the default), ``contriever`` (dense: a mean-pooled
encoder loaded from a path, dot-product scores, batched, no grad), ``recency`` (newest first, by a date-like
field), ``random`` (seeded per record, without replacement) and ``all`` (profile order).

Every method returns item indices best first. Equal scores keep profile order (a stable sort), so a ranking
is a pure function of (query, items, settings) and never of the machine or the batch it ran in.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

METHODS = ("bm25", "contriever", "recency", "random", "all")
DATE_FIELDS = ("date", "year", "unixReviewTime", "time")  # first one an item carries is its date
_WORD = re.compile(r"\w+", re.UNICODE)
BM25_K1, BM25_B = 1.5, 0.75


def word_tokens(text: str) -> list[str]:
    """Lower-cased word tokens: the lexical unit BM25 scores (no stemming, no stop words)."""
    return _WORD.findall(text.lower())


def bm25_scores(query: str, docs: Sequence[str], k1: float = BM25_K1, b: float = BM25_B) -> np.ndarray:
    """BM25 (Lucene variant, as implemented by bm25s) of `query` against each of `docs`, indexed as one corpus.

    A repeated query word counts once per occurrence; a query with no word of the corpus scores 0 everywhere.
    """
    import bm25s

    doc_tokens = [word_tokens(d) for d in docs]
    query_tokens = word_tokens(query)
    if not docs or not query_tokens or not any(doc_tokens):
        return np.zeros(len(docs), dtype=np.float64)
    index = bm25s.BM25(k1=k1, b=b, method="lucene")
    index.index(doc_tokens, show_progress=False)
    ids = index.get_tokens_ids(query_tokens)
    if not ids:
        return np.zeros(len(docs), dtype=np.float64)
    return np.asarray(index.get_scores(ids), dtype=np.float64)


def rank_by_scores(scores: Sequence[float]) -> list[int]:
    """Indices by descending score; ties keep their original order."""
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))


def _date_key(value: Any) -> tuple[int, str | float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value))
    try:
        return (1, float(str(value)))
    except ValueError:
        return (0, str(value))  # ISO-like strings sort correctly as text


def recency_order(items: Sequence[dict[str, Any]]) -> list[int]:
    """Newest first by the first date-like field (DATE_FIELDS) present; undated items last, in profile order.

    Raises ValueError when no item carries a date: recency cannot be decided from order alone.
    """
    keyed = []
    for i, item in enumerate(items):
        date = next((item[f] for f in DATE_FIELDS if item.get(f) not in (None, "")), None)
        keyed.append((i, None if date is None else _date_key(date)))
    if items and all(k is None for _, k in keyed):
        raise ValueError(f"retrieval method 'recency' needs dated profile items (one of {list(DATE_FIELDS)})")
    dated = sorted((k for k in keyed if k[1] is not None), key=lambda ik: ik[1], reverse=True)
    # sorted(reverse=True) keeps equal keys in original order (stability survives reverse), as promised.
    return [i for i, _ in dated] + [i for i, k in keyed if k is None]


def random_order(n: int, k: int, seed: int, key: str) -> list[int]:
    """k distinct indices of range(n), drawn by a generator seeded from (seed, key): one record, one draw."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little")).sample(range(n), min(k, n))


class ContrieverEncoder:
    """A Hugging Face encoder whose mean-pooled last hidden states embed texts (Contriever's recipe)."""

    def __init__(self, path: str, batch_size: int = 32, max_length: int = 512, device: str | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.batch_size, self.max_length = batch_size, max_length

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), hidden] float32 embeddings; padding never enters the mean."""
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    list(texts[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                out.append(pooled.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


@dataclass
class RetrievalRequest:
    """One record's retrieval problem: the query, the profile items and their retrieval texts."""

    key: str  # stable record identity (seeds `random`)
    query: str
    items: list[dict[str, Any]]
    item_texts: list[str]


class Retriever:
    """Select top-k profile items per request with one method; see the module docstring."""

    def __init__(self, method: str, top_k: int, seed: int = 0, contriever_path: str = "", batch_size: int = 32):
        if method not in METHODS:
            raise ValueError(f"unknown retrieval method {method!r}; known: {list(METHODS)}")
        if top_k < 1:
            raise ValueError(f"retrieval top_k must be >= 1, got {top_k}")
        self.method, self.top_k, self.seed = method, top_k, seed
        self.encoder = ContrieverEncoder(contriever_path, batch_size) if method == "contriever" else None

    def select(self, requests: Sequence[RetrievalRequest]) -> list[list[int]]:
        """Per request, the indices of its kept items, best first (at most top_k; all when fewer)."""
        if self.method == "contriever":
            return self._contriever(requests)
        out = []
        for req in requests:
            n = len(req.items)
            if self.method == "bm25":
                order = rank_by_scores(bm25_scores(req.query, req.item_texts))
            elif self.method == "recency":
                order = recency_order(req.items) if n else []
            elif self.method == "random":
                order = random_order(n, self.top_k, self.seed, req.key)
            else:
                order = list(range(n))
            out.append(order[: self.top_k])
        return out

    def _contriever(self, requests: Sequence[RetrievalRequest]) -> list[list[int]]:
        # One encoder pass over every query and item of the batch, then per-request dot products.
        texts = [r.query for r in requests] + [t for r in requests for t in r.item_texts]
        emb = self.encoder.embed(texts) if texts else np.zeros((0, 0))
        queries, items = emb[: len(requests)], emb[len(requests) :]
        out, offset = [], 0
        for i, req in enumerate(requests):
            n = len(req.item_texts)
            scores = items[offset : offset + n] @ queries[i] if n else np.zeros(0)
            offset += n
            out.append(rank_by_scores(scores)[: self.top_k])
        return out
