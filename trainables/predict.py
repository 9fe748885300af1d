"""Inference for classification: `predict(texts) -> labels`, and the evaluation that training reports.

A text is classified by scoring each label's completion (the answer tokens the chat template puts after the prompt)
under the model and taking the most likely one. Only completion tokens are scored: the prompt is context, never part
of the prediction. Training-time F1 and inference F1 both come from `Classifier.predict`, so they cannot disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from trainables.data import ChatFormatter, Example
from trainables.metrics import average_precision, prf_from_counts


class Classifier:
    def __init__(self, model, formatter: ChatFormatter, batch_size: int = 64):
        self.model = model
        self.fmt = formatter
        self.batch_size = batch_size

    def label_scores(self, texts: Sequence[str]):
        """[len(texts), n_labels] tensor: summed log-probability of each label's completion tokens.

        Each prompt runs through the model once: its key/value cache is kept, and each label's completion tokens run
        on top of it (the cache cropped back to the prompt after each label). Prompts are left-padded in a batch,
        with position ids that skip the padding, so a row scores exactly as it would alone."""
        import torch

        comps = [self.fmt.completion_ids[label] for label in self.fmt.labels]
        prompts = [self.fmt.prompt_ids(text)[0] for text in texts]
        order = sorted(range(len(texts)), key=lambda i: len(prompts[i]))  # similar lengths batch together
        scores = torch.zeros(len(texts), len(comps), dtype=torch.float64)
        pad = self.fmt.tok.pad_token_id
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(order), self.batch_size):
                    rows = order[start : start + self.batch_size]
                    width = max(len(prompts[i]) for i in rows)
                    ids = torch.full((len(rows), width), pad, dtype=torch.long)
                    mask = torch.zeros((len(rows), width), dtype=torch.long)
                    for r, i in enumerate(rows):
                        ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                        mask[r, width - len(prompts[i]) :] = 1
                    positions = (mask.cumsum(1) - 1).clamp(min=0)
                    lengths = mask.sum(1, keepdim=True)
                    out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
                    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()  # predicts completion token 0
                    # transformers 5.25 names the key/value cache `cache`, in and out (`past_key_values` still works
                    # there, with a deprecation warning); a transformers without that name gets `past_key_values`
                    name = "cache" if "cache" in out else "past_key_values"
                    cache = out[name]
                    for j, c in enumerate(comps):
                        score = first[:, c[0]].double()
                        if len(c) > 1:  # completion tokens 1.. are predicted from the prompt and tokens 0..L-2
                            n = len(c) - 1
                            step_ids = torch.tensor(c[:-1]).expand(len(rows), n)
                            step_mask = torch.cat([mask, torch.ones(len(rows), n, dtype=torch.long)], dim=1)
                            step_pos = lengths + torch.arange(n)
                            logits = self.model(input_ids=step_ids.to(device), attention_mask=step_mask.to(device),
                                                position_ids=step_pos.to(device), use_cache=True,
                                                **{name: cache}).logits
                            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
                            score = score + logp[:, torch.arange(n), torch.tensor(c[1:])].double().sum(1)
                            cache.crop(-n)
                        scores[rows, j] = score
        finally:
            if was_training:
                self.model.train()
        return scores

    def predict(self, texts: Sequence[str]) -> list[str]:
        """Raw labels (keys of the label map) for `texts`."""
        if not texts:
            return []
        best = self.label_scores(texts).argmax(dim=1).tolist()
        return [self.fmt.labels[b] for b in best]

    def evaluate(self, examples: list[Example], positive: str) -> dict[str, float]:
        """Precision/recall/F1 of `positive`; `loss`: the mean negative log-likelihood per answer token of the gold
        answers (what SFT's completion-only eval loss measures); `ap`: the average precision of `positive` with the
        messages ranked by its score over the likeliest other label's. All from the same scores. Under
        torch.distributed each rank scores a shard; the sums are reduced and the rankings gathered."""
        import torch
        import torch.distributed as dist

        rank, world = 0, 1
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        shard = examples[rank::world]
        scores = self.label_scores([t for t, _ in shard])  # [0, n_labels] for an empty shard
        preds = [self.fmt.labels[b] for b in scores.argmax(dim=1).tolist()]
        gold = [self.fmt.labels.index(y) for _, y in shard]
        nll = -sum(scores[r, g].item() for r, g in enumerate(gold))
        tokens = sum(len(self.fmt.completion_ids[y]) for _, y in shard)
        tp = sum(1 for (_, y), p in zip(shard, preds) if y == positive and p == positive)
        fp = sum(1 for (_, y), p in zip(shard, preds) if y != positive and p == positive)
        fn = sum(1 for (_, y), p in zip(shard, preds) if y == positive and p != positive)
        # how much more likely the model finds the positive label than the likeliest other one, per message
        p = self.fmt.labels.index(positive)
        others = torch.cat([scores[:, :p], scores[:, p + 1 :]], dim=1)
        margins = (scores[:, p] - others.max(dim=1).values).tolist() if len(shard) and others.shape[1] else []
        is_positive = [y == positive for _, y in shard]
        if world > 1:
            sums = torch.tensor([tp, fp, fn, nll, tokens], dtype=torch.float64)
            dist.all_reduce(sums)
            tp, fp, fn, nll, tokens = sums.tolist()
            ranked: list = [None] * world
            dist.all_gather_object(ranked, (margins, is_positive))
            margins, is_positive = [m for r in ranked for m in r[0]], [y for r in ranked for y in r[1]]
        return {**prf_from_counts(tp, fp, fn), "loss": nll / tokens if tokens else float("nan"),
                "ap": average_precision(margins, is_positive) if margins else 0.0}


def load_classifier(adapter_dir: str | Path) -> Classifier:
    """A Classifier from a trial checkpoint or export directory (adapter + tokenizer + trial_settings.json)."""
    from trainables.tasks import load_for_inference

    settings, tok, model = load_for_inference(adapter_dir)
    return Classifier(model, ChatFormatter(tok, settings.data), batch_size=settings.eval.batch_size)


def predict(texts: Sequence[str], adapter_dir: str | Path) -> list[str]:
    """Classify `texts` with the adapter in `adapter_dir`."""
    return load_classifier(adapter_dir).predict(texts)
