"""Training steps on one thread against the same steps on a second thread of a process whose first thread also ran
torch ops: why a warm host does all its torch work on one thread (trainables/warm.py, `WarmHost._on_torch_thread`).

    python -m bench.torch_threads [--steps 20] [--rounds 3] [--out DIR]

Each thread that runs a parallel torch op gets an OpenMP team of its own (libgomp), kept while the thread lives. A
Ray threaded actor runs its calls on a pool of threads, so a warm host whose trials ran on different threads held
several teams. With more OpenMP threads than CPUs, libgomp stops spin-waiting between parallel regions, and each op
waits for its threads to wake up. The benchmark times forward + backward steps of the tiny model (4-bit + LoRA, the
search's default trial settings, batch 16) in one process, alternating the two ways, on fresh threads each round:

- one thread: a thread that is the only one to have run torch ops (what a warm host does now);
- two threads: a thread that starts after another one ran the same steps and is still alive (what it did before).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path


def _on_new_thread(fn, keep_alive: threading.Event | None = None):
    """`fn()` on a new thread; with `keep_alive`, the thread stays alive after `fn` until the event is set."""
    out: dict = {}

    def body():
        out["r"] = fn()
        if keep_alive is not None:
            keep_alive.wait()

    t = threading.Thread(target=body)
    t.start()
    if keep_alive is None:
        t.join()
    else:
        while "r" not in out and t.is_alive():
            time.sleep(0.05)
    return out["r"], t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="Timed steps per measurement.")
    ap.add_argument("--rounds", type=int, default=3, help="Measurements of each way, alternating.")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the trial's CPUs).")
    ap.add_argument("--out", type=Path, help="Directory for torch_threads.json.")
    args = ap.parse_args(argv)

    import torch

    from bench.run import trial_settings
    from trainables.model import load_peft_model
    from trainables.settings import TrialSettings

    def load():
        settings = TrialSettings.model_validate(trial_settings(args.steps, args.steps, 8))
        model = load_peft_model(settings.model, settings.lora)
        model.train()
        return model, torch.randint(0, model.config.vocab_size, (settings.optim.batch_size, 70),
                                    generator=torch.Generator().manual_seed(0))

    # The main thread runs no torch op: loading (quantization) on a thread that then exits, which frees its team.
    model, batch = _on_new_thread(load)[0]

    def steps() -> float:
        torch.set_num_threads(args.threads)
        for _ in range(2):  # warm-up: this thread's OpenMP team, oneDNN's kernels
            model(input_ids=batch, labels=batch).loss.backward()
        t = time.perf_counter()
        for _ in range(args.steps):
            model(input_ids=batch, labels=batch).loss.backward()
        return (time.perf_counter() - t) / args.steps

    one, two = [], []
    for r in range(args.rounds):
        for way in ("one", "two") if r % 2 == 0 else ("two", "one"):
            if way == "one":
                one.append(_on_new_thread(steps)[0])
            else:
                release = threading.Event()
                _, first = _on_new_thread(steps, keep_alive=release)
                two.append(_on_new_thread(steps)[0])
                release.set()
                first.join()
            print(f"round {r + 1} {way} thread(s): {(one if way == 'one' else two)[-1]:.3f} s/step", flush=True)
    result = {"steps": args.steps, "rounds": args.rounds, "torch_threads": args.threads,
              "cpus": len(os.sched_getaffinity(0)),
              "one_thread_s_per_step": [round(x, 4) for x in one],
              "two_threads_s_per_step": [round(x, 4) for x in two],
              "ratio_two_to_one": round(statistics.median(two) / statistics.median(one), 3)}
    print(f"median s/step: one thread {statistics.median(one):.3f}, a second thread beside a live first one "
          f"{statistics.median(two):.3f}: {result['ratio_two_to_one']}x")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "torch_threads.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
