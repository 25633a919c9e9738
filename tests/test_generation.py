"""Generation: batch planning, padding invariance, resume after a kill, bad inputs, 2-process ZeRO-3."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from perce_ds.data import pipeline
from perce_ds.evaluation import generation, runs
from perce_ds.evaluation.evaluate import EvalOptions, evaluate_run
from perce_ds.evaluation.generation import GenerationSettings, GenItem, plan_batches, read_generations, run_generation
from perce_ds.evaluation.report import score_generations, summarise_by_task
from tests.launch_utils import EVALUATE, check, make_eval_run, run_deepspeed, run_python


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_eval_run(tmp_path_factory.mktemp("gen") / "run")


@pytest.fixture(scope="module")
def model_and_items(tiny_run):
    from transformers import AutoModelForCausalLM

    from perce_ds.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_run / "hf")
    lm = AutoModelForCausalLM.from_pretrained(tiny_run / "hf", dtype=torch.float32).eval()
    cfg = runs.load_run_config(tiny_run)
    records = runs.split_records(cfg, "test")
    examples, _ = runs.tokenize_for_eval(records, tok, pipeline.prompt_settings(cfg))
    return lm, tok, records, runs.gen_items(records, examples, ablated=False)


def test_plan_gives_every_rank_the_same_number_of_batches():
    items = [GenItem(f"r{i}", "a" if i % 3 else "b", [1] * (i + 1)) for i in range(11)]
    for world in (1, 2, 3, 4):
        plan = plan_batches(items, 2, world)
        assert len({len(p) for p in plan}) == 1
        real = sorted(i for p in plan for b in p if b is not None for i in b)
        assert real == list(range(11))
        for p in plan:
            for b in p:
                assert b is None or len({items[i].task for i in b}) == 1  # one task (one max_new_tokens) per batch
    # batches do not depend on the world size or on what is already done
    flat = lambda plan: sorted(tuple(b) for p in plan for b in p if b is not None)  # noqa: E731
    assert flat(plan_batches(items, 2, 1)) == flat(plan_batches(items, 2, 3))
    done = {"r0", "r1", "r2", "r3"}
    assert set(flat(plan_batches(items, 2, 1, done))) <= set(flat(plan_batches(items, 2, 1)))


def test_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"record_id": "a", "generation": "x"}\n{"record_id": "b", "gen')
    assert list(read_generations(path)) == ["a"]
    path.write_text('{"record_id": "a"}\nnot json\n{"record_id": "b"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_generations(path)


def test_left_padding_does_not_change_greedy_text(model_and_items):
    lm, tok, _, items = model_and_items
    prompts = [it.prompt_ids for it in items[:4]]
    assert len({len(p) for p in prompts}) > 1  # really different lengths, so really padded
    settings = GenerationSettings(max_new_tokens=12)
    batched = generation.generate_batch(lm, tok, prompts, 12, settings)
    alone = [generation.generate_batch(lm, tok, [p], 12, settings)[0] for p in prompts]
    assert batched == alone and all(batched)


def test_interrupted_generation_resumes_to_the_same_scores(model_and_items, tmp_path, monkeypatch):
    lm, tok, records, items = model_and_items
    settings = GenerationSettings(max_new_tokens=10, batch_size=3, max_new_tokens_per_task={"synthetic_persona": 8})
    straight = run_generation(lm, tok, items, settings, tmp_path / "straight.jsonl", progress=False)

    real, calls = generation.generate_completions, {"n": 0}

    def dies_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    path = tmp_path / "resumed.jsonl"
    monkeypatch.setattr(generation, "generate_completions", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run_generation(lm, tok, items, settings, path, progress=False)
    monkeypatch.setattr(generation, "generate_completions", real)
    partial = read_generations(path)
    assert 0 < len(partial) < len(items)
    with path.open("a") as f:
        f.write('{"record_id": "torn", "gener')  # a kill in the middle of a write
    resumed = run_generation(lm, tok, items, settings, path, progress=False)
    assert len(read_generations(path)) == len(items)

    refs = {r.record_id: (r.task, r.response) for r in records}
    texts = lambda rows: {k: v["generation"] for k, v in rows.items()}  # noqa: E731
    assert texts(resumed) == texts(straight)
    a = summarise_by_task(score_generations(refs, texts(straight)))
    b = summarise_by_task(score_generations(refs, texts(resumed)))
    assert a == b


def _opts(run, **kw):
    kw.setdefault("generation", GenerationSettings(max_new_tokens=3, batch_size=4))
    return EvalOptions(run=run, limit=3, **kw)


def test_bad_inputs_give_clear_messages_and_overwrite_nothing(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with pytest.raises(runs.EvalInputError, match="not a perce_ds run directory"):
        evaluate_run(_opts(tmp_path / "nope"))
    shutil.move(run / "hf", tmp_path / "hf_away")
    with pytest.raises(runs.EvalInputError, match="no exported model"):
        evaluate_run(_opts(run))
    shutil.move(tmp_path / "hf_away", run / "hf")

    scores = evaluate_run(_opts(run, name="x"))
    assert scores["overall"]["n_records"] == 3
    gen = run / "eval" / "x" / "generations.jsonl"
    before = gen.read_text()
    # the same directory for a different split (another dataset) is refused, nothing touched
    with pytest.raises(runs.EvalInputError, match="different inputs.*--overwrite"):
        evaluate_run(_opts(run, name="x", split="eval"))
    assert gen.read_text() == before
    # generations whose ids are not in the split
    rows = [json.loads(x) for x in before.splitlines()]
    rows[0]["record_id"] = "someone-else-42"
    gen.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(runs.EvalInputError, match="another dataset"):
        evaluate_run(_opts(run, name="x"))
    assert evaluate_run(_opts(run, name="x", split="eval", overwrite=True))["meta"]["split"] == "eval"

    cfg = runs.load_run_config(run)
    cfg.data.synthetic.enabled, cfg.data.train_files = False, ["train.jsonl"]
    with pytest.raises(runs.EvalInputError, match="--data"):
        runs.split_records(cfg, "test")
    with pytest.raises(runs.EvalInputError, match="not in the test split"):
        runs.split_records(runs.load_run_config(run), "test", tasks=["no_such_task"])


@pytest.mark.slow
def test_zero3_two_process_generation_equals_single_process(tiny_run, tmp_path):
    """Prompts of different lengths and two tasks with different max_new_tokens, so ranks finish at different
    times within a round: synced_gpus must keep them stepping together (a hang fails within the dist timeout)."""
    data = tmp_path / "two_tasks.jsonl"
    rows = [json.loads(x) for x in (tiny_run / "data" / "eval.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        r["task"] = "short_task" if i % 2 else r["task"]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--run", str(tiny_run), "--data", str(data), "--max-new-tokens", "10",
              "--task-max-new-tokens", "short_task=4", "--batch-size", "3"]  # fmt: skip
    check(run_python(EVALUATE, [*common, "--name", "single"]))
    check(
        run_deepspeed(EVALUATE, [*common, "--name", "zero3", "--zero3", "--dist-timeout", "60"], nproc=2, timeout=240)
    )
    single = read_generations(tiny_run / "eval" / "single" / "generations.jsonl")
    zero3 = read_generations(tiny_run / "eval" / "zero3" / "generations.jsonl")
    assert len(single) == len(rows) == len(zero3)
    assert {k: v["generation"] for k, v in zero3.items()} == {k: v["generation"] for k, v in single.items()}
    assert any(v["generation"] for v in single.values())
    meta = json.loads((tiny_run / "eval" / "zero3" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["zero3"] is True
