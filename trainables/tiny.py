"""Build a tiny Qwen3-architecture chat model and tokenizer into a directory `from_pretrained` loads.

    python -m trainables.tiny --out .cache/tiny-qwen3            # the default used by the embedded search

The tokenizer is a byte-level BPE trained on the corpus, with a Qwen-style chat template (<|im_start|>/<|im_end|>).
The model is a random-init `Qwen3ForCausalLM`, then briefly pre-trained as a causal LM on the corpus' raw texts
(no labels). Why: LoRA on a frozen *random* base has to learn the task through random embeddings and a random
output head, which on SMS spam stalls well below the F1 of a bag-of-words baseline; a few hundred steps of plain
language-model pre-training give the frozen base features that make the adapter search meaningful, as it is for a
real pre-trained Qwen3. The corpus is the message texts of the training split only, so validation and test texts are
never seen, not even unlabeled.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BUILDER_VERSION = 1
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    vocab_size: int = 4096
    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position: int = 512
    pretrain_steps: int = 400
    pretrain_batch: int = 32
    pretrain_seq_len: int = 64
    pretrain_lr: float = 3e-3
    seed: int = 0

    def key(self, corpus_id: str) -> str:
        blob = json.dumps({"v": BUILDER_VERSION, "spec": asdict(self), "corpus": corpus_id}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE on `texts`, wrapped as a transformers fast tokenizer with a Qwen-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def _pretrain(model, tok, texts: list[str], spec: TinySpec, progress) -> list[float]:
    """Causal-LM pre-training on packed raw texts. Returns the loss curve (every 50 steps)."""
    import torch

    progress(f"tokenizing the pre-training corpus ({len(texts)} texts)")
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    stream: list[int] = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        stream += ids + [eos]
    L = spec.pretrain_seq_len
    n_chunks = len(stream) // (L + 1)
    data = torch.tensor(stream[: n_chunks * (L + 1)]).view(n_chunks, L + 1)
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.01)
    warmup = max(1, spec.pretrain_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.pretrain_steps))),
    )
    model.train()
    curve = []
    t_start = time.time()
    for step in range(spec.pretrain_steps):
        idx = torch.randint(0, n_chunks, (spec.pretrain_batch,), generator=gen)
        batch = data[idx]
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone())
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == spec.pretrain_steps - 1:
            curve.append(round(out.loss.item(), 4))
            done = time.time() - t_start
            eta = done / (step + 1) * (spec.pretrain_steps - step - 1)
            progress(f"pre-training tiny base: step {step + 1}/{spec.pretrain_steps}, loss {out.loss.item():.3f}, "
                     f"{done:.0f} s so far, ~{eta:.0f} s left")
    model.eval()
    return curve


def build_tiny_model(out_dir: str | Path, texts: list[str], spec: TinySpec = TinySpec(), progress=None) -> Path:
    """Write tokenizer + model (+ build_info.json) to `out_dir`. Deterministic given `spec.seed` and `texts`."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    progress = progress or (lambda msg: log.info(msg))
    out = Path(out_dir)
    t0 = time.time()
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    progress(f"training byte-level BPE tokenizer (vocab {spec.vocab_size}) on {len(texts)} texts")
    tok = train_tokenizer(texts, spec.vocab_size)
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=spec.max_position,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    curve = _pretrain(model, tok, texts, spec, progress) if spec.pretrain_steps > 0 else []
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")  # this process's own: never shared with another build
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    info = {
        "builder_version": BUILDER_VERSION,
        "spec": asdict(spec),
        "params": sum(p.numel() for p in model.parameters()),
        "corpus_texts": len(texts),
        "pretrain_loss_curve": curve,
        "build_seconds": round(time.time() - t0, 1),
    }
    (tmp / "build_info.json").write_text(json.dumps(info, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # atomic: a half-built model is never mistaken for a finished one
    progress(f"tiny model ({info['params']:,} params) written to {out} in {info['build_seconds']} s")
    return out


def default_corpus(data_settings=None) -> tuple[list[str], str]:
    """Message texts of the training split (before oversampling) of the given data settings, and an id for them."""
    from trainables.data import dedupe, file_fingerprint, read_examples, split
    from trainables.settings import DataSettings

    s = data_settings or DataSettings()
    splits = split(dedupe(read_examples(s)), s)
    texts = [t for t, _ in splits.train]
    corpus_id = f"{file_fingerprint(s.path)}-{s.split_seed}-{s.val_fraction}-{s.test_fraction}-{s.text_field}"
    return texts, corpus_id


# The style task's examples (context sentence + question + answer) run to ~100 tokens: pre-train on longer windows.
STYLE_SPEC = TinySpec(pretrain_seq_len=128, pretrain_batch=16)


def corpus_for(settings=None) -> tuple[list[str], str, TinySpec]:
    """The pre-training corpus and tiny spec for trial settings (or classification data settings)."""
    from trainables.settings import TrialSettings

    if isinstance(settings, TrialSettings):
        if settings.task == "style":
            from trainables.style import style_corpus

            return (*style_corpus(settings.style), STYLE_SPEC)
        settings = settings.data
    return (*default_corpus(settings), TinySpec())


def ensure_tiny_model(cache_dir: str | Path, settings=None, spec: TinySpec | None = None, progress=None) -> Path:
    """Return the cached tiny model for this corpus and spec, building it on first use.

    `settings`: TrialSettings (the task picks the corpus) or DataSettings of a classification file. One process
    builds it: another that needs the same model meanwhile (two searches started at once on a new machine) waits on
    a file lock beside it and then loads the finished one, rather than building it again and replacing the
    directory under the first one's search."""
    from filelock import FileLock, Timeout

    texts, corpus_id, task_spec = corpus_for(settings)
    spec = spec or task_spec
    path = Path(cache_dir) / f"tiny-qwen3-{spec.key(corpus_id)}"
    if (path / "build_info.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        (progress or log.info)(f"another process is building the tiny model in {path}; waiting for it")
        lock.acquire()
    try:
        if (path / "build_info.json").exists():
            return path
        return build_tiny_model(path, texts, spec, progress)
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m trainables.tiny",
        description="Build the tiny Qwen3-architecture model + tokenizer (pre-trained briefly on the corpus).",
    )
    p.add_argument("--out", required=True, help="Directory to write (replaced if it exists).")
    p.add_argument("--data", default=None, help="Data file whose training-split texts form the corpus "
                   "(default: the bundled SMS Spam Collection).")
    p.add_argument("--task", choices=["classification", "style"], default="classification",
                   help="style: pre-train on the SQuAD contexts and questions of the style task's training split.")
    p.add_argument("--seed", type=int, default=TinySpec.seed, help="Seed for tokenizer, init and pre-training.")
    p.add_argument("--pretrain-steps", type=int, default=TinySpec.pretrain_steps,
                   help="Causal-LM pre-training steps (0: random init only).")
    p.add_argument("--hidden-size", type=int, default=TinySpec.hidden_size,
                   help=f"Width of the model (default: {TinySpec.hidden_size}).")
    p.add_argument("--layers", type=int, default=TinySpec.num_layers,
                   help=f"Number of decoder layers (default: {TinySpec.num_layers}).")
    args = p.parse_args(argv)
    from trainables.settings import DataSettings, SettingsError, load_trial_settings

    try:
        if args.task == "style":
            values = {"task": "style", **({"style.path": args.data} if args.data else {})}
            texts, _, base_spec = corpus_for(load_trial_settings(values))
        else:
            texts, _, base_spec = corpus_for(DataSettings(path=args.data) if args.data else DataSettings())
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from dataclasses import replace

    spec = replace(base_spec, seed=args.seed, pretrain_steps=args.pretrain_steps, hidden_size=args.hidden_size,
                   num_layers=args.layers)
    build_tiny_model(args.out, texts, spec, progress=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
