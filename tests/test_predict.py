"""Label scoring with a shared prompt cache gives the scores of scoring each prompt + answer alone, in one pass."""

import pytest
import torch

from trainables.data import ChatFormatter, load_splits
from trainables.model import load_peft_model, load_tokenizer
from trainables.predict import Classifier
from trainables.settings import load_trial_settings

pytestmark = pytest.mark.slow


def alone(model, prompt: list[int], completion: list[int]) -> float:
    """Summed log-probability of `completion` after `prompt`: one unpadded sequence, full forward, no cache."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(logp[len(prompt) + k - 1, t].item() for k, t in enumerate(completion))


def give_adapters_an_effect(model, seed: int) -> None:
    """LoRA B starts at zero, which would make the adapters score nothing: draw it at random."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)


@pytest.mark.parametrize("label_map", [
    {"ham": "ham", "spam": "spam"},  # the default answers
    {"ham": "an ordinary message from a person", "spam": "spam"},  # answers of different lengths
])
def test_cached_scores_equal_scoring_each_sequence_alone(tiny_model, sms_subset, label_map):
    s = load_trial_settings({"model.name_or_path": str(tiny_model), "data.path": str(sms_subset),
                             "model.dtype": "float32", "data.label_map": label_map, "data.max_length": 96})
    tok = load_tokenizer(s.model)
    model = load_peft_model(s.model, s.lora)
    give_adapters_an_effect(model, seed=0)
    model.eval()
    fmt = ChatFormatter(tok, s.data)
    texts = [t for t, _ in load_splits(s.data, seed=0).val[:13]]
    lengths = {len(fmt.prompt_ids(t)[0]) for t in texts}
    assert len(lengths) > 3  # prompts of many lengths, so batches of 5 are left-padded
    assert all(len(c) > 1 for c in fmt.completion_ids.values())  # the cached steps run, not only the first token
    assert len({len(c) for c in fmt.completion_ids.values()}) == 2  # answers of different lengths

    got = Classifier(model, fmt, batch_size=5).label_scores(texts)

    want = torch.tensor([[alone(model, fmt.prompt_ids(t)[0], fmt.completion_ids[label]) for label in fmt.labels]
                         for t in texts], dtype=torch.float64)
    assert got.shape == (len(texts), 2)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-4)
    assert (got[:, 0] != got[:, 1]).all()  # the labels score differently, so the comparison says something


def test_eval_loss_from_label_scores_equals_the_trainers_eval_loss(fast_settings, tmp_path):
    """Classification skips the trainer's eval pass; the loss it reports instead is the one that pass computes."""
    from datasets import Dataset
    from trl import SFTTrainer

    from trainables.sft import sft_config
    from trainables.tasks import build_task

    s = fast_settings.model_copy(update={"model": fast_settings.model.model_copy(update={"dtype": "float32"})})
    tok = load_tokenizer(s.model)
    task = build_task(s, tok)
    model = load_peft_model(s.model, s.lora)
    give_adapters_an_effect(model, seed=1)
    val = task.splits.val[: s.eval.max_examples]
    assert len(val) <= s.eval.batch_size  # one eval batch: the trainer's mean is over all answer tokens at once
    trainer = SFTTrainer(model=model, args=sft_config(s, str(tmp_path)), processing_class=tok,
                         train_dataset=Dataset.from_dict(task.train_cols), eval_dataset=Dataset.from_dict(task.val_cols))
    theirs = trainer.evaluate()["eval_loss"]
    ours = task.evaluator(model)()
    assert ours["eval_loss"] == pytest.approx(theirs, rel=1e-4)
    assert ours["eval_loss"] > 0.1


def test_average_precision_ranks_messages_by_the_minority_labels_score_margin(fast_settings):
    """val_ap: the minority label's average precision, messages ranked by its score minus the other label's."""
    sklearn = pytest.importorskip("sklearn.metrics")
    from trainables.tasks import build_task

    s = fast_settings
    task = build_task(s, load_tokenizer(s.model))
    model = load_peft_model(s.model, s.lora)
    give_adapters_an_effect(model, seed=2)
    val = task.splits.val[: s.eval.max_examples]
    scores = Classifier(model, task.fmt).label_scores([t for t, _ in val])
    assert scores.shape[1] == 2
    p = task.fmt.labels.index(s.data.minority_label)
    gold = [y == s.data.minority_label for _, y in val]
    assert 0 < sum(gold) < len(gold)
    ours = task.evaluator(model)()
    assert ours["val_ap"] == pytest.approx(sklearn.average_precision_score(gold, (scores[:, p] - scores[:, 1 - p])))
    assert 0.0 < ours["val_ap"] <= 1.0
