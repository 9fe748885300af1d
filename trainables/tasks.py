"""The task types behind one interface, so the SFT loop, the search, MLflow and export treat them alike.

    task = build_task(settings, tokenizer)     # may add tokens to the tokenizer (style tokens)
    task.train_cols, task.val_cols, task.stats # SFT columns (input_ids, completion_mask) and data statistics
    model = load_peft_model(..., tokenizer, trainable_tokens=task.new_tokens)
    evaluate = task.evaluator(model)           # -> the metrics reported at each evaluation
    test_metrics(adapter_dir)                  # the held-out test metrics of a saved adapter

- classification: rank classification of label answers; objective F1 of the minority label.
- style: `<STYLE_TERSE>` / `<STYLE_VERBOSE>` prompts; objective token separation (optionally at a TERSE F1 floor).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from trainables import metrics as M
from trainables.settings import TrialSettings

log = logging.getLogger(__name__)

DTYPES_FILE = "dtypes.json"  # in a checkpoint: what the trial's `auto` dtypes resolved to where it trained

Evaluator = Callable[[], dict[str, float]]


def _flatten(prefix: str, d: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(key + "/", v))
        elif isinstance(v, (int, float)):
            out[key] = v
    return out


def encoding_stats(fmt) -> dict[str, float]:
    """How this process got its token ids: read from the preprocessing cache, or tokenized here (and how long)."""
    m = fmt.memo
    return {"from_cache": m.loaded, "tokenized": m.encoded, "tokenize_seconds": round(m.encode_seconds, 4)}


class ClassificationTask:
    new_tokens: list[str] = []
    reports_eval_loss = True  # the evaluator's label scores give the eval loss: the trainer's own pass is skipped

    def __init__(self, s: TrialSettings, tokenizer):
        from trainables.data import ChatFormatter, load_splits

        self.s = s
        self.splits = load_splits(s.data, seed=s.seed)
        self.fmt = ChatFormatter(tokenizer, s.data).use_cache(s.cache_dir)
        self.train_cols, train_len = self.fmt.encode(self.splits.train)
        self.val_cols, val_len = self.fmt.encode(self.splits.val[: s.eval.max_examples])
        self.fmt.save_cache()
        self.stats = {"counts": self.splits.counts, "lengths": {"train": train_len, "val": val_len},
                      "encoding": encoding_stats(self.fmt)}

    def report_stats(self) -> dict[str, float]:
        """Data statistics sent with the first and the last report."""
        return _flatten("data/", {"len": self.stats["lengths"], "encoding": self.stats["encoding"],
                                  "train_minority_fraction": self.stats["counts"]["oversampling"]["after"]["fraction"]})

    def evaluator(self, model) -> Evaluator:
        from trainables.predict import Classifier

        classifier = Classifier(model, self.fmt, batch_size=self.s.eval.batch_size)
        val = self.splits.val[: self.s.eval.max_examples]  # a None cap slices nothing off
        bal = self.splits.val_balanced[: self.s.eval.max_examples]
        positive = self.s.data.minority_label

        def evaluate() -> dict[str, float]:
            nat = classifier.evaluate(val, positive)
            b = classifier.evaluate(bal, positive)
            return {M.F1: nat["f1"], M.PRECISION: nat["precision"], M.RECALL: nat["recall"], M.EVAL_LOSS: nat["loss"],
                    M.AVERAGE_PRECISION: nat["ap"], M.F1_BALANCED: b["f1"], "val_bal_precision": b["precision"],
                    "val_bal_recall": b["recall"]}

        return evaluate


class StyleTask:
    reports_eval_loss = False  # generation metrics only: the trainer's eval pass gives the eval loss

    def __init__(self, s: TrialSettings, tokenizer):
        from trainables.style import STYLE_TOKENS, StyleFormatter, add_style_tokens, load_style_splits

        self.s = s
        self.new_tokens = list(STYLE_TOKENS.values())
        add_style_tokens(tokenizer)
        self.splits = load_style_splits(s.style)
        self.fmt = StyleFormatter(tokenizer, s.style).use_cache(s.cache_dir)
        self.train_cols, train_len = self.fmt.encode(self.splits.train, s.style.terse_repeats)
        self.val_items = self.splits.val[: s.style.eval_questions]
        self.val_cols, val_len = self.fmt.encode(self.val_items)
        self.fmt.save_cache()
        self.stats = {"counts": self.splits.counts, "lengths": {"train": train_len, "val": val_len},
                      "encoding": encoding_stats(self.fmt)}

    def report_stats(self) -> dict[str, float]:
        return _flatten("data/", {"len": self.stats["lengths"], "encoding": self.stats["encoding"],
                                  "train_questions": self.splits.counts["train"]})

    def evaluator(self, model) -> Evaluator:
        from trainables.style import Decoding, StyleEvaluator

        ev = StyleEvaluator(model, self.fmt, Decoding(max_new_tokens=self.s.style.max_new_tokens),
                            batch_size=self.s.eval.batch_size, floor=self.s.style.terse_f1_floor)
        return lambda: ev.evaluate(self.val_items, prefix="val")


TASKS = {"classification": ClassificationTask, "style": StyleTask}


def build_task(s: TrialSettings, tokenizer, cache: bool = True):
    """The task's data, encoded. `cache=False` ignores the preprocessing cache (encodes everything here)."""
    return TASKS[s.task](s if cache else s.model_copy(update={"cache_dir": None}), tokenizer)


def prepare_data(s: TrialSettings) -> dict[str, Any]:
    """Encode a search's data once into the preprocessing cache (`s.cache_dir`), before its trials start.

    Trials then read the token ids instead of tokenizing again. Returns what was done, for the driver to print."""
    import time

    from trainables.model import load_tokenizer

    t = time.time()
    task = build_task(s, load_tokenizer(s.model))
    return {"seconds": round(time.time() - t, 3), "inputs": len(task.fmt.memo.table),
            "encoded": task.fmt.memo.loaded == 0, "cache_dir": s.cache_dir, **task.stats["encoding"]}


def objective_metrics(task: str) -> tuple[str, ...]:
    """The metric names a task reports that a search may optimize."""
    return M.STYLE_METRICS if task == "style" else M.CLASSIFICATION_METRICS


def load_for_inference(adapter_dir: str | Path) -> tuple[TrialSettings, Any, Any]:
    """Settings, tokenizer (with any added tokens) and base + adapter, all from a checkpoint or export directory."""
    from trainables.model import load_adapter_model, load_tokenizer

    adapter_dir = Path(adapter_dir)
    settings = TrialSettings.model_validate(json.loads((adapter_dir / "trial_settings.json").read_text()))
    warn_if_dtypes_differ(adapter_dir, settings)
    tok = load_tokenizer(settings.model.model_copy(update={"name_or_path": str(adapter_dir)}))
    model = load_adapter_model(settings.model, adapter_dir, tok)
    return settings, tok, model


def warn_if_dtypes_differ(adapter_dir: Path, settings: TrialSettings) -> None:
    """Warn when this device resolves the adapter's `auto` dtypes differently from the device it trained on (bf16 on
    a GPU, fp32 on a CPU without native bf16): its metrics then differ slightly from those it reported in training."""
    from trainables.model import resolved_dtypes

    path = adapter_dir / DTYPES_FILE
    if not path.exists():  # saved before the file existed
        return
    trained, here = json.loads(path.read_text()), resolved_dtypes(settings.model)
    if trained == here:
        return
    fix = [f'"dtype": "{trained["compute"]}"']
    if settings.model.quantization == "4bit":
        fix.append(f'"unquantized_dtype": "{"float32" if trained["unquantized"] == "float32" else "compute"}"')
    log.warning("%s trained with compute dtype %s and unquantized modules in %s, but on this device they load in %s "
                "and %s (the `auto` settings pick per device), so its metrics can differ slightly from those it "
                "reported in training. To load it as it trained, set %s under \"model\" in %s.",
                adapter_dir, trained["compute"], trained["unquantized"], here["compute"], here["unquantized"],
                " and ".join(fix), adapter_dir / "trial_settings.json")


def test_metrics(adapter_dir: str | Path) -> dict[str, float]:
    """Held-out test metrics of the adapter in `adapter_dir` (reloaded from disk, never from memory)."""
    return evaluate_test(*load_for_inference(adapter_dir))


def evaluate_test(settings: TrialSettings, tok, model) -> dict[str, float]:
    """Held-out test metrics of a loaded adapter model (from `load_for_inference`)."""
    if settings.task == "style":
        from trainables.style import Decoding, StyleEvaluator, StyleFormatter, load_style_splits

        st = settings.style
        items = load_style_splits(st).test[: st.test_questions]
        ev = StyleEvaluator(model, StyleFormatter(tok, st), Decoding(max_new_tokens=st.max_new_tokens),
                            batch_size=settings.eval.batch_size, floor=st.terse_f1_floor)
        m = ev.evaluate(items, prefix="test")
        return {k: v for k, v in m.items() if k != "test_questions"} | {"test_examples": len(items)}
    from trainables.data import ChatFormatter, load_splits
    from trainables.predict import Classifier

    clf = Classifier(model, ChatFormatter(tok, settings.data), batch_size=settings.eval.batch_size)
    test = load_splits(settings.data, seed=settings.seed).test
    r = clf.evaluate(test, settings.data.minority_label)
    return {M.TEST_F1: r["f1"], "test_precision": r["precision"], "test_recall": r["recall"],
            "test_examples": len(test)}
