"""From the data section of a run config to tokenised examples on every rank.

Files that must exist once per run (the synthetic data, a tokenizer trained on the fly) are
written by rank 0 while the others wait at a barrier, then everyone reads the same files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perce_ds.config import RunConfig
from perce_ds.data import synthetic
from perce_ds.data.prompts import PROFILE_CONNECTOR, PROFILE_HEADER, PromptSettings, TokenizedExample, tokenize_record
from perce_ds.data.records import PersonaRecord, RecordError
from perce_ds.data.sources import load_many
from perce_ds.data.tokenizer import load_tokenizer, train_sentencepiece_tokenizer

log = logging.getLogger("perce_ds")


@dataclass
class SplitReport:
    files: list[str]
    records_read: int = 0
    skipped: list[str] = field(default_factory=list)  # messages of records dropped (on_bad_record=skip)
    profile_items_dropped: int = 0  # whole items cut to fit the token budgets

    def summary(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "records_read": self.records_read,
            "records_skipped": len(self.skipped),
            "profile_items_dropped": self.profile_items_dropped,
        }


@dataclass
class PreparedData:
    tokenizer: Any
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    reports: dict[str, SplitReport]


def data_files(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """Train/eval file lists; the synthetic task lives in <run>/data/ once materialised."""
    if cfg.data.synthetic.enabled:
        data_dir = cfg.run_dir / "data"
        return [str(data_dir / "train.jsonl")], [str(data_dir / "eval.jsonl")]
    return list(cfg.data.train_files), list(cfg.data.eval_files)


def materialise_synthetic(cfg: RunConfig) -> None:
    """Write the synthetic train/eval JSONL files (rank 0 only; idempotent for the same config)."""
    syn = cfg.data.synthetic
    train_path, eval_path = (Path(p[0]) for p in data_files(cfg))
    synthetic.write_jsonl(synthetic.generate_records(syn.users, syn.train_per_user, syn.seed, "train"), train_path)
    synthetic.write_jsonl(synthetic.generate_records(syn.users, syn.eval_per_user, syn.seed, "eval"), eval_path)


def _tokenizer_texts(cfg: RunConfig, records: list[PersonaRecord]) -> list[str]:
    texts = [cfg.data.system_prompt, PROFILE_HEADER, PROFILE_CONNECTOR]
    for r in records:
        texts += [r.query, r.response, *(" ".join(str(v) for v in item.values()) for item in r.profile)]
    return texts


def tokenizer_dir(cfg: RunConfig) -> Path:
    return cfg.run_dir / "tokenizer"


def setup_files(cfg: RunConfig, is_rank0: bool, barrier: Callable[[], None]) -> None:
    """Rank 0 writes the run's generated inputs; every rank returns once they exist."""
    if is_rank0:
        if cfg.data.synthetic.enabled:
            materialise_synthetic(cfg)
        if cfg.model.tokenizer is None and cfg.model.name_or_path is None and not tokenizer_dir(cfg).exists():
            train_files, _ = data_files(cfg)
            records, _ = load_many(train_files, on_bad_record="skip")
            train_sentencepiece_tokenizer(
                _tokenizer_texts(cfg, records), tokenizer_dir(cfg), cfg.model.tokenizer_vocab_size
            )
            log.info(
                "trained a sentencepiece tokenizer (vocab %d) into %s",
                cfg.model.tokenizer_vocab_size,
                tokenizer_dir(cfg),
            )
    barrier()


def resolve_tokenizer(cfg: RunConfig) -> Any:
    path = cfg.model.tokenizer or cfg.model.name_or_path or tokenizer_dir(cfg)
    return load_tokenizer(path)


def tokenize_split(files: list[str], tokenizer: Any, cfg: RunConfig) -> tuple[list[TokenizedExample], SplitReport]:
    """Load, validate and tokenise every record of a split, honouring data.on_bad_record."""
    report = SplitReport(files=files)
    if not files:
        return [], report
    records, load_reports = load_many(files, on_bad_record=cfg.data.on_bad_record)
    report.records_read = sum(r.read for r in load_reports)
    report.skipped = [m for r in load_reports for m in r.skipped]
    settings = PromptSettings(cfg.data.system_prompt, cfg.data.max_length, cfg.data.max_profile_tokens)
    source = ", ".join(files)
    examples = []
    for record in records:
        try:
            example = tokenize_record(record, tokenizer, settings, source)
        except RecordError as e:
            if cfg.data.on_bad_record == "error":
                raise
            report.skipped.append(str(e))
            continue
        report.profile_items_dropped += example.profile_items_dropped
        examples.append(example)
    if report.skipped:
        log.warning("%s: skipped %d bad records, e.g. %s", source, len(report.skipped), report.skipped[0])
    return examples, report


def prepare_data(cfg: RunConfig, is_rank0: bool, barrier: Callable[[], None]) -> PreparedData:
    setup_files(cfg, is_rank0, barrier)
    tokenizer = resolve_tokenizer(cfg)
    train_files, eval_files = data_files(cfg)
    train, train_report = tokenize_split(train_files, tokenizer, cfg)
    eval_examples, eval_report = tokenize_split(eval_files, tokenizer, cfg)
    if not train:
        raise ValueError(f"no usable training records in {train_files}")
    return PreparedData(tokenizer, train, eval_examples, {"train": train_report, "eval": eval_report})
