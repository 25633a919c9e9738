"""Prompts built with real chat templates (Qwen3, Llama-3-Instruct; jinja text in tests/fixtures/chat_templates/).

The templates sit on a byte-level BPE trained here that has each family's special tokens, saved and
reloaded through AutoTokenizer as a run loads its tokenizer. What must hold: the training sequence
(conditioned prompt + response ids) is exactly what the model's own template renders for the
conversation; the response ends with the template's end-of-turn token (not necessarily EOS); the
profile block is in the conditioned prompt only; data.chat_template_kwargs reaches every prompt.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from perce_ds.config import RunConfig
from perce_ds.data import pipeline
from perce_ds.data.prompts import PROFILE_HEADER, PromptSettings, end_of_turn_id, render_prompt, tokenize_record
from perce_ds.data.synthetic_natural import generate_records
from perce_ds.data.tokenizer import load_tokenizer

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
SYSTEM = "You are a helpful assistant who writes in the user's own voice."

FAMILIES = {
    # name: (template file, special tokens, eos, bos, pad, end-of-turn token, added non-special tokens, template kwargs)
    "qwen3": ("qwen3.jinja", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", None, "<|endoftext|>",
              "<|im_end|>", ["<think>", "</think>"], {"enable_thinking": False}),
    "llama3": ("llama3_instruct.jinja", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eot_id|>"], "<|end_of_text|>", "<|begin_of_text|>", None, "<|eot_id|>", [], {}),
}  # fmt: skip


def family_tokenizer(name: str, out_dir: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    template, specials, eos, bos, pad, _, added, _ = FAMILIES[name]
    texts = [r.response for r in generate_records(12, 2, 2, 0)] + [
        it["text"] for r in generate_records(12, 2, 1, 0) for it in r.profile
    ]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=800, min_frequency=2, special_tokens=specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=eos, bos_token=bos, pad_token=pad)
    tok.add_tokens(added)  # Qwen3's <think> / </think> are added tokens that are not special
    tok.chat_template = (TEMPLATES / template).read_text()
    tok.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    return request.param, family_tokenizer(request.param, tmp_path_factory.mktemp(request.param))


def _conversation(tok, user: str, response: str, kwargs: dict) -> str:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                {"role": "assistant", "content": response}]  # fmt: skip
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


def check_prompts_follow_the_template(tok, kwargs: dict, eot_token: str, records) -> None:
    """Conditioned/ablated prompts + response of each record against the tokenizer's own template."""
    settings = PromptSettings(SYSTEM, 1024, 512, chat_template_kwargs=kwargs)
    eot = tok.convert_tokens_to_ids(eot_token)
    assert end_of_turn_id(tok, kwargs) == eot
    for record in records:
        ex = tokenize_record(record, tok, settings, "fixture")
        assert ex.profile_items_kept == len(record.profile) > 0
        # the response ends with the end-of-turn token and holds no other special token
        assert ex.response_ids[-1] == eot and eot not in ex.response_ids[:-1]
        assert tok.decode(ex.response_ids[:-1]) == record.response
        for prompt, user in ((ex.cond_prompt_ids, ex.profile_block + record.query), (ex.abl_prompt_ids, record.query)):
            text = tok.decode(prompt + ex.response_ids, skip_special_tokens=False)
            full = _conversation(tok, user, record.response, kwargs)
            # the model's own template for the whole conversation: identical up to the end-of-turn token
            assert full.startswith(text) and full[len(text) :] in ("", "\n"), (text[-80:], full[-80:])
        cond = tok.decode(ex.cond_prompt_ids, skip_special_tokens=False)
        abl = tok.decode(ex.abl_prompt_ids, skip_special_tokens=False)
        assert PROFILE_HEADER in cond and PROFILE_HEADER not in abl
        assert ex.profile_block and cond.replace(ex.profile_block, "", 1) == abl
        assert ex.cond_prompt_ids[-3:] == ex.abl_prompt_ids[-3:]  # both end where the answer begins


def test_training_sequence_is_what_the_template_renders(family):
    name, tok = family
    check_prompts_follow_the_template(tok, FAMILIES[name][7], FAMILIES[name][5], generate_records(3, 2, 2, 0, "eval"))


def test_llama3_response_ends_with_eot_not_eos(tmp_path):
    tok = family_tokenizer("llama3", tmp_path / "tok")
    ex = tokenize_record(generate_records(1, 1, 1, 0, "eval")[0], tok, PromptSettings(SYSTEM, 1024, 512), "fixture")
    assert tok.eos_token == "<|end_of_text|>" and ex.response_ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>")


def test_qwen3_thinking_switch_reaches_the_prompt(tmp_path):
    tok = family_tokenizer("qwen3", tmp_path / "tok")
    default = render_prompt(tok, SYSTEM, "hi")
    off = render_prompt(tok, SYSTEM, "hi", {"enable_thinking": False})
    assert default.endswith("<|im_start|>assistant\n")
    assert off == default + "<think>\n\n</think>\n\n"
    # Without the switch the training prompt is not what the template renders for the answered conversation
    # (which has the empty think block): the trap data.chat_template_kwargs exists for.
    assert not _conversation(tok, "hi", "Hello.", {}).startswith(default + "Hello.")
    assert _conversation(tok, "hi", "Hello.", {}).startswith(off + "Hello.")


def test_chat_template_kwargs_from_the_config_reach_prompt_settings(tmp_path):
    cfg = RunConfig.load(None, ["model.name_or_path=x", "data.train_files=[a.jsonl]",
                                "data.chat_template_kwargs={enable_thinking: false}"])  # fmt: skip
    assert pipeline.prompt_settings(cfg).chat_template_kwargs == {"enable_thinking": False}
    tok = family_tokenizer("qwen3", tmp_path / "tok")
    record = generate_records(1, 1, 1, 0, "eval")[0]
    ex = tokenize_record(record, tok, pipeline.prompt_settings(cfg), "cfg")
    assert tok.decode(ex.abl_prompt_ids, skip_special_tokens=False).endswith("<think>\n\n</think>\n\n")
    plain = tokenize_record(record, tok, PromptSettings(SYSTEM, 1024, 512), "plain")
    assert tok.decode(plain.abl_prompt_ids, skip_special_tokens=False).endswith("assistant\n")


def test_every_qwen3_recipe_asks_for_the_non_thinking_prompt():
    recipes = sorted((Path(__file__).parents[1] / "recipes").rglob("*qwen3*.yaml"))
    assert len(recipes) >= 12
    for path in recipes:
        assert RunConfig.load(path).data.chat_template_kwargs == {"enable_thinking": False}, path
