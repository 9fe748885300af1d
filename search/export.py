"""Export the best adapter of a finished search, then load what was written and show predictions.

    python -m search.export --name sms-spam --out exports/sms-spam
    python -m search.export --summary runs/sms-spam/summary.json --out exports/sms-spam --merge

The export directory holds the adapter (safetensors), its config, the tokenizer and trial_settings.json; with
--merge also merged/, a full model in bf16 or fp32 with the adapter folded in, which loads without PEFT.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from trainables.settings import SettingsError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m search.export", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--summary", help="Path to a search's summary.json.")
    src.add_argument("--name", help="Search name; reads <output-dir>/<name>/summary.json.")
    p.add_argument("--output-dir", default="runs", help="Where searches live (default: runs).")
    p.add_argument("--out", required=True, help="Directory to write the export to (replaced if it exists).")
    p.add_argument("--merge", action="store_true", help="Also write merged/: base + adapter folded into one model "
                   "in the trial's dtype (bf16 or fp32), loadable with plain transformers.")
    p.add_argument("--examples", type=int, default=5, help="How many test examples to predict after export.")
    return p.parse_args(argv)


def load_summary(args) -> tuple[dict, Path]:
    path = Path(args.summary) if args.summary else Path(args.output_dir) / args.name / "summary.json"
    if not path.is_file():
        raise SettingsError(f"{path}: no summary.json; run the search first or check --name / --output-dir")
    summary = json.loads(path.read_text())
    if not summary.get("best"):
        raise SettingsError(f"{path}: the search has no best trial (every trial failed); nothing to export")
    adapter = Path(summary["best"]["adapter_dir"])
    if not (adapter / "adapter_model.safetensors").exists():
        raise SettingsError(f"{adapter}: best adapter files are missing; was the search directory moved?")
    return summary, adapter


def export(adapter_dir: Path, out: Path, merge: bool) -> Path:
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(adapter_dir, out)
    if merge:
        merge_adapter(out, out / "merged")
    return out


def merge_adapter(adapter_dir: Path, dst: Path) -> None:
    """Fold the adapter into an unquantized copy of the base (merging into 4-bit weights would lose precision)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainables.model import torch_dtype
    from trainables.settings import TrialSettings

    s = TrialSettings.model_validate(json.loads((adapter_dir / "trial_settings.json").read_text()))
    base = AutoModelForCausalLM.from_pretrained(s.model.name_or_path, dtype=torch_dtype(s.model.dtype),
                                                trust_remote_code=s.model.trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(dst, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(dst)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary, adapter = load_summary(args)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = export(adapter, Path(args.out), args.merge)
    print(f"exported trial {summary['best']['trial_id']} ({summary['objective']['metric']}="
          f"{summary['best']['value']:.4f}) to {out}")

    from search.driver import test_metrics
    from trainables.data import load_splits
    from trainables.predict import load_classifier
    from trainables.settings import TrialSettings

    clf = load_classifier(out)  # reload what was written, not what is in memory
    s = TrialSettings.model_validate(json.loads((out / "trial_settings.json").read_text()))
    test = load_splits(s.data, seed=s.seed).test[: args.examples]
    for (text, gold), pred in zip(test, clf.predict([t for t, _ in test])):
        print(f"  [{pred:>6} | gold {gold:>6}] {text[:90]}")
    m = test_metrics(str(out))
    print(f"test F1 of the exported adapter: {m['test_f1']:.4f} on {m['test_examples']} examples "
          f"(search reported {summary['best'].get('test_f1', float('nan')):.4f})")
    if args.merge:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(out / "merged")
        print(f"merged model: {out / 'merged'} (loads with AutoModelForCausalLM.from_pretrained, no PEFT)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
