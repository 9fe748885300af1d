"""The QLoRA SFT loop for one trial: plain code that takes a `report` callable and runs with or without Ray.

    report(metrics: dict, checkpoint_dir: str | None) -> None

is called every `eval.every_steps` optimizer steps (or at `eval.at_steps`) and at the last step, on every rank (Ray
Train wants all ranks to report); `checkpoint_dir` holds the adapter (safetensors), tokenizer and settings on rank 0
and is None elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from trainables import metrics as M
from trainables.model import load_peft_model, load_tokenizer, resolved_dtypes, torch_dtype
from trainables.settings import TrialSettings
from trainables.tasks import DTYPES_FILE, build_task

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any], "str | None"], None]


def sft_config(s: TrialSettings, output_dir: str):
    """TRL's SFTConfig for these settings. HF reporting integrations are off: our `report` is the only channel."""
    import torch
    from trl import SFTConfig

    on_gpu = torch.cuda.is_available()
    return SFTConfig(
        output_dir=output_dir,
        max_steps=s.optim.max_steps,
        per_device_train_batch_size=s.optim.batch_size,
        per_device_eval_batch_size=s.eval.batch_size,
        gradient_accumulation_steps=s.optim.grad_accum,
        learning_rate=s.optim.learning_rate,
        lr_scheduler_type=s.optim.lr_scheduler,
        warmup_steps=s.optim.warmup_ratio,  # a float < 1 is a ratio of max_steps
        weight_decay=s.optim.weight_decay,
        # at_steps: ReportCallback asks for the evaluations itself (Trainer evaluates when asked, whatever the
        # strategy)
        eval_strategy="no" if s.eval.at_steps else "steps",
        eval_steps=None if s.eval.at_steps else s.eval.every_steps,
        save_strategy="no",
        logging_steps=max(1, min(10, s.eval.every_steps)),
        report_to="none",
        disable_tqdm=os.environ.get("QLORA_VERBOSE") != "1",  # per-step bars only with search.run --verbose
        seed=s.seed,
        data_seed=s.seed,
        bf16=on_gpu and torch_dtype(s.model.dtype) == torch.bfloat16,
        use_cpu=not on_gpu,
        completion_only_loss=True,
        max_length=None,  # examples are already cut to data.max_length without losing the completion
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        gradient_checkpointing=False,  # handled when the model is built (model.gradient_checkpointing)
        remove_unused_columns=True,
        include_num_input_tokens_seen="non_padding",
        padding_free=s.optim.padding_free,
    )


def sft_trainer_class(trainable_tokens: bool, own_eval_loss: bool = False):
    """TRL's SFTTrainer, adapted where the task needs it.

    `trainable_tokens`: the loss comes from the model's own forward (full logits). TRL computes the loss through a
    fused LM head that multiplies by `lm_head.weight` directly. With tied embeddings, PEFT's TrainableTokens wraps the
    head too, and the fused path would bypass the new tokens' trained rows (and fails on the wrapper); the model's
    own forward applies them, at training exactly as at generation.
    `own_eval_loss`: the task's evaluator reports the eval loss itself (classification: from the label scores it
    computes anyway), so an evaluation skips the trainer's loss pass over the eval set and only runs the callbacks."""
    from transformers import Trainer
    from trl import SFTTrainer

    base = SFTTrainer
    if trainable_tokens:
        class TrainableTokensSFTTrainer(SFTTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                inputs["use_cache"] = False
                return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)

        base = TrainableTokensSFTTrainer
    if not own_eval_loss:
        return base

    class OwnEvalLossSFTTrainer(base):
        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, {})
            return {}

    return OwnEvalLossSFTTrainer


def score_only_labelled_positions_on_cpu() -> bool:
    """Make TRL's fused LM head project only the positions that carry a label on CPU, as it already does on CUDA.

    TRL's SFTTrainer computes the loss through a fused, chunked LM head (`trl.trainer.utils.add_fused_lm_head`).
    On Triton devices it scores only the positions whose label is not -100; elsewhere it scores every position, so
    that the tile shapes stay fixed for devices that recompile on a new shape (XLA). A CPU runs eagerly and never
    recompiles. With the prompt masked out of the loss, a classification example has 2-3 labelled positions out of
    ~70, and scoring all of them through a 4096-word head was a third of a CPU training step (24 steps of the tiny
    model on 1 thread: 21.1 s -> 13.6 s, same loss). The scores of the labelled positions are the same either way.

    Patches the one decision (`compact`) the fused head reads from `trl.trainer.utils._use_triton` at call time;
    the kernels keep their own check. Idempotent; returns False, and changes nothing, on a TRL without that hook.
    """
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:
        return False
    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        log.debug("TRL has no trainer.utils._use_triton: the fused LM head scores as TRL decides")
        return False
    if getattr(original, "_qlora_cpu_compact", False):
        return True

    def use_compact(device) -> bool:
        return device.type == "cpu" or original(device)

    use_compact._qlora_cpu_compact = True
    use_compact.__wrapped__ = original  # TRL's own check, for whoever needs it unpatched (a test)
    trl_utils._use_triton = use_compact
    return True


def import_stack() -> None:
    """Import the training stack now (torch, transformers, peft, trl, datasets, bitsandbytes), so that its cost is
    timed as imports and not inside the first phase that happens to need it."""
    import bitsandbytes  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401


def train(settings: TrialSettings, report: Report, checkpoint_dir: str | None = None,
          on_end: Callable[[Any], None] | None = None, checkpoints: bool = True,
          callbacks: tuple | list = ()) -> dict[str, Any]:
    """Fine-tune LoRA adapters on a (4-bit) base with TRL's SFTTrainer; returns the last metrics and data stats.

    `checkpoint_dir`: a checkpoint written by an earlier report of this trial; training resumes from it (adapter,
    optimizer, scheduler and step), so a retried trial continues its curve instead of starting over.
    `on_end`: called with the trained PEFT model before it is released (to inspect or save it).
    `checkpoints=False`: report metrics only (checkpoint_dir None), e.g. for a bare benchmark loop.
    `callbacks`: more `TrainerCallback`s (a warm host's check that the trial's Train worker still lives).
    """
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback, set_seed

    s = settings
    set_seed(s.seed)
    t0 = time.time()
    tokenizer = load_tokenizer(s.model)
    task = build_task(s, tokenizer)  # adds the task's new tokens (style tokens) to the tokenizer
    t_data = time.time() - t0
    log.info("data: %s", json.dumps(task.stats))
    model = load_peft_model(s.model, s.lora, tokenizer, trainable_tokens=task.new_tokens)
    t_model = time.time() - t0 - t_data
    evaluate = task.evaluator(model)
    last: dict[str, Any] = {}
    spent = {"eval": 0.0, "checkpoint": 0.0}  # seconds so far in evaluations and in checkpoints (save + report)

    class ReportCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= state.max_steps:
                control.should_evaluate = True  # always evaluate the final adapter
            elif s.eval.at_steps and state.global_step in s.eval.at_steps:
                control.should_evaluate = True

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            t_eval = time.time()
            losses = [h["loss"] for h in state.log_history if "loss" in h]
            scores = evaluate()
            spent["eval"] += time.time() - t_eval + (metrics or {}).get("eval_runtime", 0.0)
            out = {
                M.STEP: state.global_step,
                "epoch": round(state.epoch or 0.0, 4),
                M.EVAL_LOSS: (metrics or {}).get("eval_loss", float("nan")),
                **scores,
                "train_loss": losses[-1] if losses else float("nan"),
                "learning_rate": next((h["learning_rate"] for h in reversed(state.log_history)
                                       if "learning_rate" in h), s.optim.learning_rate),
                "eval_seconds": round(time.time() - t_eval, 3),
                "elapsed_seconds": round(time.time() - t0, 3),
                "train_tokens": state.num_input_tokens_seen,
                "data_seconds": round(t_data, 3), "model_load_seconds": round(t_model, 3),
                "tokenize_seconds": task.stats.get("encoding", {}).get("tokenize_seconds", 0.0),
                "eval_seconds_total": round(spent["eval"], 3),
                "checkpoint_seconds_total": round(spent["checkpoint"], 3),
            }
            if state.global_step == s.eval.first_step() or state.global_step >= state.max_steps:
                out.update(task.report_stats())
            last.clear()
            last.update(out)
            t_ckpt = time.time()
            if args.process_index == 0 and checkpoints:
                with tempfile.TemporaryDirectory(prefix="qlora-ckpt-") as tmp:
                    save_adapter(model, tokenizer, s, tmp, out)
                    save_train_state(trainer, tmp)
                    report(out, tmp)
            else:
                report(out, None)
            spent["checkpoint"] += time.time() - t_ckpt

    train_ds = Dataset.from_dict(task.train_cols)
    val_ds = Dataset.from_dict(task.val_cols)
    trainer_cls = sft_trainer_class(bool(task.new_tokens), own_eval_loss=task.reports_eval_loss)
    score_only_labelled_positions_on_cpu()
    with tempfile.TemporaryDirectory(prefix="qlora-sft-") as scratch:
        trainer = trainer_cls(
            model=model,
            args=sft_config(s, s.output_dir or scratch),
            train_dataset=train_ds,
            eval_dataset=val_ds,
            processing_class=tokenizer,
            callbacks=[ReportCallback(), *callbacks],
        )
        trainer.train(resume_from_checkpoint=checkpoint_dir)
        if on_end is not None:
            on_end(model)
    result = dict(last)
    result["data"] = task.stats
    result["wall_seconds"] = round(time.time() - t0, 3)
    del trainer
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return result


def save_adapter(model, tokenizer, settings: TrialSettings, out_dir: str | Path, metrics: dict | None = None) -> None:
    """Adapter weights (safetensors) + config, tokenizer, and the trial settings needed to reload it."""
    out = Path(out_dir)
    # Added tokens' rows travel in the TrainableTokens weights; the full embedding matrix is never copied.
    model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
    tokenizer.save_pretrained(out)
    (out / "trial_settings.json").write_text(settings.model_dump_json(indent=2))
    # `auto` settings resolve per device: what they were here, for a load elsewhere to compare (tasks.DTYPES_FILE)
    (out / DTYPES_FILE).write_text(json.dumps(resolved_dtypes(settings.model), indent=2))
    if metrics is not None:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


def save_train_state(trainer, out_dir: str | Path) -> None:
    """What HF's `resume_from_checkpoint` needs beside the adapter: optimizer, scheduler and trainer state.

    Tensors only: they load back with `torch.load(weights_only=True)`."""
    import torch

    out = Path(out_dir)
    torch.save(trainer.optimizer.state_dict(), out / "optimizer.pt")
    torch.save(trainer.lr_scheduler.state_dict(), out / "scheduler.pt")
    trainer.state.save_to_json(str(out / "trainer_state.json"))
