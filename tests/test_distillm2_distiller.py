"""DistiLLM2Distiller: its loss is distillm2_loss on the batch it generates, the student's
responses are the student's own generation, token normalisation over an accumulation
window, start checks, resume. Tiny GPT-2 models built from configs, CPU."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from textbrewer import DistillationConfig, TrainingConfig  # noqa: E402
from textbrewer.distillers import DistiLLM2Distiller, LMDistillationConfig  # noqa: E402
from textbrewer.distillers.lm.distillm2 import DistiLLM2Batch  # noqa: E402
from textbrewer.losses.token import distillm2_loss  # noqa: E402

transformers.utils.logging.set_verbosity_error()
VOCAB, EOS, PAD = 32, 1, 0


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def gpt2(n_layer=1, n_embd=16, seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=VOCAB,
                                      n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, bos_token_id=EOS, eos_token_id=EOS))


def batch(rows=4, prompt=3, seed=0):
    """Prompts of ``prompt`` tokens, then teacher responses of uneven lengths (right-padded);
    labels -100 on the prompt and the padding."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [4, 2, 5, 3, 4, 1][:rows]
    width = prompt + max(lengths)
    ids = torch.full((rows, width), PAD, dtype=torch.long)
    mask = torch.zeros(rows, width, dtype=torch.long)
    labels = torch.full((rows, width), -100, dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens = torch.randint(2, VOCAB, (prompt + length,), generator=generator)
        ids[row, :prompt + length] = tokens
        mask[row, :prompt + length] = 1
        labels[row, prompt:prompt + length] = tokens[prompt:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_config(**overrides):
    options = dict(max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD, seed=3)
    options.update(overrides)
    return LMDistillationConfig(**options)


def build(tmp_path, teacher=None, student=None, lm=None, accumulation=1, hard_label_weight=0.0,
          **options):
    return DistiLLM2Distiller(
        TrainingConfig(device="cpu", output_dir=str(tmp_path),
                       gradient_accumulation_steps=accumulation, log_dir=None),
        DistillationConfig(temperature=1.0, hard_label_weight=hard_label_weight),
        gpt2(2, 24, seed=1) if teacher is None else teacher,
        gpt2(seed=2) if student is None else student,
        lm_config=lm or lm_config(), **options)


def _shifted_valid(inputs, labels):
    aligned = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    mask = torch.cat([inputs["attention_mask"][:, 1:] != 0,
                      torch.zeros_like(labels[:, :1], dtype=torch.bool)], 1)
    return (aligned != -100) & mask


# ----------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("hard_label_weight", [0.0, 0.5])
def test_loss_equals_distillm2_loss_by_hand(tmp_path, hard_label_weight):
    options = dict(alpha_teacher=0.2, alpha_student=0.3, weight_teacher=0.7, weight_student=1.3)
    distiller = build(tmp_path, hard_label_weight=hard_label_weight, **options)
    prepared = distiller.prepare_batch(batch())
    assert isinstance(prepared, DistiLLM2Batch)
    loss, named = distiller.train_on_batch(prepared, {})

    # by hand: each batch through each model on its own (no stacking, no padding)
    teacher, student = distiller.model_T, distiller.model_S
    on_T = batch()
    on_S = prepared.student_responses.student
    labels_S = torch.cat([torch.full_like(on_S["input_ids"][:, :3], -100),
                          on_S["input_ids"][:, 3:]], 1).masked_fill(
        on_S["attention_mask"] == 0, -100)
    valid_T = _shifted_valid(on_T, on_T["labels"])
    valid_S = _shifted_valid(on_S, labels_S)
    feed = {"input_ids": on_T["input_ids"], "attention_mask": on_T["attention_mask"]}
    with torch.no_grad():
        z_T_on_T, z_T_on_S = teacher(**feed).logits, teacher(**on_S).logits
        z_S_on_T, z_S_on_S = student(**feed).logits, student(**on_S).logits
    expected = distillm2_loss(z_S_on_T, z_T_on_T, z_S_on_S, z_T_on_S, valid_T, valid_S,
                              **options)
    if hard_label_weight:
        targets = torch.cat([on_T["labels"][:, 1:], on_T["labels"][:, :1]], 1)
        expected = expected + hard_label_weight * torch.nn.functional.cross_entropy(
            z_S_on_T[valid_T], targets[valid_T])
    assert prepared.num_tokens_on_teacher == int(valid_T.sum()) == 4 + 2 + 5 + 3
    assert prepared.num_tokens_on_student == int(valid_S.sum()) > 0
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-6)
    assert set(named) >= {"unweighted_kd_loss", "distillm2_teacher_responses",
                          "distillm2_student_responses"}
    assert ("unweighted_hard_label_loss" in named) == bool(hard_label_weight)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())


def test_student_responses_are_the_students_own_generation(tmp_path):
    distiller = build(tmp_path, lm=lm_config(seed=11, generation_temperature=1.5))
    data = batch()
    prepared = distiller.prepare_batch(data)
    # the run's generator, drawn as the distiller draws it: a coin, then a sampling seed
    rng = torch.Generator().manual_seed(11)
    torch.rand((), generator=rng)
    seed = int(torch.randint(0, 2 ** 62, (), generator=rng))
    student = distiller.model_S
    student.eval()
    torch.manual_seed(seed)
    with torch.no_grad():  # every prompt has 3 tokens: no padding, left or right
        out = student.generate(input_ids=data["input_ids"][:, :3],
                               attention_mask=torch.ones(4, 3, dtype=torch.long),
                               do_sample=True, max_new_tokens=5, temperature=1.5, top_k=0,
                               top_p=1.0, eos_token_id=EOS, pad_token_id=PAD)
    generated = prepared.student_responses.student
    for row in range(4):
        new = out[row, 3:].tolist()
        new = new[:new.index(EOS) + 1] if EOS in new else new
        length = int(generated["attention_mask"][row].sum())
        assert generated["input_ids"][row, :length].tolist() == \
            data["input_ids"][row, :3].tolist() + new
    # the prompts are the tokens before the first label; the targets are the new tokens
    assert prepared.student_responses.labels[:, :2].eq(-100).all()


def test_gradient_accumulation_equals_one_batch(tmp_path):
    """1 × 4 rows = 2 micro-batches × 2 rows (greedy generation: the responses do not
    depend on the sampling seeds, which differ between the two runs)."""
    data = batch()

    def step(size, accumulation):
        student = gpt2(seed=2)
        distiller = build(tmp_path / f"{size}x{accumulation}", student=student,
                          lm=lm_config(do_sample=False), accumulation=accumulation,
                          hard_label_weight=0.5)
        loader = [{key: value[start:start + size] for key, value in data.items()}
                  for start in range(0, 4, size)]
        with distiller:
            distiller.train(torch.optim.SGD(student.parameters(), lr=1.0), loader,
                            num_steps=1)
        return student.state_dict()

    whole, split = step(4, 1), step(2, 2)
    changed = False
    for key, value in whole.items():
        torch.testing.assert_close(split[key], value, rtol=0, atol=2e-6, msg=key)
        changed = changed or not torch.equal(value, gpt2(seed=2).state_dict()[key])
    assert changed


def test_window_counts_are_the_windows(tmp_path):
    distiller = build(tmp_path, lm=lm_config(do_sample=False))
    data = batch()
    halves = [{key: value[start:start + 2] for key, value in data.items()} for start in (0, 2)]
    prepared, count = distiller.prepare_window(halves)
    own = [DistiLLM2Distiller.prepare_batch(distiller, half) for half in halves]
    teacher_tokens = sum(item.num_tokens_on_teacher for item in own)
    student_tokens = sum(item.num_tokens_on_student for item in own)
    assert count == teacher_tokens + student_tokens
    for item in prepared:
        assert (item.num_tokens_on_teacher, item.num_tokens_on_student) == \
            (teacher_tokens, student_tokens)


def test_resume_generates_the_same_responses(tmp_path):
    """The sampling seeds come from the run's generator, saved with the training state."""
    first = build(tmp_path / "a")
    first.prepare_batch(batch())
    state = first.extra_state()
    expected = first.prepare_batch(batch()).student_responses.student["input_ids"]
    resumed = build(tmp_path / "b")
    resumed.load_extra_state(state)
    again = resumed.prepare_batch(batch()).student_responses.student["input_ids"]
    assert torch.equal(again, expected)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("option, value, message", [
    ("alpha_teacher", 1.5, r"alpha_teacher must be a number in \[0, 1\], got 1.5"),
    ("alpha_student", -0.1, r"alpha_student must be a number in \[0, 1\], got -0.1"),
    ("alpha_teacher", True, r"alpha_teacher must be a number in \[0, 1\], got True"),
    ("weight_teacher", -1.0, r"weight_teacher must be a finite number >= 0, got -1.0"),
    ("weight_student", float("inf"), r"weight_student must be a finite number >= 0, got inf"),
    ("detach_mixture", "yes", r"detach_mixture must be True or False, got 'yes'"),
])
def test_bad_options_are_errors_at_construction(tmp_path, option, value, message):
    with pytest.raises(ValueError, match=message):
        build(tmp_path, **{option: value})


def test_start_checks(tmp_path):
    with pytest.raises(ValueError, match=r"needs a live teacher \(model_T is None\)"):
        DistiLLM2Distiller(TrainingConfig(device="cpu", output_dir=str(tmp_path)),
                           DistillationConfig(temperature=1.0), None, gpt2(),
                           lm_config=lm_config())
    with pytest.raises(ValueError, match=r"pass lm_config=LMDistillationConfig\("
                                         r"max_new_tokens=\.\.\., eos_token_id=\.\.\.\)"):
        DistiLLM2Distiller(TrainingConfig(device="cpu", output_dir=str(tmp_path)),
                           DistillationConfig(temperature=1.0), gpt2(seed=1), gpt2())
    with pytest.raises(ValueError, match=r"needs LMDistillationConfig.eos_token_id"):
        build(tmp_path, lm=lm_config(eos_token_id=None))
    with pytest.raises(ValueError, match=r"max_new_tokens=32 leaves no room for a prompt"):
        build(tmp_path, lm=lm_config(max_new_tokens=32))
    with pytest.raises(ValueError, match=r"eos_token_id=5 but the student's config ends "
                                         r"sequences with \[1\]"):
        build(tmp_path, lm=lm_config(eos_token_id=5))
    for name, value in (("lmbda", 0.5), ("seq_kd", True), ("divergence", "jsd"),
                        ("speculative_top_k", 2)):
        with pytest.raises(ValueError, match=rf"LMDistillationConfig.{name}=.* does not "
                                             rf"apply to DistiLLM2Distiller"):
            build(tmp_path, lm=lm_config(**{name: value}))
    with pytest.raises(ValueError, match=r"runs on the dense path"):
        build(tmp_path, lm=lm_config(path="fused"))
    if hasattr(LMDistillationConfig(), "telemetry"):
        with pytest.raises(ValueError, match=r"telemetry=True is not supported"):
            build(tmp_path, lm=lm_config(telemetry=True))


def test_batch_errors(tmp_path):
    distiller = build(tmp_path)
    data = batch()
    with pytest.raises(ValueError, match=r"needs 'labels' \(B, L\)"):
        distiller.prepare_batch({"input_ids": data["input_ids"]})
    with pytest.raises(ValueError, match=r"passes only \['input_ids', 'attention_mask'\].*"
                                         r"\['position_ids'\]"):
        distiller.prepare_batch(dict(data, position_ids=data["input_ids"]))
    no_prompt = dict(data, labels=data["input_ids"].clone())
    with pytest.raises(ValueError, match=r"needs a prompt of at least one token"):
        distiller.prepare_batch(no_prompt)
