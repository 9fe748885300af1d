"""Inference for classification: `predict(texts) -> labels`, and the evaluation that training reports.

A text is classified by scoring each label's completion (the answer tokens the chat template puts after the prompt)
under the model and taking the most likely one. Only completion tokens are scored: the prompt is context, never part
of the prediction. Training-time F1 and inference F1 both come from `Classifier.predict`, so they cannot disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from trainables.data import ChatFormatter, Example
from trainables.metrics import prf_from_counts


class Classifier:
    def __init__(self, model, formatter: ChatFormatter, batch_size: int = 64):
        self.model = model
        self.fmt = formatter
        self.batch_size = batch_size

    def label_scores(self, texts: Sequence[str]):
        """[len(texts), n_labels] tensor: summed log-probability of each label's completion tokens."""
        import torch

        labels = self.fmt.labels
        pad = self.fmt.tok.pad_token_id
        seqs = []  # (text index, label index, prompt length, ids)
        for i, text in enumerate(texts):
            p, _ = self.fmt.prompt_ids(text)
            for j, label in enumerate(labels):
                seqs.append((i, j, len(p), p + self.fmt.completion_ids[label]))
        order = sorted(range(len(seqs)), key=lambda k: len(seqs[k][3]))  # similar lengths batch together
        scores = torch.zeros(len(texts), len(labels), dtype=torch.float64)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(order), self.batch_size):
                    batch = [seqs[k] for k in order[start : start + self.batch_size]]
                    width = max(len(s[3]) for s in batch)
                    ids = torch.full((len(batch), width), pad, dtype=torch.long)
                    mask = torch.zeros((len(batch), width), dtype=torch.long)
                    for r, (_, _, _, s) in enumerate(batch):
                        ids[r, : len(s)] = torch.tensor(s)
                        mask[r, : len(s)] = 1
                    logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                    logp = torch.log_softmax(logits.float(), dim=-1).cpu()
                    for r, (i, j, plen, s) in enumerate(batch):
                        # token t is predicted by position t-1; score only the completion tokens
                        pos = torch.arange(plen, len(s))
                        scores[i, j] = logp[r, pos - 1, torch.tensor(s[plen:])].double().sum()
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
        """Precision/recall/F1 of `positive`. Under torch.distributed each rank scores a shard and counts are summed."""
        import torch
        import torch.distributed as dist

        rank, world = 0, 1
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        shard = examples[rank::world]
        preds = self.predict([t for t, _ in shard])
        tp = sum(1 for (_, y), p in zip(shard, preds) if y == positive and p == positive)
        fp = sum(1 for (_, y), p in zip(shard, preds) if y != positive and p == positive)
        fn = sum(1 for (_, y), p in zip(shard, preds) if y == positive and p != positive)
        if world > 1:
            counts = torch.tensor([tp, fp, fn], dtype=torch.float64)
            dist.all_reduce(counts)
            tp, fp, fn = counts.tolist()
        return prf_from_counts(tp, fp, fn)


def load_classifier(adapter_dir: str | Path) -> Classifier:
    """A Classifier from a trial checkpoint or export directory (adapter + tokenizer + trial_settings.json)."""
    from trainables.tasks import load_for_inference

    settings, tok, model = load_for_inference(adapter_dir)
    return Classifier(model, ChatFormatter(tok, settings.data), batch_size=settings.eval.batch_size)


def predict(texts: Sequence[str], adapter_dir: str | Path) -> list[str]:
    """Classify `texts` with the adapter in `adapter_dir`."""
    return load_classifier(adapter_dir).predict(texts)
