"""Tokenizers: load an HF one, or train a small sentencepiece BPE on the run's own text (demo, tests).

Every tokenizer leaves here with a pad token and a chat template, so prompt building never has to
special-case a model family.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("perce_ds")

# Used only for tokenizers that ship without a chat template (the demo's own). The markers are
# single tokens in the trained tokenizer, so the template is cheap and cannot merge with the text.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
TEMPLATE_SYMBOLS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def train_sentencepiece_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int) -> Any:
    """Train a byte-fallback sentencepiece BPE on `texts`, save it as an HF tokenizer in `out_dir`.

    BPE (not unigram) because transformers converts sentencepiece models into its fast BPE
    tokenizer; the converted ids equal sentencepiece's own.
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)),
            model_prefix=f"{tmp}/sp",
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            hard_vocab_limit=False,
            user_defined_symbols=TEMPLATE_SYMBOLS,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            minloglevel=2,
            num_threads=1,
        )
        model_dir = Path(tmp) / "hf"
        model_dir.mkdir()
        shutil.copy(f"{tmp}/sp.model", model_dir / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(str(model_dir), add_bos_token=False)
    tokenizer.pad_token = "<pad>"
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    # Reload so the caller holds exactly what every later run and the exported model will load.
    return AutoTokenizer.from_pretrained(str(out_dir))


def load_tokenizer(path: str | Path) -> Any:
    """An HF tokenizer from a folder or hub id, given a pad token and a chat template if missing."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    prepare_tokenizer(tokenizer)
    return tokenizer


def prepare_tokenizer(tokenizer: Any) -> None:
    """Give a tokenizer what prompt building relies on: a pad token, an EOS token, a chat template."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; responses need one to end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        log.info("tokenizer %s has no chat template; using perce_ds's plain template", tokenizer.name_or_path)
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
