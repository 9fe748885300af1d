"""Training throughput of the SFT loop: tokens/s and MFU for 4-bit QLoRA and bf16 LoRA, padded and padding-free, the
search's loop (`trainables.sft.train`, as a trial runs it) against a bare transformers + PEFT + TRL loop with the
same settings, on a model of Qwen3-0.6B's shape built from its config (random weights: the hub is not needed).

    python -m bench.throughput --out /tmp/tp                      # CPU: Qwen3-0.6B's shape cut to 2 layers
    python -m bench.throughput --layers 28 --steps 30 --out DIR   # a GPU: the whole Qwen3-0.6B shape

Each configuration trains in its own process (`--one`), so each loads its model fresh and its peak memory is its own.
A step is timed from one optimizer step's end to the next's (data loading, forward, backward, optimizer, logging;
the evaluation runs after the last step, outside every timed interval), after `--warmup` steps. Tokens are the
batch's real tokens (padding excluded: HF's `include_num_input_tokens_seen="non_padding"`), so padded and
padding-free runs are credited the same work.

Model FLOPs per real token (`model_flops_per_token`), the convention of PaLM's MFU with a frozen base:
  4 x frozen matmul weights (forward, and the backward to the activations; no weight gradients), LM head included
  + 6 x LoRA weights (forward, backward to activations and to the weights)
  + attention, 6 x layers x (heads x head_dim) x L per token of an example of L tokens (QK^T and AV, causal: half
    the square, forward + backward), averaged over the data's tokens.
MFU = model FLOPs per second / the device's peak dense bf16 FLOP/s (`PEAK_TFLOPS` by GPU name, or --peak-tflops).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Qwen/Qwen3-0.6B's config.json (architecture fields only).
SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    # the built-in tiny model's shape (trainables.tiny.TinySpec): a quick run of the benchmark's own path
    "tiny": dict(vocab_size=4096, hidden_size=192, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=48, max_position_embeddings=512, tie_word_embeddings=True),
}
# Dense bf16 tensor-core peaks (NVIDIA datasheets, SXM parts), TFLOP/s; matched against torch's device name.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}
CPU_LAYERS = {"qwen3-0.6b": 2}  # a shape's default cut on a CPU (--layers), where its whole depth takes too long
GRID = [(loop, quant, padding) for quant in ("4bit", "none") for padding in ("padded", "free")
        for loop in ("search", "bare")]


def frozen_matmul_params(cfg: dict[str, Any]) -> int:
    """Weights of the base's matrix multiplies per token: attention and MLP projections of every layer, and the LM
    head (a matmul even when tied to the embedding; the embedding lookup itself is not one)."""
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    return cfg["num_hidden_layers"] * per_layer + cfg["vocab_size"] * h


def model_flops_per_token(cfg: dict[str, Any], lora_params: int, lengths: list[int]) -> dict[str, float]:
    """Training FLOPs per real token (module docstring): frozen base, LoRA, attention over examples of `lengths`."""
    frozen = frozen_matmul_params(cfg)
    attn_width = cfg["num_attention_heads"] * cfg["head_dim"]
    mean_context = sum(n * n for n in lengths) / max(1, sum(lengths))  # a token's example length, token-weighted
    attention = 6 * cfg["num_hidden_layers"] * attn_width * mean_context
    return {"frozen_matmul_params": frozen, "lora_params": lora_params, "attention": attention,
            "total": 4 * frozen + 6 * lora_params + attention}


def peak_tflops(device_name: str | None, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_TFLOPS.items():
        if device_name and key in device_name:
            return value
    return None


def build_model(out: Path, shape: str, layers: int | None) -> Path:
    """A random-init model of `shape` (layers cut to `layers`) in bf16, with the built-in tiny model's kind of
    tokenizer (byte-level BPE trained on the SMS training texts, Qwen's chat template): `from_pretrained` loads it
    as it would a hub checkpoint. Cached by shape and layers."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from trainables.tiny import default_corpus, train_tokenizer

    cfg = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    path = out / f"{shape}-{cfg['num_hidden_layers']}l"
    if (path / "config.json").exists():
        return path
    texts, _ = default_corpus()
    tok = train_tokenizer(texts, 4096)
    torch.manual_seed(0)
    config = Qwen3Config(**cfg, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    tmp = path.with_name(path.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# One configuration, in its own process.


def step_timer(state: dict[str, Any], barrier: dict[str, Any] | None = None):
    """A TrainerCallback recording the (wall-clock) time and tokens seen when training begins and at every optimizer
    step's end (device synchronised). `barrier` ({"dir", "copies", "copy"}): the copies of one configuration run at
    once (--concurrent) start training together, each waiting at its start for all of them to be ready."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, st, control, model=None, **kw):
            if model is not None:  # the dtype the unquantized modules (embedding, LM head, norms) train in
                state["unquantized_dtype"] = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
                state["gradient_checkpointing"] = bool(getattr(model, "is_gradient_checkpointing", False))
            if barrier:
                wait_for_copies(Path(barrier["dir"]), barrier["copies"], barrier["copy"])
            state["marks"].append((time.time(), st.num_input_tokens_seen))

        def on_step_end(self, args, st, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            state["marks"].append((time.time(), st.num_input_tokens_seen))

        def on_log(self, args, st, control, logs=None, **kw):
            if logs and "loss" in logs:
                state["losses"].append(logs["loss"])

    return StepTimer()


def wait_for_copies(directory: Path, copies: int, copy: int, timeout: float = 900.0) -> None:
    """Mark copy `copy` ready in `directory`, then wait until all `copies` are."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"ready-{copy}").touch()
    deadline = time.time() + timeout
    while len(list(directory.glob("ready-*"))) < copies:
        if time.time() > deadline:
            raise TimeoutError(f"only {len(list(directory.glob('ready-*')))} of {copies} copies were ready to "
                               f"train after {timeout:.0f} s")
        time.sleep(0.02)


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from trainables.settings import load_trial_settings
    from trainables.sft import import_stack

    import_stack()
    on_gpu = torch.cuda.is_available()
    steps = spec["warmup"] + spec["steps"]
    s = load_trial_settings({
        "model.name_or_path": spec["model"], "model.quantization": spec["quant"],
        "model.dtype": "bfloat16" if on_gpu else "auto", "data.path": str(ROOT / "data/sms-spam/SMSSpamCollection"),
        "data.max_length": spec["max_length"], "optim.max_steps": steps, "optim.batch_size": spec["batch"],
        "optim.padding_free": spec["padding"] == "free", "eval.every_steps": steps, "eval.max_examples": 16,
        "lora.r": spec["r"], "model.gradient_checkpointing": spec.get("gradient_checkpointing", False)})
    state: dict[str, Any] = {"marks": [], "losses": []}
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    if spec["loop"] == "search":
        from trainables.sft import train

        train(s, lambda metrics, ckpt: None, checkpoints=False, callbacks=[step_timer(state, spec.get("barrier"))])
        lora_params = _lora_params(s)
    else:
        if spec["loop"] == "bare-compact":  # the bare loop with the one CPU fix the search's loop makes to TRL
            from trainables.sft import score_only_labelled_positions_on_cpu

            score_only_labelled_positions_on_cpu()
        lora_params = bare_loop(s, state, spec.get("barrier"))
    marks = state["marks"][spec["warmup"]:]  # [training's start, step 1, ...]: the timed steps' marks
    seconds = marks[-1][0] - marks[0][0]
    tokens = marks[-1][1] - marks[0][1]
    cfg = json.loads((Path(spec["model"]) / "config.json").read_text())
    flops = model_flops_per_token(cfg, lora_params, spec["lengths"])
    device = torch.cuda.get_device_name(0) if on_gpu else "cpu"
    peak = peak_tflops(device if on_gpu else None, spec.get("peak_tflops"))
    # each timed step's own time: a mean pulled up by a few long steps (a kernel compiled mid-run, say) shows as a
    # median below it
    step_times = [round(b[0] - a[0], 4) for a, b in zip(marks, marks[1:])]
    return {**{k: spec[k] for k in ("loop", "quant", "padding")}, "device": device, "timed_steps": len(marks) - 1,
            "window": [round(marks[0][0], 4), round(marks[-1][0], 4)], "threads": torch.get_num_threads(),
            **rates(int(tokens), seconds, flops["total"], peak),
            "step_seconds": round(seconds / max(1, len(marks) - 1), 4), **spread(step_times), "step_times": step_times,
            "flops_per_token": flops, "peak_tflops": peak,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
            "unquantized_dtype": state.get("unquantized_dtype"),
            "gradient_checkpointing": state.get("gradient_checkpointing"), "losses": state["losses"],
            "wall_seconds": round(time.time() - t0, 1)}


def rates(tokens: int, seconds: float, flops_per_token: float, peak: float | None) -> dict[str, Any]:
    """Real tokens/s over a timed window, and the model TFLOP/s and MFU (against `peak` TFLOP/s) they make."""
    tps = tokens / seconds if seconds > 0 else None
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": tps and round(tps, 1),
            "model_tflops_per_s": tps and round(tps * flops_per_token / 1e12, 3),
            "mfu": round(tps * flops_per_token / (peak * 1e12), 4) if tps and peak else None}


def spread(step_times: list[float]) -> dict[str, float | None]:
    return {"median_step_seconds": round(statistics.median(step_times), 4) if step_times else None,
            "max_step_seconds": max(step_times, default=None)}


def example_lengths(model: str, max_length: int) -> list[int]:
    """Token counts of the SMS training examples as the trials encode them (chat template, cut to max_length)."""
    from trainables.model import load_tokenizer
    from trainables.settings import load_trial_settings
    from trainables.tasks import build_task

    s = load_trial_settings({"model.name_or_path": model, "data.max_length": max_length,
                             "data.path": str(ROOT / "data/sms-spam/SMSSpamCollection")})
    return [len(x) for x in build_task(s, load_tokenizer(s.model)).train_cols["input_ids"]]


def _lora_params(s) -> int:
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainables.model import lora_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(s.model.name_or_path))
    peft_model = get_peft_model(model, lora_config(s.lora))
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def bare_loop(s, state: dict[str, Any], barrier: dict[str, Any] | None = None) -> int:
    """The same settings through the libraries alone: QLoRA's usual recipe (from_pretrained with bitsandbytes nf4 +
    double quant in the compute dtype, get_peft_model, SFTTrainer), on the same encoded examples."""
    import tempfile

    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTTrainer

    from trainables.model import device_map, torch_dtype
    from trainables.sft import sft_config
    from trainables.tasks import build_task

    tok = AutoTokenizer.from_pretrained(s.model.name_or_path)
    task = build_task(s, tok)
    dtype = torch_dtype(s.model.dtype)
    quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype) if s.model.quantization == "4bit" else None)
    model = AutoModelForCausalLM.from_pretrained(s.model.name_or_path, quantization_config=quant, dtype=dtype,
                                                 device_map=device_map())
    if s.model.gradient_checkpointing:  # the usual recipe's (prepare_model_for_kbit_training's) way
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=s.lora.r, lora_alpha=s.lora.alpha, lora_dropout=s.lora.dropout,
                                             target_modules=s.lora.target_modules, task_type="CAUSAL_LM"))
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory(prefix="qlora-bare-") as tmp:
        args = sft_config(s, tmp)
        args.eval_strategy = "no"
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict(task.train_cols),
                             processing_class=tok, callbacks=[step_timer(state, barrier)])
        trainer.train()
    return lora_params


# ---------------------------------------------------------------------------------------------------------------
# The grid, the report.


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# SFT loop throughput, {report['started']}", "",
             f"Device: {m['device']}; {m['cpus']} CPUs ({m['cpu']}). Model: {report['shape']} shape, "
             f"{report['layers']} layers, random weights, LoRA r={report['settings']['r']} on all linear layers; "
             f"batch {report['settings']['batch']} SMS Spam chat examples (mean {report['mean_length']:.1f} tokens, "
             f"max {report['settings']['max_length']}); {report['settings']['steps']} timed steps after "
             f"{report['settings']['warmup']} warm-up"
             f"{'; gradient checkpointing' if report['settings'].get('gradient_checkpointing') else ''}"
             f"{_concurrent(report['settings'].get('concurrent', 1))}. "
             f"Command: `{report['command']}`, {report['wall_seconds']} s.",
             "", "| loop | base | batches | unquantized modules | real tokens/s | s/step (median, max) | "
             "model TFLOP/s | MFU | peak GPU memory (GiB) | round |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['loop']} | {r['quant']} | {r['padding']} | | failed: {r['error'][:80]} | | | | | "
                         f"{r.get('round', 1)} |")
            continue
        spread = f" ({r['median_step_seconds']}, {r['max_step_seconds']})" if r.get("median_step_seconds") else ""
        lines.append(f"| {r['loop']} | {'4-bit nf4' if r['quant'] == '4bit' else 'bf16'} | {r['padding']} | "
                     f"{r.get('unquantized_dtype') or ''} | "
                     f"{r['tokens_per_s']} | {r['step_seconds']}{spread} | {r['model_tflops_per_s']} | "
                     f"{_pct(r['mfu'])} | "
                     f"{'' if r['peak_memory_gib'] is None else r['peak_memory_gib']} | {r.get('round', 1)} |")
    rounds = report["settings"].get("rounds", 1)
    lines += ["", "Ratios (same base and batches" + (f"; medians of real tokens/s over {rounds} rounds, every other "
              "one in reverse order" if rounds > 1 else "") + "): " + "; ".join(report["ratios"]) + ".", ""]
    return "\n".join(lines)


def _concurrent(n: int) -> str:
    return (f"; {n} copies of each configuration at once, started together (tokens/s, MFU and peak memory: all "
            "copies together)") if n > 1 else ""


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def ratios(runs: list[dict[str, Any]]) -> list[str]:
    seen: dict[tuple, list[float]] = {}
    for r in runs:
        if r.get("tokens_per_s"):
            seen.setdefault((r["loop"], r["quant"], r["padding"]), []).append(r["tokens_per_s"])
    by = {k: statistics.median(v) for k, v in seen.items()}  # a configuration run in several rounds: its median
    out = []
    for quant in ("4bit", "none"):
        for padding in ("padded", "free"):
            for bare in ("bare", "bare-compact"):
                a, b = by.get(("search", quant, padding)), by.get((bare, quant, padding))
                if a and b:
                    out.append(f"search/{bare} {quant} {padding} {a / b:.2f}")
        for loop in ("search", "bare", "bare-compact"):
            a, b = by.get((loop, quant, "free")), by.get((loop, quant, "padded"))
            if a and b:
                out.append(f"padding-free/padded {loop} {quant} {a / b:.2f}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / time.strftime("throughput-%Y%m%d-%H%M%S"))
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    ap.add_argument("--layers", type=int, default=None, help="Decoder layers (default: the shape's own; on a CPU, "
                    f"{CPU_LAYERS}).")
    ap.add_argument("--steps", type=int, default=6, help="Timed optimizer steps per configuration.")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--only", nargs="+", metavar="LOOP:BASE:BATCHES", help="Configurations to run, e.g. "
                    "search:4bit:free bare:none:padded (default: all 8). LOOP bare-compact: the bare loop with TRL's "
                    "LM head scoring only the labelled positions on a CPU too (trainables.sft."
                    "score_only_labelled_positions_on_cpu), the one CPU fix the search's loop makes to TRL.")
    ap.add_argument("--peak-tflops", type=float, help="The device's peak dense bf16 TFLOP/s, for MFU on a device "
                    f"not in {sorted(PEAK_TFLOPS)} (a CPU, say).")
    ap.add_argument("--model-cache", type=Path, default=ROOT / ".cache" / "throughput")
    ap.add_argument("--config-timeout", type=float, default=None, help="Seconds one configuration may take before "
                    "it is stopped and recorded as failed (default: no limit).")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="Both loops recompute activations in the "
                    "backward pass (trial.model.gradient_checkpointing).")
    ap.add_argument("--concurrent", type=int, default=1, help="Run this many copies of each configuration at once, "
                    "as that many trials sharing one device would (resources.gpus_per_worker 1/N), started together; "
                    "tokens/s and MFU are then all copies' together, peak memory their sum.")
    ap.add_argument("--rounds", type=int, default=1, help="Run the grid this many times, every other round in "
                    "reverse order, so that each loop of a pair runs both first and second (a cold kernel cache or "
                    "a device warming up then counts against both); the ratios compare medians over the rounds.")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration's JSON spec; prints its result
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, not {args.rounds}")
    if args.concurrent < 1:
        ap.error(f"--concurrent must be at least 1, not {args.concurrent}")
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return 0

    import torch

    from bench.run import machine

    t0 = time.time()
    on_gpu = torch.cuda.is_available()
    layers = args.layers or (None if on_gpu else CPU_LAYERS.get(args.shape))
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"building the {args.shape} model ({layers or 'all'} layers) under {args.model_cache}", flush=True)
    model = build_model(args.model_cache, args.shape, layers)
    grid = [tuple(x.split(":")) for x in args.only] if args.only else GRID
    order = [(i + 1, c) for i in range(args.rounds) for c in (grid if i % 2 == 0 else grid[::-1])]
    cfg = json.loads((model / "config.json").read_text())
    lengths = example_lengths(str(model), args.max_length)  # once: every configuration's FLOPs per token need them
    head = {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
            "command": "python -m bench.throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": {**machine(), "device": torch.cuda.get_device_name(0) if on_gpu else "CPU"},
            "shape": args.shape, "layers": cfg["num_hidden_layers"], "model": _rel(model), "settings": {
                k: getattr(args, k) for k in ("steps", "warmup", "batch", "max_length", "r", "peak_tflops", "rounds",
                                              "gradient_checkpointing", "concurrent")},
            "mean_length": _mean(lengths)}
    runs: list[dict[str, Any]] = []

    def write() -> dict[str, Any]:  # after every configuration: a run cut short keeps the ones it finished
        report = {**head, "runs": runs, "ratios": ratios(runs), "finished": len(runs) == len(order),
                  "wall_seconds": round(time.time() - t0, 1)}
        (args.out / "throughput.json").write_text(json.dumps(report, indent=2))
        (args.out / "throughput.md").write_text(markdown(report))
        return report

    for round_, (loop, quant, padding) in order:
        spec = {"model": str(model), "loop": loop, "quant": quant, "padding": padding, "steps": args.steps,
                "warmup": args.warmup, "batch": args.batch, "max_length": args.max_length, "r": args.r,
                "peak_tflops": args.peak_tflops,
                "gradient_checkpointing": args.gradient_checkpointing, "lengths": lengths}
        print(f"[{time.strftime('%H:%M:%S')}] {loop} loop, {quant}, {padding}"
              + (f", round {round_}/{args.rounds}" if args.rounds > 1 else "") + " ...", flush=True)
        results, error = run_copies(spec, args.concurrent, args.config_timeout)
        if error is not None:
            lines = error.strip().splitlines() or ["no output"]
            runs.append({"loop": loop, "quant": quant, "padding": padding, "round": round_, "error": lines[-1]})
            print(f"  failed: {lines[-1]}", flush=True)
            print("\n".join(lines[-15:]), file=sys.stderr, flush=True)
        else:
            r = {**combine(results), "round": round_}
            runs.append(r)
            print(f"  {r['tokens_per_s']} tokens/s, {r['step_seconds']} s/step"
                  + (f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""), flush=True)
        report = write()
    print(markdown(report))
    print(f"written: {args.out / 'throughput.json'}, {args.out / 'throughput.md'}")
    return 0 if all("error" not in r for r in runs) else 1


def run_copies(spec: dict[str, Any], copies: int, timeout: float | None) -> tuple[list[dict[str, Any]], str | None]:
    """Run `copies` processes of one configuration at once (each `--one`), started together at training's start;
    their results, or the output of the first that failed (the others are stopped then: they would wait for it)."""
    import tempfile

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if copies > 1:  # the machine's CPUs shared out, as Ray gives each trial its own (OMP_NUM_THREADS)
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // copies))
    with tempfile.TemporaryDirectory(prefix="qlora-throughput-") as tmp:
        procs, logs = [], []
        for i in range(copies):
            one = {**spec, "barrier": {"dir": f"{tmp}/barrier", "copies": copies, "copy": i}} if copies > 1 else spec
            logs.append((Path(tmp) / f"out-{i}", Path(tmp) / f"err-{i}"))
            with open(logs[-1][0], "w") as out, open(logs[-1][1], "w") as err:
                procs.append(subprocess.Popen([sys.executable, "-m", "bench.throughput", "--one", json.dumps(one)],
                                              cwd=ROOT, stdout=out, stderr=err, text=True, env=env))
        deadline = None if timeout is None else time.time() + timeout
        failed, timed_out = None, False
        while any(proc.poll() is None for proc in procs):
            failed = next((i for i, proc in enumerate(procs) if proc.returncode not in (None, 0)), None)
            timed_out = deadline is not None and time.time() > deadline
            if failed is not None or timed_out:
                for proc in procs:
                    proc.kill()
                    proc.wait()
                break
            time.sleep(0.1)
        outputs = [(out.read_text(), err.read_text()) for out, err in logs]
    results, error = [], None
    for i, (proc, (out, err)) in enumerate(zip(procs, outputs)):
        found = [line[7:] for line in out.splitlines() if line.startswith("RESULT ")]
        if found and proc.returncode == 0:
            results.append(json.loads(found[-1]))
        elif error is None and (failed is None or i == failed):
            error = (err or out) + (f"\ntimed out after {timeout} s" if timed_out else "")
    return results, error if len(results) < copies else None


def combine(copies: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's figures from its copies run at once: all their timed tokens over the span from the first
    copy's timed start to the last one's end (a lower bound where the windows do not quite coincide), per-step times
    pooled, peak memory summed (the copies share the device)."""
    if len(copies) == 1:
        return {**copies[0], "concurrent": 1}
    first = copies[0]
    seconds = max(c["window"][1] for c in copies) - min(c["window"][0] for c in copies)
    memory = [c["peak_memory_gib"] for c in copies]
    return {**{k: first[k] for k in ("loop", "quant", "padding", "device", "timed_steps", "flops_per_token",
                                      "peak_tflops", "unquantized_dtype", "gradient_checkpointing", "threads")},
            "concurrent": len(copies),
            **rates(sum(c["tokens"] for c in copies), seconds, first["flops_per_token"]["total"], first["peak_tflops"]),
            "step_seconds": round(statistics.mean(c["step_seconds"] for c in copies), 4),
            **spread([x for c in copies for x in c["step_times"]]),
            "peak_memory_gib": None if None in memory else round(sum(memory), 2), "copies": copies}


def _rel(path: Path) -> str:
    """`path` relative to the repository where it lies inside it: no machine's paths in a report."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _mean(xs: list[int]) -> float:
    return sum(xs) / max(1, len(xs))


if __name__ == "__main__":
    sys.exit(main())
