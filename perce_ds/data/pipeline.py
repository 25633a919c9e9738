"""From the data section of a run config to tokenised examples on every rank.

Files that must exist once per run (the synthetic data, a tokenizer trained on the fly) are
written by rank 0 while the others wait at a barrier, then everyone reads the same files.

data.source = files: PersonaRecord files tokenised in memory with their profiles as given.
data.source = longlamp | lamp: rows loaded through the task adapters, profiles retrieved (top-k),
per-task prompts built and tokenised into a fingerprinted Arrow cache (perce_ds/data/cache.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perce_ds.config import ConfigError, RunConfig
from perce_ds.data import synthetic
from perce_ds.data.cache import build_or_load, cache_path, split_fingerprint
from perce_ds.data.lamp import load_lamp
from perce_ds.data.longlamp import load_longlamp
from perce_ds.data.prompts import PROFILE_CONNECTOR, PROFILE_HEADER, PromptSettings, TokenizedExample, tokenize_record
from perce_ds.data.records import PersonaRecord, RecordError
from perce_ds.data.retrieval import RetrievalRequest, Retriever
from perce_ds.data.sources import LoadReport, load_many
from perce_ds.data.tasks import TASKS
from perce_ds.data.tokenizer import load_tokenizer, train_sentencepiece_tokenizer
from perce_ds.errors import DataSourceError
from perce_ds.fingerprints import path_fingerprint

log = logging.getLogger("perce_ds")


@dataclass
class SplitReport:
    files: list[str]
    records_read: int = 0
    skipped: list[str] = field(default_factory=list)  # messages of records dropped (on_bad_record=skip)
    profile_items_dropped: int = 0  # whole items cut to fit the token budgets
    profile_items_trimmed: int = 0  # kept items whose tail was cut
    profile_tokens_trimmed: int = 0  # item tokens left out by the budget
    responses_capped: int = 0  # responses cut to data.max_response_tokens
    empty_profiles: int = 0  # records with no profile item in the source (both prompts coincide, PIR = 0)
    profiles_cut_to_nothing: int = 0  # records whose profile items were all cut by the token budgets (PIR = 0)
    cache_file: str = ""  # the tokenised cache (longlamp / lamp sources)
    cache_built: bool = False  # built by this run (False: reused)
    users: set[str] = field(default_factory=set)  # user ids of the kept examples
    profile_item_fields: dict[str, Any] = field(default_factory=dict)  # task sources: LoadReport.item_fields_summary
    profile_sizes: list[int] = field(default_factory=list)  # per kept example, items before retrieval

    def count(self, example: TokenizedExample, user_id: str, profile_size: int) -> None:
        """Add one kept example (its user, its profile size in the source) to the totals."""
        self.profile_items_dropped += example.profile_items_dropped
        self.profile_items_trimmed += example.profile_items_trimmed
        self.profile_tokens_trimmed += example.profile_tokens_trimmed
        self.responses_capped += int(example.response_capped)
        self.empty_profiles += profile_size == 0
        self.profiles_cut_to_nothing += profile_size > 0 and example.profile_items_kept == 0
        self.users.add(user_id)
        self.profile_sizes.append(profile_size)

    def warn_if_profiles_cut(self, examples: int) -> None:
        """A profile cut to nothing makes both prompts equal: PIR 0 and weight clip_min for the whole record.
        Any such record is logged with its count; above 5% of the records as a warning."""
        if examples and 0 < self.profiles_cut_to_nothing <= 0.05 * examples:
            log.info(
                "%s: %d of %d records lost their whole profile to the token budgets (PIR 0, trained as CE); "
                "data.max_length / data.max_profile_tokens set the budgets",
                ", ".join(self.files), self.profiles_cut_to_nothing, examples,
            )  # fmt: skip
        if examples and self.profiles_cut_to_nothing > 0.05 * examples:
            log.warning(
                "%s: %d of %d records (%.0f%%) lost their whole profile to the token budgets: their PIR is 0 and "
                "PerCE trains them as CE. Raise data.max_length or data.max_profile_tokens (or shorten data.system_prompt)",
                ", ".join(self.files), self.profiles_cut_to_nothing, examples, 100 * self.profiles_cut_to_nothing / examples,
            )  # fmt: skip

    def summary(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "records_read": self.records_read,
            "records_skipped": len(self.skipped),
            "profile_items_dropped": self.profile_items_dropped,
            "profile_items_trimmed": self.profile_items_trimmed,
            "profile_tokens_trimmed": self.profile_tokens_trimmed,
            "responses_capped": self.responses_capped,
            "empty_profiles": self.empty_profiles,
            "profiles_cut_to_nothing": self.profiles_cut_to_nothing,
            "cache_file": self.cache_file,
            "cache_built": self.cache_built,
            "users": len(self.users),
            "profile_item_fields": self.profile_item_fields,
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
    synthetic.write_jsonl(synthetic.split_records(syn, "train"), train_path)
    synthetic.write_jsonl(synthetic.split_records(syn, "eval"), eval_path)


def _tokenizer_texts(cfg: RunConfig, records: list[PersonaRecord]) -> list[str]:
    texts = [cfg.data.system_prompt, PROFILE_HEADER, PROFILE_CONNECTOR]
    for r in records:
        texts += [r.query, r.response, *(" ".join(str(v) for v in item.values()) for item in r.profile)]
    return texts


def tokenizer_dir(cfg: RunConfig) -> Path:
    return cfg.run_dir / "tokenizer"


def load_task_split(
    cfg: RunConfig, role: str, require_response: bool = True
) -> tuple[list[PersonaRecord], LoadReport | None]:
    """Records of the train or eval split of a longlamp / lamp source (([], None) when the split is unset);
    `require_response=False` also reads a prediction-only split (no references)."""
    d = cfg.data
    section = d.longlamp if d.source == "longlamp" else d.lamp
    split = section.train_split if role == "train" else section.eval_split
    if not split:
        return [], None
    max_records = d.max_train_records if role == "train" else d.max_eval_records
    hf_cache = str(cache_root(cfg) / "hf")
    if d.source == "longlamp":
        return load_longlamp(
            section.dataset, section.config, split, d.on_bad_record, max_records, d.subset_seed, hf_cache,
            require_response,
        )  # fmt: skip
    return load_lamp(
        section.path, section.task, split, d.on_bad_record, max_records, d.subset_seed, hf_cache, require_response
    )


def cache_root(cfg: RunConfig) -> Path:
    """Where tokenised caches live: data.cache_dir, else shared by all runs under train.output_dir."""
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.train.output_dir) / ".data_cache"


def setup_files(cfg: RunConfig, is_rank0: bool, barrier: Callable[[], None]) -> None:
    """Rank 0 writes the run's generated inputs; every rank returns once they exist."""
    if is_rank0:
        if cfg.data.synthetic.enabled:
            materialise_synthetic(cfg)
        if cfg.model.tokenizer is None and cfg.model.name_or_path is None and not tokenizer_dir(cfg).exists():
            if cfg.data.source == "files":
                train_files, _ = data_files(cfg)
                records, _ = load_many(train_files, on_bad_record="skip")
            else:
                records, _ = load_task_split(cfg, "train")
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


def prompt_settings(cfg: RunConfig) -> PromptSettings:
    d = cfg.data
    return PromptSettings(
        d.system_prompt, d.max_length, d.max_profile_tokens, d.max_response_tokens, dict(d.chat_template_kwargs)
    )


def tokenize_split(files: list[str], tokenizer: Any, cfg: RunConfig) -> tuple[list[TokenizedExample], SplitReport]:
    """Load, validate and tokenise every record of a split, honouring data.on_bad_record."""
    report = SplitReport(files=files)
    if not files:
        return [], report
    records, load_reports = load_many(files, on_bad_record=cfg.data.on_bad_record)
    report.records_read = sum(r.read for r in load_reports)
    report.skipped = [m for r in load_reports for m in r.skipped]
    settings = prompt_settings(cfg)
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
        report.count(example, record.user_id, len(record.profile))
        examples.append(example)
    if report.skipped:
        log.warning("%s: skipped %d bad records, e.g. %s", source, len(report.skipped), report.skipped[0])
    report.warn_if_profiles_cut(len(examples))
    return examples, report


def prepare_data(cfg: RunConfig, is_rank0: bool, barrier: Callable[[], None]) -> PreparedData:
    """Tokenised train/eval examples and their reports, identical on every rank; rank 0 does one-off work
    (synthetic files, tokenizer training, the tokenised cache) while the others wait at a barrier."""
    setup_files(cfg, is_rank0, barrier)
    tokenizer = resolve_tokenizer(cfg)
    if cfg.data.source == "files":
        train_files, eval_files = data_files(cfg)
        train, train_report = tokenize_split(train_files, tokenizer, cfg)
        eval_examples, eval_report = tokenize_split(eval_files, tokenizer, cfg)
        where = train_files
    else:
        (train, train_report), (eval_examples, eval_report) = build_task_splits(cfg, tokenizer, is_rank0, barrier)
        where = train_report.files
    if not train:
        raise DataSourceError(
            f"no usable training records in {where}: the split is empty or every record was skipped "
            "(data.on_bad_record=skip: the log names each skipped record and why)"
        )
    log.info("data: train %s (%d examples), eval %s (%d examples)", ", ".join(train_report.files), len(train),
             ", ".join(eval_report.files) or "none", len(eval_examples))  # fmt: skip
    return PreparedData(tokenizer, train, eval_examples, {"train": train_report, "eval": eval_report})


def require_profiles(examples: list[TokenizedExample], report: SplitReport, scheme: str) -> None:
    """Refuse a run whose weights need PIR when no training record keeps any profile: every PIR would be 0,
    every weight clip_min, and the run plain CE under another name."""
    if any(e.profile_items_kept > 0 for e in examples):
        return
    raise ConfigError(
        f"loss.scheme={scheme} needs profiles, but none of the {len(examples)} training records in "
        f"{', '.join(report.files)} keeps one ({report.empty_profiles} empty in the source, "
        f"{report.profiles_cut_to_nothing} cut to nothing by the token budgets). Raise data.max_length or "
        "data.max_profile_tokens, or train with loss.scheme=ce"
    )


# ----------------------------------------------------------------------------------------- longlamp / lamp


class SplitProcessor:
    """records -> cache columns: retrieve top-k profile items per record, then build and tokenise both prompts.

    A record that cannot be tokenised (too long even without a profile) becomes a row with an `error`
    (the RecordError's parts as JSON), so the decision to raise or skip is taken after loading, identically
    on every rank, and a cache can be shared by runs that differ only in data.on_bad_record.
    """

    def __init__(self, cfg: RunConfig, tokenizer: Any, source: str):
        r = cfg.data.retrieval
        self.retriever = Retriever(r.method, r.top_k, r.seed, r.contriever_path, r.batch_size)
        self.tokenizer, self.settings, self.source = tokenizer, prompt_settings(cfg), source
        self.calls = 0  # records tokenised by this processor (the cache test counts them)

    def __call__(self, records: list[PersonaRecord]) -> dict[str, list[Any]]:
        requests = []
        for r in records:
            spec = TASKS[r.task]
            requests.append(
                RetrievalRequest(r.record_id, spec.query_of(r.query), r.profile, list(map(spec.item_text, r.profile)))
            )
        try:
            selections = self.retriever.select(requests)
        except ValueError as e:
            raise ValueError(f"{self.source}: retrieval failed for task {records[0].task}: {e}") from None
        cols: dict[str, list[Any]] = {name: [] for name in CACHE_COLUMNS}
        for record, picked in zip(records, selections):
            chosen = PersonaRecord(**{**record.to_dict(), "profile": [record.profile[i] for i in picked]})
            self.calls += 1
            try:
                ex, error = tokenize_record(chosen, self.tokenizer, self.settings, self.source), ""
            except RecordError as e:
                ex = TokenizedExample(record.record_id, [], [], [])
                error = json.dumps([e.source, e.where, e.field_name, e.problem])
            row = {**ex.__dict__, "user_id": record.user_id, "profile_size": len(record.profile), "error": error}
            for name in CACHE_COLUMNS:
                cols[name].append(row[name])
        return cols


CACHE_COLUMNS = (
    "record_id", "user_id", "profile_size", "cond_prompt_ids", "abl_prompt_ids", "response_ids",
    "persona_token_mask", "persona_token_kinds", "profile_items_kept", "profile_items_dropped",
    "profile_items_trimmed", "profile_tokens_trimmed", "response_capped", "profile_block", "error",
)  # fmt: skip


def cache_settings(cfg: RunConfig, role: str) -> dict[str, Any]:
    """Everything besides records and tokenizer that the cached rows depend on."""
    r = cfg.data.retrieval
    return {
        "role": role,
        "prompt": dataclasses.asdict(prompt_settings(cfg)),
        "retrieval": {"method": r.method, "top_k": r.top_k, "seed": r.seed if r.method == "random" else None},
        "encoder": path_fingerprint(r.contriever_path) if r.method == "contriever" else None,
    }


def _task_split(
    cfg: RunConfig, role: str, tokenizer: Any, is_rank0: bool, barrier: Callable[[], None]
) -> tuple[list[TokenizedExample], SplitReport]:
    records, load_report = load_task_split(cfg, role)
    source = load_report.source if load_report else f"{cfg.data.source} [{role}: no split]"
    report = SplitReport(files=[source] if load_report else [])
    if load_report:
        report.records_read, report.skipped = load_report.read, list(load_report.skipped)
        report.profile_item_fields = load_report.item_fields_summary()
    fingerprint = split_fingerprint(records, tokenizer, cache_settings(cfg, role))
    path = cache_path(cache_root(cfg), f"{cfg.data.source}-{role}", fingerprint)
    processor = SplitProcessor(cfg, tokenizer, source) if is_rank0 and not path.is_file() else None
    rows, report.cache_built = build_or_load(
        records, processor, path, is_rank0, barrier, desc=f"{role}: retrieve + tokenise"
    )
    report.cache_file = str(path)
    examples = []
    for row in rows:
        if row["error"]:
            error = RecordError(*json.loads(row["error"]), hint="raise data.max_length, or set data.on_bad_record=skip")
            if cfg.data.on_bad_record == "error":
                raise error
            report.skipped.append(str(error))
            continue
        example = TokenizedExample(
            **{k: row[k] for k in CACHE_COLUMNS if k not in ("user_id", "profile_size", "error")}
        )
        report.count(example, row["user_id"], row["profile_size"])
        examples.append(example)
    report.warn_if_profiles_cut(len(examples))
    log.info("%s: %d examples (%s cache %s)", source, len(examples), "built" if report.cache_built else "reused", path)
    return examples, report


def build_task_splits(
    cfg: RunConfig, tokenizer: Any, is_rank0: bool, barrier: Callable[[], None]
) -> tuple[tuple[list[TokenizedExample], SplitReport], tuple[list[TokenizedExample], SplitReport]]:
    """Train and eval examples of a longlamp / lamp source through the tokenised cache (one barrier per split)."""
    return _task_split(cfg, "train", tokenizer, is_rank0, barrier), _task_split(
        cfg, "eval", tokenizer, is_rank0, barrier
    )
