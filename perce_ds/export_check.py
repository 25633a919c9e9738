"""Would an exported Hugging Face folder load in vLLM (and any other loader that trusts config.json)?

Checked at export time (checkpoint.export_hf), from the files alone, so a bad export fails in the training job
with a message rather than hours later in the evaluation job:
- config.json names an architecture and a floating dtype (vLLM picks its dtype from it);
- the weights are safetensors holding every parameter the model has, at its full shape (a ZeRO-3 parameter saved
  without being gathered is an empty tensor: the failure vLLM users meet as a shape mismatch at load), each in
  a floating dtype;
- tied embeddings: a model that does not tie its output layer to its input embeddings has lm_head.weight;
- vocabulary: the embedding has `config.vocab_size` rows (vLLM sizes its embedding from the config) and at least
  as many as the tokenizer has tokens (a token id past the last row crashes at run time).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from perce_ds.errors import UserError

FLOAT_DTYPES = {"float16", "bfloat16", "float32"}
SAFETENSORS_FLOATS = {"F16", "BF16", "F32"}


class ExportCheckError(UserError, ValueError):
    """An exported folder that a loader such as vLLM would refuse or load wrongly."""


def _header(path: Path) -> dict[str, Any]:
    """The safetensors header (name -> {dtype, shape}) without reading the tensors."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def check_export(
    out_dir: Path, expected_shapes: dict[str, tuple[int, ...]], embedding_key: str, tokenizer_len: int
) -> None:
    """Raise ExportCheckError naming the file and field when `out_dir` would not load in vLLM.

    `expected_shapes`: every tensor the model's state dict must hold (tied copies left out), with its full shape;
    `embedding_key`: the input embedding's tensor name; `tokenizer_len`: len(tokenizer)."""
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    hint = "re-export with launch/convert_checkpoint.py, or fix the config"
    if not config.get("architectures"):
        raise ExportCheckError(f"{config_path}: no `architectures`; vLLM picks the model class from it ({hint})")
    dtype = config.get("torch_dtype") or config.get("dtype")
    if dtype not in FLOAT_DTYPES:
        raise ExportCheckError(f"{config_path}: dtype {dtype!r} is not one of {sorted(FLOAT_DTYPES)} ({hint})")
    files = sorted(out_dir.glob("*.safetensors"))
    if not files:
        raise ExportCheckError(f"{out_dir}: no *.safetensors weights (vLLM loads safetensors)")
    tensors: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path in files:
        tensors.update({name: (path, info) for name, info in _header(path).items()})
    missing = sorted(set(expected_shapes) - set(tensors))
    if missing:
        raise ExportCheckError(f"{out_dir}: weights missing from the safetensors files: {missing[:5]} ({hint})")
    for name, shape in expected_shapes.items():
        path, info = tensors[name]
        if info["dtype"] not in SAFETENSORS_FLOATS:
            raise ExportCheckError(f"{path}: tensor {name} has dtype {info['dtype']}; expected one of F16/BF16/F32")
        if tuple(info["shape"]) != tuple(shape):
            raise ExportCheckError(
                f"{path}: tensor {name} has shape {info['shape']}, the model's is {list(shape)}"
                + (" (an empty tensor: a ZeRO-3 parameter saved without gathering it)" if 0 in info["shape"] else "")
            )
    if not config.get("tie_word_embeddings", True) and "lm_head.weight" not in tensors:
        raise ExportCheckError(
            f"{config_path}: tie_word_embeddings is false but the weights hold no lm_head.weight; vLLM would "
            "leave the output layer uninitialised"
        )
    rows = tensors[embedding_key][1]["shape"][0]
    if config.get("vocab_size") != rows:
        raise ExportCheckError(
            f"{config_path}: vocab_size {config.get('vocab_size')} but {embedding_key} has {rows} rows; vLLM sizes "
            "the embedding from the config and would refuse the weights"
        )
    if tokenizer_len > rows:
        raise ExportCheckError(
            f"{out_dir}: the tokenizer has {tokenizer_len} tokens but the embedding only {rows} rows; resize the "
            "embedding (model.resize_token_embeddings) before training"
        )


def expected_state(lm: Any) -> tuple[dict[str, tuple[int, ...]], str]:
    """(tensor name -> full shape, tied copies left out as export_hf leaves them; the input embedding's name)."""
    shapes: dict[str, tuple[int, ...]] = {}
    first_name: dict[int, str] = {}
    for name, p in lm.named_parameters(remove_duplicate=False):
        if id(p) not in first_name:
            first_name[id(p)] = name
            shapes[name] = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the full shape in ds_shape
    return shapes, first_name[id(lm.get_input_embeddings().weight)]
