"""The style-control task: SQuAD pairs, style tokens trained through PEFT, and the token-separation metric."""

from __future__ import annotations

import shutil

import pytest
import torch

from trainables import metrics as M
from trainables.settings import StyleSettings, SettingsError
from trainables.style import (QA, STYLE_TOKENS, TERSE, VERBOSE, Decoding, Generations, StyleEvaluator,
                              StyleFormatter, add_style_tokens, answer_sentence, load_style_splits, separation)


# ---------------------------------------------------------------------------------------------------------------
# Metrics on constructed generations.


def test_separation_and_answer_f1_equal_hand_computed_values():
    # VERBOSE lengths 10, 20 (mean 15); TERSE 2, 4 (mean 3) -> 5.0
    assert M.token_separation([10, 20], [2, 4]) == pytest.approx(5.0)
    # a TERSE mean under one token counts as one: 12 / max(0.5, 1)
    assert M.token_separation([12, 12], [0, 1]) == pytest.approx(12.0)
    assert M.answer_exact_match("The Denver Broncos.", ["Denver Broncos"]) == 1.0
    assert M.answer_exact_match("Denver", ["Denver Broncos"]) == 0.0
    # "denver" vs "denver broncos": precision 1, recall 1/2 -> F1 2/3; the best gold counts
    assert M.answer_f1("Denver", ["Denver Broncos"]) == pytest.approx(2 / 3)
    assert M.answer_f1("Denver", ["Carolina Panthers", "Denver Broncos", "Denver"]) == pytest.approx(1.0)
    assert M.answer_f1("", ["Denver"]) == 0.0
    # the floor: passing keeps the separation, failing is negative and ordered
    assert M.separation_at_floor(4.0, 0.5, 0.3) == (4.0, True)
    assert M.separation_at_floor(4.0, 0.15, 0.3) == (pytest.approx(-0.5), False)
    assert M.separation_at_floor(4.0, 0.0, None) == (4.0, True)


class ScriptedModel(torch.nn.Module):
    """Stands in for a model only at `generate`: each prompt gets the continuation constructed for its (style,
    question), whatever the batching; every call's generation config is recorded."""

    def __init__(self, tok, continuations: dict[tuple[str, str], list[int]]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok = tok
        self.continuations = continuations
        self.calls: list[dict] = []

    def generate(self, input_ids, attention_mask, generation_config):
        rows = []
        for row in input_ids:
            text = self.tok.decode(row)
            key = next(k for k in self.continuations if STYLE_TOKENS[k[0]] in text and k[1] in text)
            rows.append(self.continuations[key])
        self.calls.append({"styles": {k[0] for k in self.continuations
                                      if any(STYLE_TOKENS[k[0]] in self.tok.decode(r) for r in input_ids)},
                           "config": generation_config.to_dict()})
        width = max(len(c) for c in rows)
        pad = generation_config.pad_token_id
        new = torch.tensor([c + [pad] * (width - len(c)) for c in rows])
        return torch.cat([input_ids, new], dim=1)


def test_evaluator_metrics_on_constructed_generations(tiny_model):
    from trainables.model import load_tokenizer
    from trainables.settings import ModelSettings

    tok = load_tokenizer(ModelSettings(name_or_path=str(tiny_model)))
    add_style_tokens(tok)
    s = StyleSettings(context="none")
    fmt = StyleFormatter(tok, s)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    items = [QA("a", "g", "Who won?", "", "Denver Broncos", "The Denver Broncos won.", ("Denver Broncos",)),
             QA("b", "g", "Where?", "", "Paris", "It was in Paris.", ("Paris", "in Paris"))]
    word = lambda w: tok(w, add_special_tokens=False)["input_ids"]  # noqa: E731
    # TERSE: "Denver" + EOS (its length counts tokens before EOS), and "Paris" + EOS
    # VERBOSE: 9 tokens + EOS, and 12 tokens with no EOS (budget ran out: all count)
    model = ScriptedModel(tok, {(TERSE, "Who won?"): word("Denver") + [eos],
                                (TERSE, "Where?"): word("Paris") + [eos, 5, 6],
                                (VERBOSE, "Who won?"): [7] * 9 + [eos],
                                (VERBOSE, "Where?"): [8] * 12})
    ev = StyleEvaluator(model, fmt, Decoding(max_new_tokens=12), batch_size=8, floor=0.9)
    m = ev.evaluate(items)
    len_t = (len(word("Denver")) + len(word("Paris"))) / 2
    assert m["val_len_verbose"] == pytest.approx((9 + 12) / 2)
    assert m["val_len_terse"] == pytest.approx(len_t)
    assert m[M.SEPARATION] == pytest.approx(10.5 / max(len_t, 1.0))
    # "Denver" vs "Denver Broncos" -> 2/3; "Paris" -> 1.0; EM 0 and 1
    assert m[M.TERSE_F1] == pytest.approx((2 / 3 + 1.0) / 2)
    assert m[M.TERSE_EM] == pytest.approx(0.5)
    assert m[M.MEETS_FLOOR] == 0.0 and m[M.SEPARATION_AT_FLOOR] == pytest.approx(((2 / 3 + 1) / 2) / 0.9 - 1)
    assert m[M.SEPARATION_AT_FLOOR] < 0  # visibly failing, never a silent 0


def test_both_styles_are_generated_with_identical_greedy_decoding(tiny_model):
    from trainables.model import load_tokenizer
    from trainables.settings import ModelSettings

    tok = load_tokenizer(ModelSettings(name_or_path=str(tiny_model)))
    add_style_tokens(tok)
    fmt = StyleFormatter(tok, StyleSettings())
    items = [QA(str(i), "g", f"Question {i}?", "Some context.", "x", "y z", ("x",)) for i in range(3)]
    model = ScriptedModel(tok, {(style, f"Question {i}?"): [1, 2] for style in (TERSE, VERBOSE) for i in range(3)})
    StyleEvaluator(model, fmt, Decoding(max_new_tokens=12), batch_size=2).evaluate(items)
    by_style = {s: [c["config"] for c in model.calls if c["styles"] == {s}] for s in (TERSE, VERBOSE)}
    assert len(by_style[TERSE]) == 2 and len(by_style[VERBOSE]) == 2  # 3 questions in batches of 2
    configs = by_style[TERSE] + by_style[VERBOSE]
    assert all(c == configs[0] for c in configs), "TERSE and VERBOSE must be decoded with the same settings"
    assert configs[0]["do_sample"] is False and configs[0]["num_beams"] == 1
    assert configs[0]["max_new_tokens"] == 12 and configs[0]["min_new_tokens"] == 0

    # a separation from runs decoded differently is refused, e.g. VERBOSE given min_new_tokens=30
    t = Generations(TERSE, Decoding(max_new_tokens=64), [2, 3], ["a", "b"])
    v = Generations(VERBOSE, Decoding(max_new_tokens=64, min_new_tokens=30), [30, 31], ["..", ".."])
    with pytest.raises(ValueError, match="identical decoding"):
        separation(t, v)
    assert separation(t, Generations(VERBOSE, Decoding(max_new_tokens=64), [30, 20], ["..", ".."])) == 10.0


def test_a_models_own_sampling_defaults_do_not_leak_into_the_decoding(tiny_model):
    """Qwen3 ships generation_config with do_sample=True; the evaluation must stay greedy with no minimum length."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.6
    model.generation_config.min_new_tokens = 30
    prepared, _ = model._prepare_generation_config(Decoding(max_new_tokens=16).generation_config([2], 0))
    assert prepared.do_sample is False and prepared.min_new_tokens == 0 and prepared.max_new_tokens == 16


# ---------------------------------------------------------------------------------------------------------------
# Data.


def test_answer_sentence_is_the_sentence_holding_the_answer():
    ctx = "Paris is big. The Eiffel Tower was built in 1889 for a fair. It is tall."
    start = ctx.index("1889")
    assert answer_sentence(ctx, start, start + 4, max_words=40) == "The Eiffel Tower was built in 1889 for a fair."
    cut = answer_sentence(ctx, start, start + 4, max_words=3)
    assert "1889" in cut and len(cut.split()) == 3


def test_pairs_are_split_by_article_deterministically(squad_subset):
    s = StyleSettings(path=str(squad_subset), max_train_questions=None, val_fraction=0.2, test_fraction=0.2)
    a, b = load_style_splits(s), load_style_splits(s)
    assert [q.qid for q in a.train] == [q.qid for q in b.train]
    groups = [{q.group for q in part} for part in (a.train, a.val, a.test)]
    contexts = [{q.context for q in part} for part in (a.train, a.val, a.test)]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert not (contexts[0] & contexts[1]) and not (contexts[0] & contexts[2])
    for q in a.train:
        assert q.terse in q.verbose and q.terse == q.golds[0].strip()
    other = load_style_splits(s.model_copy(update={"split_seed": 1}))
    assert {q.group for q in other.test} != groups[2]


def test_bad_pairs_file_names_the_line(tmp_path):
    from trainables.style import read_qas

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"question": "q?", "terse": "a", "verbose": "a b c"}\n{"question": "q2?", "terse": "b"}\n')
    with pytest.raises(SettingsError, match=r"pairs.jsonl:2: missing or empty field\(s\) verbose"):
        read_qas(StyleSettings(path=str(path)))


# ---------------------------------------------------------------------------------------------------------------
# Training: only the style rows of the embedding change; export -> reload round-trips the tokens.


@pytest.mark.slow
def test_only_style_rows_and_adapters_train(style_settings, tmp_path):
    from datasets import Dataset

    from trainables.model import load_peft_model, load_tokenizer
    from trainables.sft import sft_config, sft_trainer_class
    from trainables.tasks import build_task

    s = style_settings
    tok = load_tokenizer(s.model)
    vocab_before = len(tok)
    task = build_task(s, tok)
    style_ids = tok.convert_tokens_to_ids(task.new_tokens)
    assert style_ids == [vocab_before, vocab_before + 1]  # new tokens, appended
    model = load_peft_model(s.model, s.lora, tok, trainable_tokens=task.new_tokens)
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)  # embeddings grown to fit the new tokens
    all_ids = torch.arange(len(tok))
    emb_before = model.get_input_embeddings()(all_ids).detach().clone()
    # 4-bit weights are frozen by construction (bitsandbytes repacks their storage on first use on CPU, so they are
    # checked for requires_grad only); every other frozen tensor, the embedding matrix included, must stay bit-equal.
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()
                     if not p.requires_grad and getattr(p, "quant_state", None) is None}
    assert any("embed_tokens" in n for n in frozen_before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    trainer = sft_trainer_class(True)(model=model, args=sft_config(s, str(tmp_path)),
                         train_dataset=Dataset.from_dict(task.train_cols),
                         eval_dataset=Dataset.from_dict(task.val_cols), processing_class=tok)
    trainer.train()
    emb_after = model.get_input_embeddings()(all_ids).detach()
    changed = (emb_after != emb_before).any(dim=1).nonzero().flatten().tolist()
    assert changed == style_ids, f"only the style rows may change, changed: {changed[:10]}"
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p.detach(), frozen_before[n]), f"frozen {n} changed"


@pytest.mark.slow
def test_export_reload_round_trips_style_tokens_and_separation(style_settings, tmp_path):
    from search.export import export
    from trainables.sft import train
    from trainables.tasks import load_for_inference
    from trainables.style import StyleFormatter, load_style_splits

    reports = []

    def report(metrics, ckpt):
        if ckpt:
            dst = tmp_path / f"ckpt-{metrics['step']}"
            shutil.copytree(ckpt, dst)
            reports.append((metrics, dst))

    train(style_settings, report)
    metrics, ckpt = reports[-1]
    out = export(ckpt, tmp_path / "export", merge=False)
    settings, tok, model = load_for_inference(out)  # base from its own dir; tokenizer and adapter from the export
    assert [tok.convert_tokens_to_ids(t) for t in STYLE_TOKENS.values()] == [len(tok) - 2, len(tok) - 1]
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    st = settings.style
    ev = StyleEvaluator(model, StyleFormatter(tok, st), Decoding(max_new_tokens=st.max_new_tokens),
                        batch_size=settings.eval.batch_size)
    again = ev.evaluate(load_style_splits(st).val[: st.eval_questions])
    assert again[M.SEPARATION] == pytest.approx(metrics[M.SEPARATION], rel=1e-6)
    assert again[M.TERSE_F1] == pytest.approx(metrics[M.TERSE_F1], abs=1e-9)
    assert again["val_len_verbose"] == pytest.approx(metrics["val_len_verbose"])


@pytest.mark.parametrize("extra, message", [
    (["--set", "trial.style.path=no-such-squad.json"], "no-such-squad.json: style data file not found"),
    (["--set", "objective.metric=val_f1"], "objective.metric 'val_f1' is not reported by task 'style'"),
    (["--set", "objective.metric=val_separation_at_floor"], "needs a floor: set trial.style.terse_f1_floor"),
    (["--set", "trial.style.terse_f1_floor=1.5"], "trial.style.terse_f1_floor: Input should be less than or equal"),
    (["--set", "trial.style.context=page"], "trial.style.context"),
])
def test_bad_style_input_is_one_line_before_anything_runs(capsys, extra, message):
    from search.run import main

    code = main(["--config", "configs/style_squad.yaml", "--dry-run", *extra])
    out, err = capsys.readouterr()
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_terse_repeats_rebalance_the_training_rows(tiny_model):
    from trainables.model import load_tokenizer
    from trainables.settings import ModelSettings

    tok = load_tokenizer(ModelSettings(name_or_path=str(tiny_model)))
    add_style_tokens(tok)
    fmt = StyleFormatter(tok, StyleSettings())
    items = [QA("a", "g", "Who won?", "The Broncos won the game.", "Broncos", "The Broncos won the game.",
                ("Broncos",))]
    cols, stats = fmt.encode(items, terse_repeats=3)
    terse_id, verbose_id = tok.convert_tokens_to_ids(list(STYLE_TOKENS.values()))
    assert [terse_id in ids for ids in cols["input_ids"]] == [True, True, True, False]
    assert verbose_id in cols["input_ids"][3]
    assert stats[TERSE]["n"] == 3 and stats[VERBOSE]["n"] == 1
    # the completion is exactly the target plus the end of turn; the prompt (with the style token) is masked
    masked = [t for t, m in zip(cols["input_ids"][0], cols["completion_mask"][0]) if m]
    assert tok.decode(masked).startswith("Broncos") and terse_id not in masked
