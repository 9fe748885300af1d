"""Pure builders from settings to library objects, and the model/tokenizer loader."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from trainables.settings import LoraSettings, ModelSettings, SettingsError

log = logging.getLogger(__name__)


def auto_dtype() -> str:
    """bfloat16 where this process's device computes it natively, else float32.

    A CUDA GPU with bf16 support, or a CPU whose oneDNN has bf16 kernels (AVX-512 or AMX), computes in bf16 as QLoRA
    does. On an AVX2-only CPU, PyTorch emulates bf16 matmuls: 1.5 GFLOP/s against 48 GFLOP/s in fp32 on the 2-core
    machine of bench/README.md, which made a tiny-model training step 2.3x slower than fp32.
    """
    import torch

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def torch_dtype(name: str):
    """The torch dtype of a `model.dtype` setting, resolving "auto" for the device of this process."""
    import torch

    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[auto_dtype() if name == "auto" else name]


def unquantized_load_dtype(m: ModelSettings):
    """The `from_pretrained` dtype: with 4-bit, that of the modules left unquantized (`model.unquantized_dtype`:
    fp32 as QLoRA keeps them, or the compute dtype; auto: the compute dtype on a GPU, fp32 on a CPU); else the
    model's dtype."""
    import torch

    if m.quantization == "4bit":
        choice = m.unquantized_dtype
        if choice == "auto":
            choice = "compute" if torch.cuda.is_available() else "float32"
        if choice == "float32":
            return torch.float32
    return torch_dtype(m.dtype)


def resolved_dtypes(m: ModelSettings) -> dict[str, str]:
    """What `model.dtype` and `model.unquantized_dtype` resolve to on this device: the compute dtype and the load
    dtype of the modules 4-bit leaves unquantized (the model's dtype without 4-bit)."""
    return {"compute": str(torch_dtype(m.dtype)).removeprefix("torch."),
            "unquantized": str(unquantized_load_dtype(m)).removeprefix("torch.")}


def bnb_config(m: ModelSettings):
    """nf4 + double quant with bf16 (or fp32) compute, or None when quantization is off."""
    if m.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype(m.dtype),
    )


def lora_config(lo: LoraSettings, trainable_token_ids: list[int] | None = None):
    """LoRA on the chosen modules; `trainable_token_ids` also trains those rows of the input embedding (and of a tied
    output head) through PEFT's TrainableTokens, leaving every other row frozen."""
    from peft import LoraConfig

    return LoraConfig(
        trainable_token_indices=list(trainable_token_ids) if trainable_token_ids else None,
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=lo.target_modules,
        use_rslora=lo.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def device_map():
    """Each process puts the whole model on its own device: its local GPU under Ray Train / torchrun, else CPU."""
    import torch

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def limit_gpu_memory(share: float) -> None:
    """Hold this process to `share` of its GPU's memory (`resources.gpus_per_worker`): Ray schedules fractions of a
    GPU but does not enforce them, so without a limit a trial that outgrows its share takes memory from the trials
    beside it, and whichever allocates next runs out. With it, the trial that needs more runs out itself. A share of
    1 or more lifts the limit (a warm host may have held a smaller share before); no GPU, nothing to do."""
    import torch

    if share > 0 and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(min(share, 1.0), int(os.environ.get("LOCAL_RANK", 0)))


def check_model_source(m: ModelSettings) -> None:
    """Fail early on a local model directory that is missing or lacks a tokenizer."""
    p = Path(m.name_or_path).expanduser()
    looks_local = p.is_absolute() or m.name_or_path.startswith((".", "~")) or p.exists()
    if not looks_local:
        return  # a hub id; resolved by from_pretrained
    if not p.is_dir():
        raise SettingsError(f"model.name_or_path: directory {m.name_or_path} does not exist")
    if not (p / "config.json").exists():
        raise SettingsError(f"model.name_or_path: {m.name_or_path} has no config.json; point it at a model directory")
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise SettingsError(f"model.name_or_path: {m.name_or_path} has no tokenizer files; save the tokenizer there")


def load_tokenizer(m: ModelSettings):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def fit_embeddings(model, tokenizer) -> bool:
    """Grow the embedding matrix when the tokenizer has more tokens than it has rows (new special tokens).

    Never shrinks: Qwen3 checkpoints carry spare rows beyond their tokenizer, and added tokens land in those."""
    if tokenizer is None or len(tokenizer) <= model.get_input_embeddings().weight.shape[0]:
        return False
    model.resize_token_embeddings(len(tokenizer))
    return True


def load_base_model(m: ModelSettings, tokenizer=None):
    """The frozen base: 4-bit nf4 through bitsandbytes, or bf16/fp32; embeddings grown to fit `tokenizer`."""
    from transformers import AutoModelForCausalLM

    # With 4-bit, the modules left unquantized (embeddings, norms, head) are in `unquantized_load_dtype`; the same
    # load is used for training and inference, so both compute identical numbers.
    model = AutoModelForCausalLM.from_pretrained(
        m.name_or_path,
        quantization_config=bnb_config(m),
        dtype=unquantized_load_dtype(m),
        device_map=device_map(),
        trust_remote_code=m.trust_remote_code,
    )
    model.config.use_cache = False
    keep_4bit_layers_differentiable(model)
    if m.dtype == "auto":
        log.info("model.dtype auto: %s on this device", auto_dtype())
    fit_embeddings(model, tokenizer)
    return model


def keep_4bit_layers_differentiable(model) -> int:
    """Turn off bitsandbytes' CPU inference packing on every 4-bit layer; returns how many layers it touched.

    On a CPU with AVX512-BF16, a bitsandbytes `Linear4bit` that runs a forward in eval mode without gradients (an
    evaluation during training) repacks its weight into an inference layout, for good, and from then on multiplies
    through `gemv_4bit`, which has no autograd formula. Training after the first evaluation then got no gradient
    through the frozen base layers: every adapter below the last layer was updated with a gradient that missed the
    network above it (tiny model: layer 0's LoRA gradients off by their own size; loss unchanged). Unpacked, the
    layers dequantize and multiply as in training, which here was also faster for evaluation (64 messages: 1.4 s
    against 2.0 s, the packed kernel's fast path needs the `kernels` hub package), and training and inference
    compute the same numbers.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_peft_model(m: ModelSettings, lo: LoraSettings, tokenizer=None, trainable_tokens: list[str] | None = None):
    """Base + fresh LoRA adapters. Only the adapters (and the rows of `trainable_tokens`, if any) are trainable."""
    from peft import get_peft_model

    model = load_base_model(m, tokenizer)
    for p in model.parameters():
        p.requires_grad_(False)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    token_ids = tokenizer.convert_tokens_to_ids(trainable_tokens) if trainable_tokens else None
    return get_peft_model(model, lora_config(lo, token_ids))


def load_adapter_model(m: ModelSettings, adapter_dir: str | Path, tokenizer=None):
    """Base loaded exactly as for training (embeddings grown to the adapter's tokenizer), plus the adapter, in eval
    mode."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base_model(m, tokenizer), str(adapter_dir))
    model.eval()
    return model
