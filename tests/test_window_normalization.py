"""Losses normalised over the whole accumulation window (AbstractDistiller.count_window_tokens).

A token-level loss summed over a micro-batch's valid tokens and divided by the valid tokens
of the whole window makes 1 micro-batch of B equal k micro-batches of B/k, whatever the
number of valid tokens in each micro-batch (a mean per micro-batch would weight a short
micro-batch's tokens more: TRL #4719).
"""
import torch
import torch.nn.functional as F

from textbrewer import BasicDistiller, DistillationConfig, TrainingConfig
from textbrewer.testing import TinyTransformer

VOCAB, LENGTH, EXAMPLES = 12, 6, 8


def _dataset():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (EXAMPLES, LENGTH), generator=generator)
    # very different numbers of valid tokens per example: 1..6
    lengths = torch.tensor([1, 6, 2, 5, 6, 1, 3, 6])
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    return [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(EXAMPLES)]


class TokenSumDistiller(BasicDistiller):
    """Soft cross-entropy per valid token; ``per_window`` divides the micro-batch's sum by
    the window's valid tokens, otherwise by its own (a mean per micro-batch)."""

    per_window = True

    def count_window_tokens(self, batches):
        return int(sum(batch["attention_mask"].sum() for batch in batches))

    def train_on_batch(self, batch, args):
        results_S, results_T = self.run_models(batch, args)
        mask = self.runtime.to_device(batch["attention_mask"]).bool()
        per_token = -(F.softmax(results_T["logits"][0], -1)
                      * F.log_softmax(results_S["logits"][0], -1)).sum(-1)
        total = (per_token * mask).sum()
        divisor = self.window_tokens if self.per_window else mask.sum()
        return total / divisor, {}


class MicroBatchMeanDistiller(TokenSumDistiller):
    per_window = False
    count_window_tokens = BasicDistiller.count_window_tokens  # the usual path


def _adaptor(batch, outputs):
    return {"logits": outputs["logits"]}


def _train(distiller_class, batch_size, accumulation, tmp_path):
    torch.manual_seed(0)
    teacher = TinyTransformer(vocab_size=VOCAB, hidden_size=16, num_layers=1, token_level=True,
                              num_labels=VOCAB)
    student = TinyTransformer(vocab_size=VOCAB, hidden_size=8, num_layers=1, token_level=True,
                              num_labels=VOCAB)
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=batch_size)
    distiller = distiller_class(
        TrainingConfig(device="cpu", output_dir=str(tmp_path),
                       gradient_accumulation_steps=accumulation),
        DistillationConfig(), teacher, student, _adaptor, _adaptor)
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.5), loader, num_epochs=2)
    return student.state_dict()


def test_one_micro_batch_equals_k_micro_batches(tmp_path):
    whole = _train(TokenSumDistiller, 8, 1, tmp_path / "1x8")
    for batch_size, accumulation in ((4, 2), (2, 4), (1, 8)):
        split = _train(TokenSumDistiller, batch_size, accumulation,
                       tmp_path / f"{accumulation}x{batch_size}")
        for key, value in whole.items():
            torch.testing.assert_close(split[key], value, rtol=0, atol=2e-6, msg=key)


def test_a_mean_per_micro_batch_is_not_invariant(tmp_path):
    # the check above can fail: with per-micro-batch means the result depends on the split
    whole = _train(MicroBatchMeanDistiller, 8, 1, tmp_path / "1x8")
    split = _train(MicroBatchMeanDistiller, 2, 4, tmp_path / "4x2")
    difference = max(float((split[k] - whole[k]).abs().max()) for k in whole)
    assert difference > 1e-3
