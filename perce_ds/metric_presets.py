"""The metric presets: how ROUGE and METEOR are computed and the decoding that goes with published numbers.

Plain data on the ground floor, so a run config can check `eval.metrics_preset` without importing the metrics
(perce_ds/evaluation/metrics.py computes them and re-exports these names).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class MetricPreset:
    """How ROUGE and METEOR are computed, and the decoding that goes with the published numbers."""

    name: str
    rouge_stemming: bool  # rouge-score's Porter stemmer
    meteor_tokens: str  # "words_punct" | "nltk_words" | "whitespace" (see meteor_tokens)
    max_new_tokens: int  # decoding that goes with it (greedy in every preset)
    do_sample: bool
    source: str  # where the settings come from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS = {
    "strict": MetricPreset(
        "strict", True, "words_punct", 512, False,
        "perce-ds: Porter stemming on, METEOR over lower-cased word and punctuation tokens; greedy, 512 new tokens",
    ),
    "longlamp": MetricPreset(
        "longlamp", False, "nltk_words", 512, False,
        "LongLaMP's/LaMP's evaluation scripts (Hugging Face `evaluate` 'rouge' and 'meteor' with their defaults): "
        "rouge-score without stemming, METEOR over NLTK word_tokenize tokens (its Punkt sentence splitter "
        "approximated by splitting after . ! ? followed by white space: Punkt's model is not on the package "
        "registry); greedy decoding as in PerCE's paper, 512 new tokens. Their ROUGE mean is a bootstrap "
        "estimate, here the plain mean",
    ),
    "mirror": MetricPreset(
        "mirror", False, "whitespace", 512, False,
        "the MIRROR re-implementation: rouge-score without stemming, METEOR over white-space tokens; "
        "greedy decoding, 512 new tokens",
    ),
}  # fmt: skip
DEFAULT_PRESET = "strict"


def get_preset(name: str) -> MetricPreset:
    """The MetricPreset called `name`; ValueError naming the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown metrics preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]
