"""CausalLMDistiller and Seq2SeqLMDistiller: values, shift, paths, normalisation, vocabularies,
teacher cache, on-policy generation, encoder-decoder models. Tiny models built from configs."""

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import (BartConfig, BartForConditionalGeneration, GPT2Config,  # noqa: E402
                          GPT2LMHeadModel, T5Config, T5ForConditionalGeneration)

from textbrewer import DistillationConfig, TrainingConfig  # noqa: E402
from textbrewer.cache import (CachedTeacherCollator, IndexedDataset, TeacherCache,  # noqa: E402
                              write_teacher_cache)
from textbrewer.distillers import (CausalLMDistiller, LMDistillationConfig,  # noqa: E402
                                   Seq2SeqLMDistiller)
from textbrewer.losses.token import token_distillation_loss  # noqa: E402

transformers.utils.logging.set_verbosity_error()
VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def gpt2(n_layer=1, n_embd=16, vocab=VOCAB, seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=vocab,
                                      n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, bos_token_id=0, eos_token_id=1))


def examples(count=8, seed=0, prompt=2):
    """Uneven lengths (2..7), labels -100 on the first ``prompt`` tokens."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [7, 2, 5, 3, 7, 4, 6, 2, 5, 3][:count]
    result = []
    for length in lengths:
        ids = torch.randint(2, VOCAB, (length,), generator=generator)
        labels = ids.clone()
        labels[:min(prompt, length - 1)] = -100
        result.append({"input_ids": ids, "labels": labels})
    return result


def collate(items):
    from textbrewer.cache import pad_collate
    return pad_collate(items)


def distiller(teacher, student, tmp_path, lm=None, accumulation=1, **distill):
    distill.setdefault("temperature", 1.0)
    return CausalLMDistiller(
        TrainingConfig(device="cpu", output_dir=str(tmp_path),
                       gradient_accumulation_steps=accumulation),
        DistillationConfig(**distill), teacher, student, lm_config=lm or LMDistillationConfig())


# ------------------------------------------------------------------------------ config
def test_config_round_trip_and_validation():
    config = LMDistillationConfig(divergence="jsd", beta=0.3, path="fused", lmbda=0.5, top_k=5)
    assert LMDistillationConfig.from_dict(config.to_dict()) == config
    for bad, word in ((dict(divergence="kl"), "divergence"), (dict(path="fast"), "path"),
                      (dict(beta=2), "beta"), (dict(lmbda=-0.1), "lmbda"),
                      (dict(chunk_size=0), "chunk_size"), (dict(top_p=0), "top_p"),
                      (dict(divergence="topk_kl"), "topk"),
                      (dict(vocab_alignment="zeros"), "vocab_alignment")):
        with pytest.raises(ValueError, match=word):
            LMDistillationConfig(**bad)


# ------------------------------------------------------------------------------ values
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_loss_equals_hand_computation_and_paths_agree(tmp_path, divergence):
    teacher, student = gpt2(2, 32, seed=1), gpt2(1, 16, seed=2)
    batch = collate(examples(4))
    batch["labels"][0, 3] = -100  # a hole inside a row
    results = {}
    for path in ("dense", "chunked", "fused"):
        lm = LMDistillationConfig(divergence=divergence, path=path, chunk_size=5)
        d = distiller(teacher, student, tmp_path, lm, temperature=2.0, kd_loss_weight=0.7,
                      hard_label_weight=0.3)
        assert d.path == path
        total, parts = d.train_on_batch(batch, {})
        total.backward()
        results[path] = (total.detach(), parts, {n: p.grad.clone()
                                                 for n, p in student.named_parameters()})
        student.zero_grad()
    # by hand: the logits at t against the token at t + 1
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        logits_T = teacher(input_ids=ids, attention_mask=mask).logits
    logits_S = student(input_ids=ids, attention_mask=mask).logits
    targets = labels[:, 1:]
    valid = (targets != -100) & (mask[:, 1:] == 1)
    expected = token_distillation_loss(logits_S[:, :-1], logits_T[:, :-1], targets, valid,
                                       divergence=divergence, temperature=2.0, ce_weight=0.3 / 0.7,
                                       return_dict=True)
    for path, (total, parts, grads) in results.items():
        torch.testing.assert_close(total, 0.7 * expected["loss"].detach(), msg=path)
        torch.testing.assert_close(parts["unweighted_kd_loss"], expected["kd"], msg=path)
        torch.testing.assert_close(parts["unweighted_hard_label_loss"], expected["ce"], msg=path)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, results["dense"][2][name], rtol=1e-4, atol=1e-6,
                                       msg=f"{path}: {name}")


class NextTokenOracle(nn.Module):
    """A plain module whose logits at t put all mass on the input token at t + 1."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        following = torch.roll(input_ids, -1, dims=1)
        return {"logits": 30.0 * nn.functional.one_hot(following, VOCAB).float()}


def test_causal_shift_logits_at_t_predict_token_t_plus_1(tmp_path):
    batch = collate(examples(4))
    # a cross-entropy of ~0 only if position t is scored against labels[t + 1]
    oracle = distiller(None, NextTokenOracle(), tmp_path, kd_loss_weight=0, hard_label_weight=1)
    total, parts = oracle.train_on_batch(batch, {})
    assert float(parts["unweighted_hard_label_loss"]) < 1e-6
    assert float(parts["unweighted_kd_loss"]) == 0.0  # kd weight 0: the student is its teacher
    # a model that predicts the current token instead is scored badly
    copier = NextTokenOracle()
    copier.forward = lambda input_ids, attention_mask=None: {
        "logits": 30.0 * nn.functional.one_hot(input_ids, VOCAB).float()}
    total, parts = distiller(None, copier, tmp_path, kd_loss_weight=0,
                             hard_label_weight=1).train_on_batch(batch, {})
    assert float(parts["unweighted_hard_label_loss"]) > 10


def test_plain_module_teacher_and_student_train_chunked(tmp_path):
    teacher, student = NextTokenOracle(), gpt2()
    d = distiller(teacher, student, tmp_path)
    assert d.path == "chunked"  # the oracle has no output embedding: not fused
    total, _ = d.train_on_batch(collate(examples(3)), {})
    assert torch.isfinite(total) and total > 0


def test_all_masked_batch_gives_zero_and_no_nan(tmp_path):
    teacher, student = gpt2(seed=1), gpt2(seed=2)
    batch = collate(examples(3))
    batch["labels"][:] = -100
    for path in ("dense", "chunked", "fused"):
        d = distiller(teacher, student, tmp_path, LMDistillationConfig(path=path),
                      hard_label_weight=1)
        total, parts = d.train_on_batch(batch, {})
        total.backward()
        assert float(total.detach()) == 0.0 and all(float(v) == 0.0 for v in parts.values())
        assert all(torch.isfinite(p.grad).all() and not p.grad.any()
                   for p in student.parameters() if p.grad is not None)
        student.zero_grad()


# ------------------------------------------------------------------------------ gathering
def test_valid_row_index_gathers_only_where_it_pays():
    from textbrewer.distillers.lm.alignment import gather_rows, valid_row_index
    valid = torch.tensor([[True, False, True, False], [False, False, True, False]])
    for path in ("dense", "chunked", "fused"):  # 3 of 8 valid: every path gathers
        assert valid_row_index(valid, 3, path).tolist() == [0, 2, 6]
    full = torch.ones(2, 4, dtype=torch.bool)
    assert valid_row_index(full, 8, "fused") is None  # nothing to drop
    mostly = torch.ones(2, 8, dtype=torch.bool)
    mostly[1, 7] = False  # 15 of 16 valid: gathering the logits costs more than it saves...
    assert valid_row_index(mostly, 15, "dense") is None
    assert valid_row_index(mostly, 15, "chunked") is None
    assert valid_row_index(mostly, 15, "fused").tolist() == list(range(15))  # ...not hidden
    mostly[0, :2] = False  # 13 of 16 (0.81): the dense path gathers, the chunked one not yet
    assert valid_row_index(mostly, 13, "dense").tolist() == list(range(2, 15))
    assert valid_row_index(mostly, 13, "chunked") is None
    x = torch.arange(2 * 4 * 3).reshape(2, 4, 3)
    index = valid_row_index(valid, 3, "dense")
    assert gather_rows(x, index, (2, 4), "x").tolist() == [
        x[0, 0].tolist(), x[0, 2].tolist(), x[1, 2].tolist()]
    pair = gather_rows((x[..., 0], x), index, (2, 4), "pair")
    assert pair[0].tolist() == [0, 6, 18] and pair[1].shape == (3, 3)
    with pytest.raises(ValueError, match=r"student logits has shape \(2, 5, 3\).*\(2, 4\)"):
        gather_rows(torch.zeros(2, 5, 3), index, (2, 4), "student logits")


def test_logits_with_extra_positions_are_an_error_not_wrong_rows(tmp_path):
    """A student whose logits have positions the batch's targets do not (a prompt-tuning
    prefix, an adaptor that adds tokens) is refused, gathered or not, naming the shapes."""
    class Prefixed(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask=None):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            return {"logits": torch.cat([logits[:, :3], logits], dim=1)}

    teacher, student = gpt2(2, 32, seed=1), Prefixed(gpt2(seed=2))
    batch = collate(examples(8))
    for path in ("dense", "chunked"):
        d = distiller(teacher, student, tmp_path / path, LMDistillationConfig(path=path),
                      hard_label_weight=0.5)
        with pytest.raises(ValueError, match="shape"):
            d.train_on_batch(batch, {})


@pytest.mark.parametrize("path,divergence", [
    ("dense", "forward_kl"), ("chunked", "reverse_kl"), ("fused", "forward_kl"),
    ("fused", "jsd"), ("chunked", "taid"), ("dense", "akl")])
def test_loss_over_gathered_valid_rows_equals_the_full_layout(tmp_path, monkeypatch, path,
                                                              divergence):
    """The loss over the gathered valid tokens equals the loss over every position with the
    invalid ones zeroed (the reference: gathering switched off), in value and gradient."""
    import textbrewer.distillers.lm.base as lm_base
    from textbrewer.distillers.lm.alignment import GATHER_BELOW
    teacher, student = gpt2(2, 32, seed=1), gpt2(1, 16, seed=2)
    batch = collate(examples(8))
    valid = (batch["labels"][:, 1:] != -100) & (batch["attention_mask"][:, 1:] == 1)
    assert valid.float().mean() < min(GATHER_BELOW.values())  # so every path gathers here
    calls = []
    original = lm_base.valid_row_index

    def gathering(*args, **kwargs):
        index = original(*args, **kwargs)
        calls.append(index is not None)
        return index

    results = {}
    for name, finder in (("full", lambda *a, **k: None), ("gathered", gathering)):
        monkeypatch.setattr(lm_base, "valid_row_index", finder)
        d = distiller(teacher, student, tmp_path / name,
                      LMDistillationConfig(divergence=divergence, path=path, chunk_size=5),
                      hard_label_weight=0.5)
        total, parts = d.train_on_batch(batch, {})
        total.backward()
        results[name] = (total.detach(), {n: p.grad.clone() for n, p in
                                          student.named_parameters() if p.grad is not None})
        student.zero_grad()
    assert calls == [True]
    torch.testing.assert_close(results["gathered"][0], results["full"][0], rtol=1e-6, atol=0)
    for name, grad in results["full"][1].items():
        torch.testing.assert_close(results["gathered"][1][name], grad, rtol=1e-5, atol=1e-7,
                                   msg=name)


def test_padding_benchmark_sides_compute_the_same_loss(capsys):
    """benchmarks/lm_padding.py --quick: the hand-written loss and every library side, full
    layout and gathered, give one value per valid share (the script's timings are not read)."""
    import json
    import os
    import runpy
    import sys
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks",
                          "lm_padding.py")
    argv = sys.argv
    try:
        sys.argv = [script, "--quick"]
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = argv
    report = json.loads(capsys.readouterr().out)
    assert [r["valid_share"] for r in report["results"]] == [1.0, 0.5]
    for result in report["results"]:
        losses = list(result["loss"].values())
        assert len(losses) == 7 and max(losses) - min(losses) < 1e-5, result["loss"]


# ------------------------------------------------------------------------------ the loop
def _train(tmp_path, batch_size, accumulation, path, steps_data=8, lm=None):
    teacher, student = gpt2(2, 32, seed=1), gpt2(1, 16, seed=2)
    loader = torch.utils.data.DataLoader(examples(steps_data), batch_size=batch_size,
                                         collate_fn=collate)
    d = distiller(teacher, student, tmp_path / f"{path}{batch_size}x{accumulation}",
                  lm or LMDistillationConfig(path=path, chunk_size=7), accumulation,
                  hard_label_weight=0.5)
    with d:
        d.train(torch.optim.SGD(student.parameters(), lr=0.5), loader, num_epochs=2)
    return student.state_dict()


@pytest.mark.parametrize("path", ["dense", "fused"])
def test_accumulation_invariance_with_uneven_lengths(tmp_path, path):
    whole = _train(tmp_path, 8, 1, path)
    for batch_size, accumulation in ((2, 4), (1, 8)):
        split = _train(tmp_path, batch_size, accumulation, path)
        for key, value in whole.items():
            torch.testing.assert_close(split[key], value, rtol=0, atol=2e-6, msg=key)


# ------------------------------------------------------------------------------ vocabularies
def test_vocabulary_mismatch_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"student's vocabulary has 64 entries and the "
                                         r"teacher's 72.*vocab_alignment='pad'"):
        distiller(gpt2(vocab=72), gpt2(), tmp_path)


@pytest.mark.parametrize("path", ["dense", "fused"])
def test_padded_vocabulary_alignment(tmp_path, path):
    teacher, student = gpt2(2, 32, vocab=72, seed=1), gpt2(seed=2)
    batch = collate(examples(3))
    # reverse KL: the student has no mass on the padded columns, so the value is finite
    # (a forward KL would be +inf wherever the teacher gives them mass, as it should)
    d = distiller(teacher, student, tmp_path, LMDistillationConfig(
        vocab_alignment="pad", path=path, divergence="reverse_kl"))
    total, _ = d.train_on_batch(batch, {})
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logits_T = teacher(input_ids=ids, attention_mask=mask).logits
        logits_S = student(input_ids=ids, attention_mask=mask).logits
    padded = torch.cat([logits_S, torch.full((*logits_S.shape[:2], 8), float("-inf"))], -1)
    targets = batch["labels"][:, 1:]
    valid = targets != -100
    expected = token_distillation_loss(padded[:, :-1], logits_T[:, :-1], targets, valid,
                                       divergence="reverse_kl")
    torch.testing.assert_close(total.detach(), expected)
    assert torch.isfinite(total)


def test_teacher_batches_with_their_own_ids(tmp_path):
    teacher, student = gpt2(2, 32, seed=1), gpt2(seed=2)
    batch = collate(examples(3))
    teacher_batch = dict(batch, input_ids=(batch["input_ids"] + 1) % VOCAB)
    d = distiller(teacher, student, tmp_path)
    total, _ = d.train_on_batch({"teacher": teacher_batch, "student": batch}, {})
    with torch.no_grad():
        logits_T = teacher(input_ids=teacher_batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
    logits_S = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = token_distillation_loss(logits_S[:, :-1], logits_T[:, :-1], batch["labels"][:, 1:])
    torch.testing.assert_close(total.detach(), expected.detach())
    longer = dict(teacher_batch, input_ids=torch.cat([teacher_batch["input_ids"],
                                                      teacher_batch["input_ids"][:, :2]], 1))
    with pytest.raises(ValueError, match="teacher's input_ids have 9 positions and the "
                                         "student's 7"):
        d.train_on_batch({"teacher": longer, "student": batch}, {})


class SoftCapped(nn.Module):
    """Applies tanh soft-capping after its head, as Gemma 2 does."""

    def __init__(self):
        super().__init__()
        self.body = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, VOCAB)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None):
        return {"logits": 3.0 * torch.tanh(self.head(self.body(input_ids)) / 3.0)}


def test_fused_path_refuses_a_model_that_changes_its_logits_after_the_head(tmp_path):
    d = distiller(gpt2(seed=1), SoftCapped(), tmp_path, LMDistillationConfig(path="fused"),
                  temperature=1.0)
    with pytest.raises(ValueError, match="student's logits are not its output head"):
        d.train_on_batch(collate(examples(2)), {})


# ------------------------------------------------------------------------------ teacher cache
def test_training_from_the_cache_matches_the_live_teachers_topk(tmp_path):
    """Training from the cache (model_T=None) equals training with a live teacher whose top-k
    is computed here the way the writer stores it (k = 8, log-probs rounded to fp16); the
    live ``divergence='topk_kl'`` path (no fp16 rounding) is within the rounding of it."""
    k = 8
    teacher = gpt2(2, 32, seed=1)
    data = examples(8)
    write_teacher_cache(teacher, data, str(tmp_path / "cache"), k=k, batch_size=3,
                        positions="shifted_labels", fingerprint="structure")
    cache = TeacherCache(str(tmp_path / "cache"), expected_vocab_size=VOCAB)

    def live_collate(items):
        batch = collate(items)
        with torch.no_grad():
            logits = teacher(input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).logits
        logprobs, ids = logits.float().log_softmax(-1).topk(k, dim=-1)
        logprobs = logprobs.clamp(min=float(torch.finfo(torch.float16).min)).half().float()
        batch["teacher_topk"] = {"topk_ids": ids, "topk_logprobs": logprobs,
                                 "mask": torch.ones(ids.shape[:2], dtype=torch.bool)}
        return batch

    def run(model_T, collate_fn, dataset, lm, name):
        student = gpt2(seed=2)
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_fn)
        d = distiller(model_T, student, tmp_path / name, lm, 2, hard_label_weight=0.2)
        with d:
            d.train(torch.optim.SGD(student.parameters(), lr=0.5), loader, num_epochs=2)
        return student.state_dict()

    cached = run(None, CachedTeacherCollator(cache), IndexedDataset(data),
                 LMDistillationConfig(), "cached")
    reference = run(None, live_collate, data, LMDistillationConfig(), "live")
    live_topk = run(teacher, collate, data, LMDistillationConfig(divergence="topk_kl", topk=k,
                                                                 path="dense"), "topk")
    for key, value in reference.items():
        torch.testing.assert_close(cached[key], value, rtol=0, atol=1e-6, msg=key)
        torch.testing.assert_close(live_topk[key], value, rtol=0, atol=1e-3, msg=key)
    assert any((cached[key] - gpt2(seed=2).state_dict()[key]).abs().max() > 1e-3
               for key in cached)  # it did train


# ------------------------------------------------------------------------------ on-policy
def test_hard_labels_on_the_students_own_samples_are_optional(tmp_path):
    """hard_labels_on_generated=False: a student-generated batch trains on the divergence
    alone (GKD's loss), the same generated batch; True adds the CE on the samples."""
    teacher, student = gpt2(2, 32, seed=1), gpt2(seed=2)
    batch = collate(examples(3))
    losses = {}
    for on_generated in (True, False):
        lm = LMDistillationConfig(lmbda=1.0, max_new_tokens=3, top_k=10, seed=7,
                                  hard_labels_on_generated=on_generated, path="dense")
        d = distiller(teacher, student, tmp_path, lm, hard_label_weight=0.5)
        prepared = d.prepare_batch(batch)
        assert prepared.source == "student"
        losses[on_generated] = d.compute_token_loss(prepared, {})
    (with_ce, parts), (without, alone) = losses[True], losses[False]
    torch.testing.assert_close(alone["unweighted_kd_loss"], parts["unweighted_kd_loss"])
    torch.testing.assert_close(without, alone["unweighted_kd_loss"])
    torch.testing.assert_close(with_ce, parts["unweighted_kd_loss"]
                               + 0.5 * parts["unweighted_hard_label_loss"])
    assert parts["unweighted_hard_label_loss"] > 0


def test_on_policy_generation_is_reproducible_and_explicit(tmp_path):
    teacher, student = gpt2(2, 32, seed=1), gpt2(seed=2)
    batch = collate(examples(3))
    lm = LMDistillationConfig(lmbda=1.0, max_new_tokens=3, top_k=10, seed=7)
    first = distiller(teacher, student, tmp_path, lm).prepare_batch(batch)
    again = distiller(teacher, student, tmp_path, lm).prepare_batch(batch)
    other = distiller(teacher, student, tmp_path,
                      LMDistillationConfig(lmbda=1.0, max_new_tokens=3, top_k=10, seed=8)
                      ).prepare_batch(batch)
    assert first.source == "student"
    assert torch.equal(first.student["input_ids"], again.student["input_ids"])
    assert not torch.equal(first.student["input_ids"], other.student["input_ids"])
    # the prompt (tokens before the first label) is kept, the 3 new tokens are the targets
    ids = first.student["input_ids"]
    for row, length in enumerate([2, 1, 2]):  # prompts of examples 7, 2, 5 tokens long
        assert torch.equal(ids[row, :length], batch["input_ids"][row, :length])
        assert first.valid[row].sum() == 3  # the logits at the last 3 positions before
    assert first.count == 9
    # greedy through model.generate equals the plain sampling loop, whatever the model's
    # own generation_config says
    student.generation_config.repetition_penalty = 5.0
    student.generation_config.do_sample = True
    greedy = LMDistillationConfig(lmbda=1.0, max_new_tokens=4, do_sample=False)
    d = distiller(teacher, student, tmp_path, greedy)
    generated = d.generated_batch(student, batch, seed=0)
    prompts = [batch["input_ids"][row, :n] for row, n in enumerate([2, 1, 2])]
    plain = d.sampler.sample_loop(student, prompts, with_mask=True)
    for row, prompt in enumerate(prompts):
        assert torch.equal(generated["input_ids"][row, len(prompt):len(prompt) + 4], plain[row])


def test_eos_ends_a_generation_and_later_tokens_are_not_targets(tmp_path):
    d = distiller(gpt2(seed=1), gpt2(seed=2), tmp_path,
                  LMDistillationConfig(lmbda=1.0, max_new_tokens=4))
    new = torch.tensor([[5, 1, 7, 8], [5, 6, 7, 8]])
    d.lm_config = dataclass_replace(d.lm_config, eos_token_id=1)
    assert d.sampler.cut_after_eos(new).tolist() == [2, 4]


def dataclass_replace(config, **changes):
    import dataclasses
    return dataclasses.replace(config, **changes)


def test_on_policy_mixture_seq_kd_and_bit_identical_resume(tmp_path):
    data = examples(8)

    def run(name, steps, resume=None, lm=None, stop_at=None):
        teacher, student = gpt2(2, 32, seed=1), gpt2(seed=2)
        loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=collate)
        config = TrainingConfig(device="cpu", output_dir=str(tmp_path / name), ckpt_steps=2,
                                resume_from=resume, seed=3)
        d = CausalLMDistiller(config, DistillationConfig(temperature=1.0), teacher, student,
                              lm_config=lm or LMDistillationConfig(lmbda=0.5, max_new_tokens=3,
                                                                   seed=11))
        sources = []
        original = d.prepare_batch
        d.prepare_batch = lambda batch: (lambda p: sources.append(p.source) or p)(original(batch))

        def callback(model, step):
            if step == stop_at:
                raise KeyboardInterrupt  # after gs{step}.pkl, before its training state

        with d:
            try:
                d.train(torch.optim.SGD(student.parameters(), lr=0.3), loader,
                        num_steps=steps, callback=callback)
            except KeyboardInterrupt:
                pass
        return student.state_dict(), sources

    whole, sources = run("whole", 6)
    assert set(sources) == {"data", "student"}
    # interrupted at step 4 (its state is never written), resumed from step 2's state
    run("resumed", 6, stop_at=4)
    resumed, later = run("resumed", 6, resume="latest")
    assert later == sources[2:]
    for key, value in whole.items():
        assert torch.equal(resumed[key], value), key
    _, seq_sources = run("seq", 2, lm=LMDistillationConfig(seq_kd=True, max_new_tokens=2))
    assert seq_sources == ["teacher", "teacher"]


# ------------------------------------------------------------------------------ seq2seq
def t5(d_model, seed):
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=d_model, d_kv=8,
                                               d_ff=2 * d_model, num_layers=1, num_heads=2,
                                               dropout_rate=0.0, decoder_start_token_id=0,
                                               pad_token_id=0, eos_token_id=1))


def bart(d_model, seed):
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=d_model, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model, max_position_embeddings=32, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2))
    # a non-zero final_logits_bias: the fused path must add it (BART adds it after its head)
    model.final_logits_bias.normal_(0, 0.5)
    return model


def seq2seq_batch(size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (size, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    labels = torch.flip(ids, [1])[:, :5].clone()  # a learnable mapping
    labels[2, 3:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("build", [t5, bart], ids=["t5", "bart"])
def test_seq2seq_values_paths_and_training(tmp_path, build):
    teacher, student = build(32, 1), build(16, 2)
    batch = seq2seq_batch()
    totals = {}
    for path in ("dense", "fused"):
        d = Seq2SeqLMDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path)),
                               DistillationConfig(temperature=1.0, hard_label_weight=0.5),
                               teacher, student, lm_config=LMDistillationConfig(path=path))
        totals[path] = d.train_on_batch(batch, {})[0].detach()
    # by hand: decoder logits at t against labels[t] (the model shifts its inputs)
    with torch.no_grad():
        logits_T = teacher(**batch).logits
        logits_S = student(**batch).logits
    expected = token_distillation_loss(logits_S, logits_T, batch["labels"], ce_weight=0.5)
    for path, total in totals.items():
        torch.testing.assert_close(total, expected, msg=path)
    before = float(totals["fused"])
    loader = [batch] * 12
    with d:
        d.train(torch.optim.Adam(student.parameters(), lr=1e-2), loader, num_epochs=1)
    after = float(d.train_on_batch(batch, {})[0].detach())
    assert after < 0.7 * before


def test_seq2seq_on_policy_generates_decoder_targets(tmp_path):
    teacher, student = t5(32, 1), t5(16, 2)
    d = Seq2SeqLMDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path)),
                           DistillationConfig(temperature=1.0), teacher, student,
                           lm_config=LMDistillationConfig(lmbda=1.0, max_new_tokens=3))
    batch = seq2seq_batch()
    prepared = d.prepare_batch(batch)
    assert prepared.source == "student"
    assert prepared.labels.shape == (4, 3)
    total, _ = d.compute_token_loss(prepared, {})
    assert torch.isfinite(total)
