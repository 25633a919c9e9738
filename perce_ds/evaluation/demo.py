"""The evaluation that ends the demo run, on the live (ZeRO-3) training engine.

Three views of the eval split: (1) teacher forcing: next-token accuracy on ground-truth persona
tokens vs other tokens; (2) free generation from the conditioned prompts: ROUGE-1/L and METEOR;
(3) PIR as a persona-token detector: precision/recall/F1 of "PIR > 0" against the ground-truth
mask, with the F1 a random marking at the same positive rate would get, and the best threshold.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from perce_ds.data.prompts import TokenizedExample
from perce_ds.data.records import PersonaRecord
from perce_ds.evaluation import metrics
from perce_ds.evaluation.generation import GenerationSettings, GenItem, run_generation, texts_by_id
from perce_ds.evaluation.report import write_eval_outputs
from perce_ds.evaluation.teacher_forced import ScoredExample, teacher_forced

log = logging.getLogger("perce_ds")


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1 or not dist.is_initialized():
        return [obj]
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, obj)
    return parts


def demo_evaluation(
    engine: Any,
    module: Any,
    tokenizer: Any,
    examples: list[TokenizedExample],
    records: list[PersonaRecord] | None,
    run_dir: Path,
    rank: int,
    world: int,
    max_new_tokens: int,
) -> dict[str, Any]:
    """Score the live model on `examples` (the eval split); write <run_dir>/eval/demo/; return the numbers.

    Every rank calls it with the same arguments: it is a sequence of collectives (Trainer._generation_eval).

    `module` is the PerceLM given to deepspeed.initialize (its `.lm` is the HF model). `records`
    (matched by record_id) supply the reference texts and tasks; without them the reference is the
    decoded response ids. Generation uses `synced_gpus=True` when the parameters are ZeRO-3 shards
    and world > 1 (the caller's live HfDeepSpeedConfig stays referenced by the Trainer).
    The engine is put back in train mode; activation checkpointing is paused meanwhile.

    Returns the same dict on every rank: flat floats/ints (demo_* keys; None when undefined, e.g.
    no ground-truth persona tokens) and "summary_lines", one string of 3 lines for printing.
    Files: eval/demo/generations.jsonl (regenerated each call), per_record.jsonl, scores.json, report.md.
    """
    engine.eval()
    try:
        with module.activation_checkpointing_paused():
            batch_size, device = int(engine.train_micro_batch_size_per_gpu()), next(module.parameters()).device
            scored = teacher_forced(engine, examples, tokenizer.pad_token_id, batch_size, device, rank, world,
                                    with_hits=True)  # fmt: skip
            parts = _gather(scored, world)
            by_rid = {r.record_id: r for r in records or []}
            out_dir = run_dir / "eval" / "demo"
            gen_path = out_dir / "generations.jsonl"
            if rank == 0:
                out_dir.mkdir(parents=True, exist_ok=True)
                gen_path.unlink(missing_ok=True)  # the model changed since any earlier call
            if dist.is_initialized():
                dist.barrier()
            items = [GenItem(e.record_id, by_rid[e.record_id].task if e.record_id in by_rid else "eval", e.cond_prompt_ids)
                     for e in examples]  # fmt: skip
            sharded = any(hasattr(p, "ds_id") for p in module.parameters())
            settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
            gens = run_generation(module.lm, tokenizer, items, settings, gen_path, synced_gpus=sharded and world > 1,
                                  progress=False)  # fmt: skip
    finally:
        engine.train()
    result: dict[str, Any] = {}
    if rank == 0:
        result = _score(examples, [r for part in parts for r in part], by_rid, texts_by_id(gens.values()), tokenizer,
                        out_dir)  # fmt: skip
    if world > 1 and dist.is_initialized():
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def _score(
    examples: list[TokenizedExample], scored: list[ScoredExample], by_rid: dict[str, PersonaRecord],
    generations: dict[str, str], tokenizer: Any, out_dir: Path,
) -> dict[str, Any]:  # fmt: skip
    scored = sorted(scored, key=lambda s: s.index)
    truth = [examples[s.index].persona_token_mask for s in scored]
    pir = [s.pir for s in scored]
    hits = [s.hits for s in scored]
    res: dict[str, Any] = {"demo_n_records": len(examples)}
    if any(truth):
        y = np.concatenate([np.asarray(t, dtype=bool) for t in truth])
        h = np.concatenate(hits)
        res["demo_persona_token_acc"] = float(h[y].mean()) if y.any() else None
        res["demo_other_token_acc"] = float(h[~y].mean()) if (~y).any() else None
        # the eval split is the validation split: choosing the detector's threshold on it is a selection it may make
        m, b = metrics.marking_scores(pir, truth, 0.0), metrics.best_threshold(pir, truth)
        res.update(demo_pir_f1=m["f1"], demo_pir_precision=m["precision"], demo_pir_recall=m["recall"],
                   demo_pir_positive_rate=m["positive_rate"], demo_pir_random_f1=m["random_f1"],
                   demo_pir_best_threshold=b["threshold"], demo_pir_best_f1=b["f1"], demo_pir_best_random_f1=b["random_f1"])  # fmt: skip
    else:
        res["demo_token_acc"] = float(np.concatenate(hits).mean()) if hits else None
    try:
        metrics.ensure_wordnet()
        have_wordnet = True
    except metrics.WordNetMissingError as e:
        log.warning("demo evaluation: METEOR skipped: %s", e)
        have_wordnet = False
    per_record = []
    for e in examples:
        rec = by_rid.get(e.record_id)
        ref = rec.response if rec else tokenizer.decode(e.response_ids[:-1], skip_special_tokens=True)
        gen = generations.get(e.record_id)
        scores = metrics.score_record(gen, ref, with_meteor=have_wordnet)
        per_record.append({"record_id": e.record_id, "task": rec.task if rec else "eval", **scores,
                           "missing": float(e.record_id not in generations)})  # fmt: skip
    summary = write_eval_outputs(out_dir, per_record, {"run": out_dir.parents[1].name, "split": "eval", "seed": 0,
                                                       "model": "live training engine", "ablated": False})  # fmt: skip
    for key in metrics.METRICS:
        v = summary["overall"][key]["mean"]
        res[f"demo_{key}"] = v if math.isfinite(v) else None
    res["demo_n_empty"] = summary["overall"]["n_empty"]
    res["demo_n_think_stripped"] = summary["overall"]["n_think_stripped"]
    res["summary_lines"] = _summary_lines(res)
    return res


def _summary_lines(r: dict[str, Any]) -> str:
    def f(key: str, scale: float = 1.0) -> str:
        v = r.get(key)
        return f"{scale * v:.3f}" if isinstance(v, (int, float)) else "n/a"

    return "\n".join([
        f"demo eval ({r['demo_n_records']} records): persona-token accuracy {f('demo_persona_token_acc')} "
        f"vs other tokens {f('demo_other_token_acc')} (teacher forcing)",
        f"generated answers: ROUGE-1 {f('demo_rouge1', 100)}, ROUGE-L {f('demo_rougeL', 100)}, "
        f"METEOR {f('demo_meteor', 100)} (x100; {r.get('demo_n_empty', 0)} empty, "
        f"{r.get('demo_n_think_stripped', 0)} think blocks stripped)",
        f"PIR>0 as persona-token detector: F1 {f('demo_pir_f1')} (P {f('demo_pir_precision')}, R {f('demo_pir_recall')}) "
        f"vs random marking at the same rate {f('demo_pir_random_f1')}; best threshold {f('demo_pir_best_threshold')}: "
        f"F1 {f('demo_pir_best_f1')} (random {f('demo_pir_best_random_f1')})",
    ])  # fmt: skip
