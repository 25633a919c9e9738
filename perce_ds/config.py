"""One typed config for a run: YAML recipe + dotted CLI overrides, validated, dumped to the run dir.

`RunConfig.load(recipe_path, ["train.lr=1e-5", ...])` is the only way a run gets its settings.
Unknown keys and wrong types fail with the dotted key's name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from perce_ds.errors import UserError
from perce_ds.logging_utils import REPORTERS
from perce_ds.loss import REGISTRY
from perce_ds.metric_presets import PRESETS


class ConfigError(UserError, ValueError):
    """A recipe or override that cannot be used; the message names the key."""


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # llama/qwen/mistral


@dataclass
class LoraConfig:
    """model.lora: train low-rank adapters (peft) on the frozen model instead of all its weights."""

    r: int = 16
    alpha: float = 32.0  # peft's lora_alpha: the update is (alpha / r) B A
    # 0 by default: adapter dropout in the PerCE passes would make each token's PIR noisy
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # module names (suffixes)
    modules_to_save: list[str] = field(default_factory=list)  # modules trained in full (e.g. lm_head)
    adapter: str | None = None  # a peft adapter folder (a run's hf_adapter/) to start from instead of B = 0

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(
                f"model.lora needs r >= 1, alpha > 0 and 0 <= dropout < 1 (got r={self.r}, alpha={self.alpha}, "
                f"dropout={self.dropout})"
            )
        if not self.target_modules:
            raise ConfigError("model.lora.target_modules is empty: name the modules to adapt (e.g. q_proj, v_proj)")


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # HF folder or hub id of a pretrained causal LM
    config: dict[str, Any] | None = None  # architecture to build from scratch (needs "model_type")
    tokenizer: str | None = None  # HF tokenizer folder; default: name_or_path; none: train one
    tokenizer_vocab_size: int = 1024  # when a sentencepiece tokenizer is trained on the train data
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    activation_checkpointing: bool = True
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on a bf16 GPU, else fp32
    lora: LoraConfig | None = None  # None: full fine-tuning


@dataclass
class SyntheticDataConfig:
    enabled: bool = False
    # persona: template profiles, eval asks the training users new things (perce_ds/data/synthetic.py);
    # persona_natural: natural-sentence profiles, copyable and inferable persona tokens, eval on unseen
    # users (perce_ds/data/synthetic_natural.py) -- for pretrained chat models.
    task: Literal["persona", "persona_natural"] = "persona"
    users: int = 24  # persona_natural: the training users
    train_per_user: int = 8
    eval_per_user: int = 2
    eval_users: int = 0  # persona_natural only: unseen users in eval (validation), as many more (disjoint) in test
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task == "persona" and self.eval_users:
            raise ConfigError(
                "data.synthetic.eval_users is used only by task persona_natural (task persona evaluates its "
                "training users); remove it or set data.synthetic.task=persona_natural"
            )
        if self.enabled and self.task == "persona_natural" and self.eval_users < 1:
            raise ConfigError("data.synthetic.task=persona_natural needs data.synthetic.eval_users >= 1 (unseen users)")


@dataclass
class LongLaMPSourceConfig:
    dataset: str = "LongLaMP/LongLaMP"  # hub name, or a local folder in the same layout (parquet/json/arrow)
    config: str = "product_review_user"  # abstract_generation_*, product_review_*, topic_writing_*, email_generation_*
    train_split: str = "train"
    eval_split: str = "val"  # LongLaMP calls it "val"; "" = no eval split


@dataclass
class LaMPSourceConfig:
    path: str = ""  # folder with {split}_questions.json / {split}_outputs.json (flat or in {split}/ subfolders)
    task: Literal["LaMP_4", "LaMP_5", "LaMP_7"] = "LaMP_4"
    train_split: str = "train"
    eval_split: str = "dev"  # "" = no eval split


@dataclass
class RetrievalConfig:
    method: Literal["bm25", "contriever", "recency", "random", "all"] = "bm25"
    top_k: int = 4  # profile items kept per record (fewer when the profile is smaller)
    contriever_path: str = ""  # local folder (or hub id) of a mean-pooled encoder; needed for method=contriever
    batch_size: int = 32  # texts per encoder forward (contriever)
    seed: int = 0  # for method=random


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # JSONL / Parquet / HF dataset dirs
    eval_files: list[str] = field(default_factory=list)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    system_prompt: str = "You are a helpful assistant who writes in the user's own voice."
    # extra arguments of tokenizer.apply_chat_template, the same in training, E-step and generation
    # (Qwen3: {enable_thinking: false} gives the non-thinking prompt with its empty think block)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    max_length: int = 1024  # conditioned prompt + response, in tokens
    max_profile_tokens: int = 512  # budget for the profile block (files: whole items dropped; tasks: per item)
    on_bad_record: Literal["error", "skip"] = "error"
    # files: PersonaRecord files above (profiles used as given); longlamp / lamp: the sections below,
    # with retrieval, per-task prompts and a tokenised cache.
    source: Literal["files", "longlamp", "lamp"] = "files"
    longlamp: LongLaMPSourceConfig = field(default_factory=LongLaMPSourceConfig)
    lamp: LaMPSourceConfig = field(default_factory=LaMPSourceConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    max_train_records: int = 0  # keep a seeded sample of this many training records; 0 = all
    max_eval_records: int = 0  # the same for the eval split
    subset_seed: int = 0  # which records max_*_records keeps
    max_response_tokens: int = 0  # responses longer than this are cut (and counted); 0 = never cut
    cache_dir: str = ""  # tokenised cache; "" = <train.output_dir>/.data_cache (shared by runs)
    packing: bool = False  # padding-free micro-batches: sequences concatenated, position ids restart per sequence

    def __post_init__(self) -> None:
        # Files a user names replace the synthetic data a recipe enables as its default (the demo recipe is the
        # default recipe: `--data.train_files my.jsonl` alone must train on my.jsonl).
        if self.synthetic.enabled and (self.train_files or self.eval_files):
            self.synthetic.enabled = False
        # Checks local to this section; RunConfig.validate does the cross-section ones.
        for key in ("max_train_records", "max_eval_records", "max_response_tokens"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.{key} must be >= 0, got {getattr(self, key)}")
        if self.retrieval.top_k < 1 or self.retrieval.batch_size < 1:
            raise ConfigError("data.retrieval.top_k and data.retrieval.batch_size must be >= 1")
        if self.source != "files" and self.retrieval.method == "contriever" and not self.retrieval.contriever_path:
            raise ConfigError("data.retrieval.method=contriever needs data.retrieval.contriever_path")
        if self.source != "files" and (self.train_files or self.eval_files):
            named = [k for k in ("train_files", "eval_files") if getattr(self, k)]
            raise ConfigError(
                f"data.source={self.source} reads its splits from data.{self.source}, so "
                f"{' and '.join('data.' + k for k in named)} would be ignored: set data.source=files to train on "
                f"your files, or remove {' and '.join('data.' + k for k in named)} to use the {self.source} splits"
            )
        if self.source == "lamp" and not self.lamp.path:
            raise ConfigError("data.source=lamp needs data.lamp.path (the folder with the question/output JSON files)")
        if self.max_response_tokens == 1:
            raise ConfigError("data.max_response_tokens=1 leaves no room for a response; use 0 (no cap) or >= 2")


@dataclass
class LossConfig:
    scheme: str = "perce"  # see perce_ds.loss.REGISTRY
    clip_min: float = 0.8
    clip_max: float = 5.0
    allow_nonpositive_clip_min: bool = False  # a weight <= 0 would unlearn tokens: opt in explicitly
    track_pir: bool = True  # run the ablated pass for metrics even when the scheme does not need it
    logprob_chunk_size: int = 1024  # rows of [tokens, vocab] logits materialised at once
    fused_passes: bool = (
        False  # one forward for both passes (ablated rows detached): one all-gather less, more backward
    )
    # lambda in [0, 1]: every scheme's weights become lambda + (1 - lambda) * w; 0 = the scheme as published,
    # 1 = CE exactly. Trades the persona tokens' share of the update against the rest's (README "loss.ce_mix").
    ce_mix: float = 0.0
    weights_from: str | None = None  # offline EM: a launch/estimate.py output dir; no ablated pass in training
    # Warn (once) when no token's PIR has exceeded clip_min for this many steps in a row: every weight is then
    # clip_min and the update is CE's. 0 = never warn.
    warn_no_personal_steps: int = 50


@dataclass
class TrainConfig:
    max_steps: int = 0  # optimizer steps; 0 = derive from epochs
    epochs: int = 1
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    output_dir: str = "runs"
    run_name: str = ""  # default: the recipe's file name
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto | none | path to a checkpoint directory
    stop_after: int = 0  # end this invocation (with a checkpoint) after N steps; the schedule still spans max_steps
    max_wall_time: float = 0.0  # seconds; like a SIGUSR1 when reached (checkpoint, exit for requeue); 0 = off
    log_every: int = 1
    eval_every: int = 0  # steps between teacher-forced evaluations of the eval split; 0 = only at the end
    # export <run>/hf_best (+ best.json) whenever this eval metric (an eval_metrics.jsonl key, e.g. eval_ce)
    # improves: the early-stopping checkpoint a validated sweep selects; "" = off
    keep_best: str = ""
    keep_best_mode: Literal["min", "max"] = "min"  # min: lower is better (NLL); max: higher (accuracy)
    # early stopping: end the run (as finished) once keep_best's metric has not improved for this many
    # evaluations (steps since the best >= patience x eval_every); needs keep_best and eval_every; 0 = off
    keep_best_patience: int = 0
    max_nonfinite_steps: int = 3  # consecutive refused steps before the run stops
    export_hf: bool = True
    save_init_model: bool = False  # export the starting model to <run>/hf_init (before/after insight)
    final_generation_eval: bool = False  # end with generation + ROUGE/METEOR + PIR F1 on the eval split
    eval_max_new_tokens: int = 64
    # where step metrics go besides metrics.jsonl: tensorboard (<run>/tensorboard/) and/or wandb (rank 0, run
    # name = run directory name, resumed runs continue the same wandb run; `pip install -e '.[wandb]'`)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    tensorboard: bool | None = None  # legacy alias: false drops tensorboard from report_to, true adds it
    dist_timeout_s: int = 1800


@dataclass
class EvalConfig:
    # ROUGE/METEOR settings and the decoding that goes with them (perce_ds/metric_presets.py PRESETS):
    # strict (ours), longlamp (LongLaMP's own scripts), mirror (the MIRROR re-implementation)
    metrics_preset: str = "strict"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    recipe: str = ""  # where it came from (informational)

    @classmethod
    def load(cls, recipe: str | Path | None, overrides: list[str] = ()) -> RunConfig:
        """Build from a YAML recipe (or defaults) plus `key.sub=value` overrides, then validate."""
        raw: dict[str, Any] = {}
        if recipe is not None:
            path = Path(recipe)
            if not path.is_file():
                raise ConfigError(f"recipe {path} does not exist")
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"recipe {path}: top level must be a mapping of sections")
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r} must look like section.key=value")
            _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else "")
        cfg = _build(cls, raw, "")
        if recipe is not None:
            cfg.recipe = str(recipe)
            if not cfg.train.run_name:
                cfg.train.run_name = Path(recipe).stem
        cfg.train.run_name = cfg.train.run_name or "run"
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Cross-field checks that types alone cannot express."""
        if self.loss.scheme not in REGISTRY:
            raise ConfigError(f"loss.scheme: unknown scheme {self.loss.scheme!r}; known: {sorted(REGISTRY)}")
        if self.eval.metrics_preset not in PRESETS:
            raise ConfigError(
                f"eval.metrics_preset: unknown preset {self.eval.metrics_preset!r}; known: {sorted(PRESETS)}"
            )
        if self.loss.clip_min > self.loss.clip_max:
            raise ConfigError(f"loss.clip_min ({self.loss.clip_min}) exceeds loss.clip_max ({self.loss.clip_max})")
        if not 0.0 <= self.loss.ce_mix <= 1.0:
            raise ConfigError(f"loss.ce_mix must be in [0, 1] (0: the scheme's weights, 1: CE), got {self.loss.ce_mix}")
        if self.loss.clip_min <= 0 and not self.loss.allow_nonpositive_clip_min:
            raise ConfigError(
                f"loss.clip_min={self.loss.clip_min} lets token weights reach <= 0 (the model would unlearn "
                "those tokens); set loss.allow_nonpositive_clip_min=true if that is intended"
            )
        if (self.model.name_or_path is None) == (self.model.config is None):
            raise ConfigError("set exactly one of model.name_or_path (pretrained) and model.config (from scratch)")
        if self.model.lora is not None and self.model.name_or_path is None:
            raise ConfigError(
                "model.lora adapts a pretrained model (checkpoints hold the adapters only): set model.name_or_path, "
                "or remove model.lora to train from scratch"
            )
        if self.model.config is not None and "model_type" not in self.model.config:
            raise ConfigError("model.config needs a 'model_type' (e.g. qwen3, llama)")
        if self.data.source == "files" and not self.data.synthetic.enabled and not self.data.train_files:
            raise ConfigError(
                "data.train_files is empty and data.synthetic.enabled is false: no training data "
                "(named data.eval_files turn the synthetic data off; name data.train_files too)"
            )
        for key in ("micro_batch_size", "grad_accum", "epochs", "keep_last", "log_every", "dist_timeout_s"):
            if getattr(self.train, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self.train, key)}")
        if self.loss.warn_no_personal_steps < 0:
            raise ConfigError(f"loss.warn_no_personal_steps must be >= 0, got {self.loss.warn_no_personal_steps}")
        for key in ("max_steps", "save_every", "eval_every", "max_nonfinite_steps", "stop_after", "keep_best_patience"):
            if getattr(self.train, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self.train, key)}")
        if self.train.keep_best_patience and not (self.train.keep_best and self.train.eval_every):
            raise ConfigError(
                f"train.keep_best_patience={self.train.keep_best_patience} counts evaluations without improvement of "
                "train.keep_best's metric: set train.keep_best (e.g. eval_ce) and train.eval_every too, or set the "
                "patience to 0"
            )
        if self.data.max_length < 8 or self.data.max_profile_tokens < 0:
            raise ConfigError("data.max_length must be >= 8 and data.max_profile_tokens >= 0")
        if len(self.train.adam_betas) != 2:
            raise ConfigError("train.adam_betas must hold two numbers")
        self._resolve_report_to()

    def _resolve_report_to(self) -> None:
        """Fold the legacy train.tensorboard flag into train.report_to (the one place), then check the names."""
        t = self.train
        if t.tensorboard is not None:
            t.report_to = [r for r in t.report_to if r != "tensorboard"] + (["tensorboard"] if t.tensorboard else [])
            t.tensorboard = None
        unknown = sorted(set(t.report_to) - set(REPORTERS))
        if unknown:
            raise ConfigError(f"train.report_to: unknown {unknown}; known: {list(REPORTERS)}")
        if "wandb" in t.report_to:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ConfigError(
                    "train.report_to includes wandb but the wandb package is not installed: "
                    "pip install -e '.[wandb]' (or drop wandb from train.report_to)"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dump(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @property
    def run_dir(self) -> Path:
        return Path(self.train.output_dir) / self.train.run_name


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'recipe'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]}; known keys here: {sorted(names)}")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}.{name}" if prefix else name) for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if isinstance(value, (str, int, float)) and args and args[0] is str:
            value = [value]  # a single path where a list is expected
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "2e-5" as a string
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value
