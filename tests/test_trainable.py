"""The QLoRA SFT loop on the tiny model with real bitsandbytes 4-bit, PEFT and TRL, no Ray."""

import json
import shutil

import pytest
import torch

from trainables import metrics as M
from trainables.data import ChatFormatter, load_splits
from trainables.model import keep_4bit_layers_differentiable, load_peft_model, load_tokenizer
from trainables.predict import load_classifier
from trainables.sft import sft_config, train
from trainables.tasks import build_task

pytestmark = pytest.mark.slow


def test_only_completion_tokens_count_in_the_loss(fast_settings, tmp_path):
    from datasets import Dataset
    from trl import SFTTrainer

    s = fast_settings
    tok = load_tokenizer(s.model)
    task = build_task(s, tok)
    splits, fmt, stats = task.splits, task.fmt, task.stats
    trainer = SFTTrainer(model=load_peft_model(s.model, s.lora), args=sft_config(s, str(tmp_path)),
                         train_dataset=Dataset.from_dict(task.train_cols),
                         eval_dataset=Dataset.from_dict(task.val_cols),
                         processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    for row, (text, label) in enumerate(splits.train[:8]):
        unmasked = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert unmasked == fmt.completion_ids[label]  # exactly the answer + <|im_end|>\n, nothing of the prompt
        answer = tok.decode(unmasked)
        assert answer.startswith(s.data.label_map[label]) and text not in answer
    assert stats["lengths"]["train"]["n"] == len(splits.train)
    assert stats["lengths"]["train"]["max"] <= s.data.max_length


def test_fused_head_scores_only_labelled_positions_on_cpu_with_the_same_loss_and_gradients(fast_settings, tmp_path,
                                                                                           monkeypatch):
    import trl.trainer.utils as trl_utils
    from datasets import Dataset
    from trl import SFTTrainer

    from trainables.sft import score_only_labelled_positions_on_cpu

    s = fast_settings
    tok = load_tokenizer(s.model)
    task = build_task(s, tok)
    model = load_peft_model(s.model, s.lora)
    # SFTTrainer patches the model with TRL's fused LM head
    trainer = SFTTrainer(model=model, args=sft_config(s, str(tmp_path)),
                         train_dataset=Dataset.from_dict(task.train_cols),
                         eval_dataset=Dataset.from_dict(task.val_cols), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    positions = batch["labels"][:, 1:].numel()
    rows = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                        lambda hidden, *a: rows.append(hidden.shape[0]) or apply(hidden, *a))
    model.eval()  # no dropout: both passes see the same network

    def loss_and_grads():
        model.zero_grad()
        out = model(**batch, fused_lm_head=True)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    # TRL's own check (an earlier trial in this process may have patched it), restored after the test
    monkeypatch.setattr(trl_utils, "_use_triton", getattr(trl_utils._use_triton, "__wrapped__", trl_utils._use_triton))
    loss_all, grads_all = loss_and_grads()
    assert score_only_labelled_positions_on_cpu() and score_only_labelled_positions_on_cpu()  # idempotent
    loss_compact, grads_compact = loss_and_grads()
    assert rows == [positions, labelled] and labelled < positions / 5  # TRL alone scores every position on CPU
    torch.testing.assert_close(loss_compact, loss_all, rtol=1e-5, atol=1e-6)
    assert grads_all.keys() == grads_compact.keys() and any("lora_A" in n for n in grads_all)
    for name, grad in grads_all.items():
        torch.testing.assert_close(grads_compact[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_an_evaluation_leaves_the_4bit_layers_differentiable(fast_settings):
    """bitsandbytes repacks a 4-bit layer for inference on its first no-grad eval forward on an AVX512-BF16 CPU, and
    the packed layer passes no gradient back; the loader keeps them unpacked (trainables.model). Without AVX512-BF16
    bitsandbytes never packs, and the gradient comparison holds either way: the switch itself is checked first."""
    import bitsandbytes as bnb

    s = fast_settings.with_values({"lora.dropout": 0.0})
    tok = load_tokenizer(s.model)
    ids = tok(["WINNER!! claim your prize now", "see you at lunch"], return_tensors="pt", padding=True).input_ids

    def lora_grads(evaluate_first: bool):
        torch.manual_seed(0)
        model = load_peft_model(s.model, s.lora, tok)
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in layers)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero, which would leave A's gradient zero either way
                torch.nn.init.normal_(p, std=0.05)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    # where bitsandbytes would pack (on this CPU or not), the loader's switch turns it off
    model = load_peft_model(s.model, s.lora, tok)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = True
    assert keep_4bit_layers_differentiable(model) == len(layers)
    assert not any(m.support_avx512bf16_for_cpu for m in layers)

    fresh, after_eval = lora_grads(False), lora_grads(True)
    first = next(n for n in fresh if ".layers.0." in n and "lora_A" in n)
    assert fresh[first].abs().max() > 0  # layer 0 gets its gradient through every layer above it
    for name, grad in fresh.items():
        torch.testing.assert_close(after_eval[name], grad, rtol=1e-3, atol=1e-6, msg=name)


def test_truncation_keeps_the_completion(fast_settings):
    s = fast_settings
    fmt = ChatFormatter(load_tokenizer(s.model), s.data)
    cols, stats = fmt.encode([("free prize " * 200, "spam"), ("short", "ham")])
    assert stats["truncated"] == 1 and len(cols["input_ids"][0]) <= s.data.max_length
    assert cols["input_ids"][0][-len(fmt.completion_ids["spam"]):] == fmt.completion_ids["spam"]


def test_4bit_base_frozen_adapters_change_and_f1_matches_predict(fast_settings, tmp_path):
    s = fast_settings
    model = load_peft_model(s.model, s.lora)
    assert model.base_model.model.is_loaded_in_4bit
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())

    reports, ckpts = [], []

    def report(metrics, checkpoint_dir):
        reports.append(metrics)
        if checkpoint_dir:
            dst = tmp_path / f"ckpt{len(ckpts)}"
            shutil.copytree(checkpoint_dir, dst)
            ckpts.append(dst)

    base_before = {k: v.clone() for k, v in _base_state(s).items()}
    result = train(s, report)
    assert [r[M.STEP] for r in reports] == [3, 6] and len(ckpts) == 2
    for key in (M.F1, M.F1_BALANCED, M.PRECISION, M.RECALL, M.EVAL_LOSS):
        assert key in reports[-1]
    assert result["data"]["counts"]["oversampling"]["after"]["fraction"] == pytest.approx(0.3, abs=0.002)
    # sequence-length statistics and truncation counts are reported with the first and last evaluation
    assert reports[0]["data/len/train/truncated"] == result["data"]["lengths"]["train"]["truncated"]
    assert reports[-1]["data/len/train/p95"] <= s.data.max_length

    # the saved adapter differs from a fresh LoRA init; the base weights on disk are untouched
    from safetensors.torch import load_file

    trained = load_file(ckpts[-1] / "adapter_model.safetensors")
    fresh = load_peft_model(s.model, s.lora)
    fresh_sd = {k: v for k, v in fresh.state_dict().items() if "lora_" in k}
    changed = [k for k in trained if not torch.equal(trained[k], fresh_sd[_peft_key(k, fresh_sd)])]
    assert any("lora_B" in k for k in changed) and any("lora_A" in k for k in changed)
    assert all(torch.equal(v, _base_state(s)[k]) for k, v in base_before.items())

    # inference path: same adapter, same split, same function -> exactly the reported F1
    clf = load_classifier(ckpts[-1])
    splits = load_splits(s.data, seed=s.seed)
    val = splits.val[: s.eval.max_examples]
    preds = clf.predict([t for t, _ in val])
    assert M.binary_prf([y for _, y in val], preds, "spam")["f1"] == reports[-1][M.F1]
    assert json.loads((ckpts[-1] / "metrics.json").read_text())[M.F1] == reports[-1][M.F1]


def _base_state(s):
    from safetensors.torch import load_file

    return load_file(f"{s.model.name_or_path}/model.safetensors")


def _peft_key(saved_key, state):
    # saved keys drop the adapter name ("...lora_A.weight"); in-memory ones carry it ("...lora_A.default.weight")
    want = saved_key.replace(".weight", ".default.weight")
    return next(k for k in state if k.endswith(want.split("base_model.model.", 1)[-1]))


def test_resume_from_checkpoint_continues_the_step_count(fast_settings, tmp_path):
    s = fast_settings
    saved = []

    def keep(metrics, d):
        if d and metrics[M.STEP] == 3:
            shutil.copytree(d, tmp_path / "c3")
        saved.append(metrics[M.STEP])

    train(s, keep)
    resumed = []
    train(s, lambda m, d: resumed.append(m[M.STEP]), checkpoint_dir=str(tmp_path / "c3"))
    assert saved == [3, 6] and resumed == [6]


def test_eval_at_steps_reports_there_and_at_the_end(fast_settings):
    """eval.at_steps (ASHA's rungs, with scheduler.eval_at_rungs): the real loop evaluates, reports and
    checkpoints at exactly those steps and the last one, not every eval.every_steps."""
    s = fast_settings.with_values({"eval.at_steps": [1, 4], "eval.every_steps": 2})
    seen = []
    train(s, lambda m, d: seen.append((m[M.STEP], d is not None, M.F1 in m)))
    assert seen == [(1, True, True), (4, True, True), (6, True, True)]


def test_padding_free_batches_give_the_padded_loss_and_gradients(fast_settings, tmp_path):
    """optim.padding_free lays a batch's examples end to end in one row; attention must stay inside each example
    (transformers builds a block-diagonal mask from the position ids), so loss and gradients equal the padded batch's.
    """
    from datasets import Dataset

    from trainables.sft import sft_trainer_class

    s = fast_settings.with_values({"model.quantization": "none", "model.dtype": "float32"})
    tok = load_tokenizer(s.model)
    task = build_task(s, tok)
    model = load_peft_model(s.model, s.lora)
    model.eval()  # no dropout: both passes see the same network
    results = {}
    for padding_free in (False, True):
        sp = s.with_values({"optim.padding_free": padding_free})
        trainer = sft_trainer_class(False)(model=model, args=sft_config(sp, str(tmp_path / str(padding_free))),
                                           train_dataset=Dataset.from_dict(task.train_cols),
                                           eval_dataset=Dataset.from_dict(task.val_cols), processing_class=tok)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
        model.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        results[padding_free] = (batch, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                          if p.requires_grad})
    padded, free = results[False][0], results[True][0]
    lengths = padded["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # the padded batch holds padding
    assert free["input_ids"].shape == (1, int(lengths.sum())) and "attention_mask" not in free
    assert int((free["labels"] != -100).sum()) == int((padded["labels"] != -100).sum())
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-5, atol=1e-6)
    for name, grad in results[False][2].items():
        torch.testing.assert_close(results[True][2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_unquantized_modules_load_in_the_chosen_dtype_and_train(fast_settings, monkeypatch):
    """model.unquantized_dtype: with 4-bit, float32 keeps the embedding, norms and head in fp32 (auto on a CPU);
    compute loads them in model.dtype, and the loop trains that way too (finite loss, adapters move)."""
    from bitsandbytes.nn import Linear4bit

    from trainables.model import unquantized_load_dtype

    def unquantized(model):
        return {p.dtype for name, p in model.named_parameters()
                if "lora_" not in name and not isinstance(model.get_submodule(name.rsplit(".", 1)[0]), Linear4bit)}

    default = load_peft_model(fast_settings.model, fast_settings.lora)
    assert unquantized(default) == {torch.float32}
    s = fast_settings.with_values({"model.unquantized_dtype": "compute", "model.dtype": "bfloat16"})
    model = load_peft_model(s.model, s.lora)
    assert unquantized(model) == {torch.bfloat16}
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    reports, trained = [], {}

    def keep(model):
        trained.update(dtypes=unquantized(model), lora_B=[p.detach().abs().sum().item()
                                                         for n, p in model.named_parameters() if "lora_B" in n])

    train(s.with_values({"optim.max_steps": 3, "eval.every_steps": 3}), lambda m, c: reports.append(m),
          checkpoints=False, on_end=keep)
    assert trained["dtypes"] == {torch.bfloat16}
    assert all(b > 0 for b in trained["lora_B"])  # lora_B starts at zero: every adapter was updated
    loss = reports[-1]["train_loss"]
    assert loss == loss and loss < 100  # finite

    # auto is the compute dtype where a GPU is found (the GPU is mocked: none exists here), fp32 without one
    m = fast_settings.model
    assert unquantized_load_dtype(m) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert unquantized_load_dtype(m) == torch.bfloat16
    assert unquantized_load_dtype(m.model_copy(update={"unquantized_dtype": "float32"})) == torch.float32
    assert unquantized_load_dtype(m.model_copy(update={"quantization": "none", "dtype": "float32"})) == torch.float32


def test_an_adapter_loaded_where_its_auto_dtypes_resolve_differently_warns_how_to_load_it_as_trained(
        fast_settings, tmp_path, monkeypatch, caplog):
    """A checkpoint records what its `auto` dtypes resolved to where it trained; loaded on a device where they resolve
    otherwise (trained on a GPU in bf16, loaded on a CPU in fp32), it warns, naming the settings that load it as it
    trained, and those settings do."""
    import logging

    from trainables.sft import save_adapter
    from trainables.tasks import load_for_inference

    s = fast_settings
    tok = load_tokenizer(s.model)
    model = load_peft_model(s.model, s.lora, tok)
    here = tmp_path / "here"
    save_adapter(model, tok, s, here)
    with caplog.at_level(logging.WARNING, logger="trainables.tasks"):
        load_for_inference(here)
    assert not [r for r in caplog.records if "trained with" in r.getMessage()]

    gpu = tmp_path / "gpu"
    with monkeypatch.context() as mp:  # trained where a GPU resolves auto (mocked: none exists here)
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        save_adapter(model, tok, s, gpu)
    assert json.loads((gpu / "dtypes.json").read_text()) == {"compute": "bfloat16", "unquantized": "bfloat16"}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainables.tasks"):
        load_for_inference(gpu)
    (msg,) = [r.getMessage() for r in caplog.records if "trained with" in r.getMessage()]
    assert str(gpu) in msg and "unquantized modules in bfloat16" in msg and "float32" in msg
    assert '"dtype": "bfloat16" and "unquantized_dtype": "compute"' in msg

    # following the advice loads it as it trained: no warning, unquantized modules in bf16
    settings = json.loads((gpu / "trial_settings.json").read_text())
    settings["model"].update(dtype="bfloat16", unquantized_dtype="compute")
    (gpu / "trial_settings.json").write_text(json.dumps(settings))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainables.tasks"):
        _, _, loaded = load_for_inference(gpu)
    assert not [r for r in caplog.records if "trained with" in r.getMessage()]
    assert loaded.get_input_embeddings().weight.dtype == torch.bfloat16
