"""A trial's share of a GPU on a real GPU: `trainables.model.limit_gpu_memory` holds the process to it, and the error
torch raises there is the one `trainables.ray_trainable` fails a trial on without retrying it.

    python -m bench.gpu_memory_share [--share 0.25]

Allocates 1 GiB blocks until torch refuses one, held to the share, then again with the limit lifted (share 1) up to
twice the share. Prints what it found as JSON (bench/README.md, "Third H200 run"). Needs a CUDA GPU."""

from __future__ import annotations

import argparse
import json


def fill(limit_gib: float) -> tuple[float, BaseException | None]:
    """GiB allocated in 1 GiB blocks before torch refused one (or `limit_gib` reached), and its error."""
    import torch

    blocks, error = [], None
    try:
        while len(blocks) < limit_gib:
            blocks.append(torch.empty(1024**3, dtype=torch.uint8, device="cuda"))
    except torch.OutOfMemoryError as e:
        error = e
    got = torch.cuda.memory_allocated() / 1024**3
    del blocks
    torch.cuda.empty_cache()
    return got, error


def main() -> None:
    import torch

    from trainables.model import limit_gpu_memory
    from trainables.ray_trainable import out_of_memory, out_of_memory_message
    from trainables.settings import TrialSettings

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--share", type=float, default=0.25)
    a = p.parse_args()
    total = torch.cuda.get_device_properties(0).total_memory / 1024**3
    limit_gpu_memory(a.share)
    held, error = fill(total)
    limit_gpu_memory(1.0)
    lifted, lifted_error = fill(2 * a.share * total)
    print(json.dumps({
        "device": torch.cuda.get_device_name(0), "total_gib": round(total, 2), "share": a.share,
        "share_gib": round(a.share * total, 2), "allocated_when_refused_gib": round(held, 2),
        "refused": error is not None, "classified_out_of_memory": bool(error and out_of_memory(error)),
        "torch_message": str(error).splitlines()[0][:300] if error else None,
        "trial_message": out_of_memory_message(TrialSettings(), a.share, error) if error else None,
        "lifted_allocated_gib": round(lifted, 2), "lifted_refused": lifted_error is not None,
    }, indent=1))


if __name__ == "__main__":
    main()
