"""The typed schema for one trial's settings. Defaults live here and nowhere else.

YAML files, `--set KEY=VALUE` overrides and the search space only supply values; this module validates them and
turns every problem into one line that names the field and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

TINY_MODEL = "builtin:tiny-qwen3"


class SettingsError(ValueError):
    """Bad user input. The message is one line that says where the problem is and what to do."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelSettings(_Strict):
    name_or_path: str = Field(
        TINY_MODEL,
        description=f"Local directory, hub id (e.g. Qwen/Qwen3-0.6B), or {TINY_MODEL!r} to build the tiny local model.",
    )
    quantization: Literal["4bit", "none"] = Field("4bit", description="4bit: nf4 + double quant via bitsandbytes.")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="Compute dtype for 4bit, load dtype for none. auto: bfloat16 where the device computes it natively "
        "(a CUDA GPU with bf16; a CPU with AVX-512 or AMX), else float32.",
    )
    unquantized_dtype: Literal["auto", "float32", "compute"] = Field(
        "auto",
        description="With 4bit, the dtype of the modules left unquantized (embeddings, norms, LM head). float32: as "
        "QLoRA keeps them. compute: model.dtype, as a plain from_pretrained(dtype=bfloat16) QLoRA recipe loads them "
        "(on an H200, Qwen3-0.6B at batch 16: 2.3 GiB less peak GPU memory, 12.26 -> 9.96 GiB; bench/README.md). "
        "auto: compute on a GPU, float32 on a CPU (where float32 was faster for the built-in tiny model).",
    )
    trust_remote_code: bool = False
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute the activations in the backward pass: less GPU memory for longer examples or larger "
        "batches, at a slower step (Qwen3-0.6B's shape, 4-bit, batch 16 on an H200: 1.58x fewer tokens/s, 8x less "
        "peak memory; bench/README.md).",
    )


class LoraSettings(_Strict):
    r: int = Field(16, gt=0, le=1024, description="LoRA rank.")
    alpha_per_rank: float = Field(2.0, gt=0, le=64, description="lora_alpha = alpha_per_rank * r.")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or a list of module names.")
    use_rslora: bool = False

    @property
    def alpha(self) -> float:
        return self.alpha_per_rank * self.r


class OptimSettings(_Strict):
    learning_rate: float = Field(5e-3, gt=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(16, gt=0, le=4096, description="Per-worker batch size.")
    grad_accum: int = Field(1, gt=0, le=1024)
    max_steps: int = Field(300, gt=0, description="Optimizer steps per trial.")
    padding_free: bool = Field(
        False, description="Train on each batch's examples laid end to end in one row, with position ids marking "
        "where each starts (TRL's padding_free), instead of padding them to the longest: no compute on padding. "
        "Attention stays within each example (flash attention where installed, else a block-diagonal mask).")


class EvalSettings(_Strict):
    every_steps: int = Field(100, gt=0, description="Evaluate and report every N optimizer steps (and at the end).")
    at_steps: list[int] | None = Field(
        None, description="Evaluate and report only at these optimizer steps and at the end, instead of every "
        "every_steps (None). search.run fills it with ASHA's rungs when scheduler.eval_at_rungs is true.")
    batch_size: int = Field(64, gt=0)
    max_examples: int | None = Field(None, gt=0, description="Cap on examples per validation view (None = all).")

    @model_validator(mode="after")
    def _check(self) -> "EvalSettings":
        if self.at_steps is not None and (not self.at_steps or min(self.at_steps) <= 0
                                          or self.at_steps != sorted(set(self.at_steps))):
            raise ValueError(f"at_steps must be increasing positive step numbers, e.g. [4, 12, 36]; got "
                             f"{self.at_steps}")
        return self

    def first_step(self) -> int:
        """The step of the first evaluation."""
        return self.at_steps[0] if self.at_steps else self.every_steps

    def steps(self, max_steps: int) -> list[int]:
        """Every step a trial of `max_steps` evaluates and reports at, the last one included."""
        at = self.at_steps or range(self.every_steps, max_steps, self.every_steps)
        return [x for x in at if x < max_steps] + [max_steps]


class DataSettings(_Strict):
    path: str = Field("data/sms-spam/SMSSpamCollection", description="JSONL, CSV or TSV file.")
    format: Literal["auto", "jsonl", "csv", "tsv"] = "auto"
    columns: list[str] | None = Field(
        ["label", "text"], description="Column names for a CSV/TSV file without a header row (None: first row)."
    )
    text_field: str = "text"
    label_field: str = "label"
    label_map: dict[str, str] = Field(
        {"ham": "ham", "spam": "spam"}, description="Raw label -> short answer string the model learns to write."
    )
    minority_label: str = Field("spam", description="Raw label whose F1 is the objective.")
    system_prompt: str = "Classify the SMS message. Answer spam or ham."
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    split_seed: int = 0
    oversample_minority: float | None = Field(
        0.3, gt=0, lt=1, description="Target minority fraction of the TRAIN split (e.g. 0.3 = 70/30); None keeps it."
    )
    max_length: int = Field(128, ge=16, le=32768, description="Max tokens per example; the message is cut to fit.")

    @model_validator(mode="after")
    def _check(self) -> "DataSettings":
        if self.minority_label not in self.label_map:
            raise ValueError(f"minority_label {self.minority_label!r} is not a key of label_map {sorted(self.label_map)}")
        if len(set(self.label_map.values())) != len(self.label_map):
            raise ValueError(f"label_map answers must be distinct, got {self.label_map}")
        if len(self.label_map) < 2:
            raise ValueError("label_map needs at least two labels")
        return self


class StyleSettings(_Strict):
    """The style-control task: TERSE/VERBOSE answers selected by a style token in the prompt (task: style)."""

    path: str = Field("data/squad-v1.1-dev/dev-v1.1.json.gz",
                      description="SQuAD v1.1-format JSON (.json or .json.gz), or a JSONL of pairs with fields "
                      "question, terse, verbose and optional context, group, answers.")
    format: Literal["auto", "squad", "jsonl"] = "auto"
    context: Literal["sentence", "paragraph", "none"] = Field(
        "sentence", description="What the prompt shows before the question: the answer's sentence, the whole "
        "paragraph, or nothing.")
    system_prompt: str = "Answer the question from the context."
    max_verbose_words: int = Field(32, ge=4, le=512, description="The VERBOSE target (and a sentence context) is cut "
                                   "to this many words around the answer.")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of questions in validation, split by group "
                                "(SQuAD article) so no paragraph is in two splits.")
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    split_seed: int = 0
    max_train_questions: int | None = Field(3000, gt=0, description="Cap on training questions (each gives a TERSE "
                                            "and a VERBOSE example); None = all.")
    eval_questions: int = Field(96, gt=0, description="Held-out questions generated for each evaluation (both styles).")
    test_questions: int = Field(256, gt=0, description="Test questions for the final evaluation of the best adapter.")
    terse_repeats: int = Field(1, ge=1, le=16, description="Copies of each TERSE example in the training split. "
                               "A VERBOSE target has ~10x the tokens of a TERSE one and dominates the loss; repeating "
                               "TERSE examples rebalances it (as oversampling does for a minority class).")
    max_new_tokens: int = Field(64, gt=0, le=4096, description="Generation budget, the same for both styles.")
    max_length: int = Field(192, ge=32, le=32768, description="Max tokens per training example; the context is cut "
                            "first, the answer last.")
    terse_f1_floor: float | None = Field(None, ge=0, le=1, description="Minimum TERSE answer F1 for the objective "
                                         "val_separation_at_floor; trials below it score < 0 and are never best.")


class TrialSettings(_Strict):
    task: Literal["classification", "style"] = "classification"
    model: ModelSettings = ModelSettings()
    lora: LoraSettings = LoraSettings()
    optim: OptimSettings = OptimSettings()
    eval: EvalSettings = EvalSettings()
    data: DataSettings = DataSettings()
    style: StyleSettings = StyleSettings()
    seed: int = 0
    output_dir: str | None = Field(None, description="Where the trainer writes scratch files (None: a temp dir).")
    cache_dir: str | None = Field(None, description="Preprocessing cache: token ids encoded once and shared by "
                                  "trials (trainables/cache.py). None: the search sets <model_cache>/data; '': off.")

    def with_values(self, values: dict[str, Any]) -> "TrialSettings":
        """Return a copy with dotted keys (`lora.r`) replaced, validated again."""
        return validate(TrialSettings, merge_dotted(self.model_dump(), values), source="trial settings")


def merge_dotted(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Deep-copy `base` and set each dotted key of `values` into it."""
    import copy

    out = copy.deepcopy(base)
    for key, value in values.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return out


def format_validation_error(err: ValidationError, source: str, model: type[BaseModel] | None = None) -> str:
    """One line per problem: `source: field.path: what is wrong (got VALUE)`; unknown keys list the known ones."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden" and model is not None:
            known = _known_keys(model, e["loc"][:-1])
            msg = f"unknown key; known keys here: {', '.join(known)}"
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        msg = msg.replace("Value error, ", "")
        lines.append(f"{source}: {loc}: {msg}")
    return "; ".join(lines)


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return sorted(model.model_fields)


def validate(model: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    """Build `model` from `data`, raising SettingsError with one clear line on any problem."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SettingsError(format_validation_error(err, source, model)) from None


def load_trial_settings(values: dict[str, Any] | None = None) -> TrialSettings:
    """Defaults overlaid with nested or dotted `values`."""
    values = values or {}
    dotted = {k: v for k, v in values.items() if "." in k}
    nested = {k: v for k, v in values.items() if "." not in k}
    return validate(TrialSettings, merge_dotted(nested, dotted), source="trial settings")


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent
