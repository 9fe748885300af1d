"""The preprocessing cache: token ids computed once per search and shared by its trials.

Tokenizing through the chat template is the same work in every trial of a search: the searched values
(oversampling ratio, TERSE repeats, LoRA and optimizer settings) only repeat or reorder examples that are already
encoded. The search driver encodes the data once before the first trial (`prepare`), and every trial reads the
result back, memory-mapped, from an Arrow file written with `datasets`.

    <cache_dir>/<fingerprint>/      one formatter: tokenizer, chat template, system prompt, max_length, task options
        data-00000-of-00001.arrow   columns key (sha1 of the encoded input), ids (int32 list), flag (truncated)

A formatter looks each input up by the hash of the input itself, so a cache can never answer for an input it was
not built from; anything missing is computed as before (a trial on a node without the cache works, just slower).
Writes go to a temporary directory that is renamed into place, so a reader never sees half a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

VERSION = 1  # bump when what a key maps to changes (the formatters' encoding code)


def digest(*parts: Any) -> str:
    return hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()


def tokenizer_identity(tok) -> dict[str, Any]:
    """What decides the ids a tokenizer gives: its source, size, added tokens, chat template and files' versions."""
    ident = {"name": getattr(tok, "name_or_path", ""), "len": len(tok), "class": type(tok).__name__,
             "added": sorted(map(str, getattr(tok, "get_added_vocab", dict)().items())),
             "template": digest(getattr(tok, "chat_template", "") or "")}
    src = Path(ident["name"])
    if src.is_dir():  # a local checkpoint: the tokenizer files' sizes and times (rebuilt model -> new cache)
        ident["files"] = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in src.glob("tokenizer*"))
    return ident


class Memo:
    """key -> (ids, flag) for one formatter, loaded from and saved to the cache directory."""

    def __init__(self, directory: Path | None):
        self.directory = directory
        self.table: dict[str, tuple[list[int], bool]] = {}
        self.loaded = 0  # entries read from disk
        self.added = 0  # entries computed in this process (not yet saved)
        self.encoded = 0  # entries computed in this process, in all
        self.encode_seconds = 0.0  # time spent computing them (tokenizing)
        if directory is not None and directory.is_dir():
            self._load()

    def _load(self) -> None:
        from datasets import load_from_disk

        try:
            ds = load_from_disk(str(self.directory))
            cols = ds.with_format("python")[:]  # keys, ids and flags as plain lists: one read of the Arrow file
        except Exception as err:  # a cache from another datasets version, or damaged: rebuilt as we go
            log.warning("preprocessing cache %s unreadable (%s); encoding from scratch", self.directory, err)
            return
        self.table = {k: (ids, bool(flag)) for k, ids, flag in zip(cols["key"], cols["ids"], cols["flag"])}
        self.loaded = len(self.table)

    def get(self, key: str, compute: Callable[[], tuple[list[int], bool]]) -> tuple[list[int], bool]:
        hit = self.table.get(key)
        if hit is None:
            t = time.perf_counter()
            hit = compute()
            self.encode_seconds += time.perf_counter() - t
            self.table[key] = hit
            self.added += 1
            self.encoded += 1
        return hit

    def save(self) -> bool:
        """Write the table if this process added to it; True if written. Atomic: temp dir, then rename."""
        if self.directory is None or not self.added:
            return False
        import datasets
        from datasets import Dataset, Features, Sequence, Value

        if not datasets.are_progress_bars_disabled():  # one "Saving the dataset" bar per trial is noise
            datasets.disable_progress_bars()
        keys = sorted(self.table)
        ds = Dataset.from_dict({"key": keys, "ids": [self.table[k][0] for k in keys],
                                "flag": [self.table[k][1] for k in keys]},
                               features=Features({"key": Value("string"), "ids": Sequence(Value("int32")),
                                                  "flag": Value("bool")}))
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.directory.parent))
        try:
            ds.save_to_disk(str(tmp))
            if self.directory.exists():  # another trial or node wrote it meanwhile; ours is as good: replace
                old = self.directory.with_name(self.directory.name + f".old-{os.getpid()}")
                os.replace(self.directory, old)
                os.replace(tmp, self.directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, self.directory)
        except OSError as err:  # a read-only or full disk costs speed, never the trial
            log.warning("preprocessing cache %s not written (%s)", self.directory, err)
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        self.added = 0
        return True


def memo_for(cache_dir: str | None, fingerprint: dict[str, Any]) -> Memo:
    """The memo of a formatter with this fingerprint under `cache_dir` (None: in memory only)."""
    if not cache_dir:
        return Memo(None)
    key = digest(VERSION, json.dumps(fingerprint, sort_keys=True, default=str))[:16]
    return Memo(Path(cache_dir).expanduser() / key)
