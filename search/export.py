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
    p.add_argument("--verbose", action="store_true", help="Show library logs, warnings and loading bars.")
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

    from trainables.model import fit_embeddings, torch_dtype
    from trainables.settings import TrialSettings

    s = TrialSettings.model_validate(json.loads((adapter_dir / "trial_settings.json").read_text()))
    base = AutoModelForCausalLM.from_pretrained(s.model.name_or_path, dtype=torch_dtype(s.model.dtype),
                                                trust_remote_code=s.model.trust_remote_code)
    tok = AutoTokenizer.from_pretrained(str(adapter_dir))
    fit_embeddings(base, tok)  # room for added (style) tokens; their trained rows are merged in
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(dst, safe_serialization=True)
    tok.save_pretrained(dst)


def show_examples(settings, tok, model, n: int) -> None:
    """Print `n` test predictions (classification) or TERSE/VERBOSE answers (style) of a loaded export."""
    if settings.task == "style":
        from trainables.style import TERSE, VERBOSE, Decoding, StyleEvaluator, StyleFormatter, load_style_splits

        st = settings.style
        items = load_style_splits(st).test[:n]
        ev = StyleEvaluator(model, StyleFormatter(tok, st), Decoding(max_new_tokens=st.max_new_tokens))
        terse, verbose = ev.generate(items, TERSE), ev.generate(items, VERBOSE)
        for i, q in enumerate(items):
            print(f"  Q: {q.question[:90]}\n     TERSE   ({terse.lengths[i]:>2} tok) {terse.texts[i][:90]!r}  gold "
                  f"{q.golds[0]!r}\n     VERBOSE ({verbose.lengths[i]:>2} tok) {verbose.texts[i][:90]!r}")
        return
    from trainables.data import ChatFormatter, load_splits
    from trainables.predict import Classifier

    clf = Classifier(model, ChatFormatter(tok, settings.data), batch_size=settings.eval.batch_size)
    test = load_splits(settings.data, seed=settings.seed).test[:n]
    for (text, gold), pred in zip(test, clf.predict([t for t, _ in test])):
        print(f"  [{pred:>6} | gold {gold:>6}] {text[:90]}")


def main(argv=None) -> int:
    args = parse_args(argv)
    from search.progress import quiet_libraries

    quiet_libraries(args.verbose)
    try:
        summary, adapter = load_summary(args)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = export(adapter, Path(args.out), args.merge)
    print(f"exported trial {summary['best']['trial_id']} ({summary['objective']['metric']}="
          f"{summary['best']['value']:.4f}) to {out}")

    from trainables.tasks import evaluate_test, load_for_inference

    settings, tok, model = load_for_inference(out)  # what was written, not what is in memory
    show_examples(settings, tok, model, args.examples)
    m = evaluate_test(settings, tok, model)
    best = summary["best"]
    if settings.task == "style":
        print(f"test token separation of the exported adapter: {m['test_separation']:.3f} "
              f"(TERSE {m['test_len_terse']:.1f} vs VERBOSE {m['test_len_verbose']:.1f} tokens, same greedy "
              f"decoding), TERSE EM {m['test_terse_em']:.3f}, F1 {m['test_terse_f1']:.3f} on {m['test_examples']} "
              f"questions (search reported {best.get('test_separation', float('nan')):.3f})")
    else:
        print(f"test F1 of the exported adapter: {m['test_f1']:.4f} on {m['test_examples']} examples "
              f"(search reported {best.get('test_f1', float('nan')):.4f})")
    if args.merge:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(out / "merged")
        print(f"merged model: {out / 'merged'} (loads with AutoModelForCausalLM.from_pretrained, no PEFT)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
