"""Token telemetry of the LM distillers: entropies and the divergence by position, per
kind of batch, against hand computations and the loss the step trained on."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from textbrewer import DistillationConfig, TrainingConfig  # noqa: E402
from textbrewer.cache import pad_collate  # noqa: E402
from textbrewer.distillers.lm import CausalLMDistiller, LMDistillationConfig  # noqa: E402
from textbrewer.distillers.lm import telemetry as telemetry_module  # noqa: E402
from textbrewer.distillers.lm.telemetry import TokenTelemetry, token_statistics  # noqa: E402
from textbrewer.losses.token import TopKTeacher, token_distillation_loss  # noqa: E402

transformers.utils.logging.set_verbosity_error()
VOCAB = 40


def _entropy_by_hand(logits):
    p = logits.double().softmax(-1)
    return -(p * p.log()).sum(-1)


def test_statistics_are_the_entropies_and_the_per_token_divergence(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    z_S = torch.randn(9, VOCAB, generator=generator)
    z_T = torch.randn(9, VOCAB, generator=generator) * 3
    options = dict(divergence="jsd", beta=0.3, temperature=2.0, tail="renormalize",
                   scale_by_temperature_squared=True, vocab_alignment=None, kd_weight=0.5)
    monkeypatch.setattr(telemetry_module, "_BLOCK_BYTES", 4 * VOCAB * 2)  # blocks of 2 rows
    entropy_S, entropy_T, divergence = token_statistics(
        lambda rows: z_S[rows], lambda rows: z_T[rows], 9, VOCAB, options)
    torch.testing.assert_close(entropy_S.double(), _entropy_by_hand(z_S), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy_T.double(), _entropy_by_hand(z_T), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(divergence, token_distillation_loss(
        z_S, z_T, divergence="jsd", beta=0.3, temperature=2.0,
        scale_by_temperature_squared=True, reduction="none"))
    # a top-k teacher: its entropy is the rebuilt distribution's (here over k + 1 buckets)
    logprobs, ids = z_T.log_softmax(-1).topk(5, dim=-1)
    options.update(divergence="reverse_kl", tail="bucket")
    _, entropy_T, divergence = token_statistics(
        lambda rows: z_S[rows], lambda rows: TopKTeacher(ids[rows], logprobs[rows]), 9, VOCAB,
        options)
    p = logprobs.double().exp()
    buckets = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(entropy_T.double(), -(buckets * buckets.log()).sum(-1),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(divergence, token_distillation_loss(
        z_S, TopKTeacher(ids, logprobs), divergence="reverse_kl", tail="bucket",
        temperature=2.0, scale_by_temperature_squared=True, reduction="none"))


def test_bins_count_the_rows_own_targets():
    """Positions are indices among a row's valid targets; two batches add up by hand."""
    telemetry = TokenTelemetry((2, 4))
    assert telemetry.bin_names == ["0-1", "2-3", "4+"]
    valid = torch.tensor([[False, True, True, True, False, True, True],
                          [True, True, False, False, False, False, False]])
    # targets by row: positions 0,1,2,3,4 (row 0) and 0,1 (row 1)
    divergence = torch.arange(14, dtype=torch.float32)  # flattened (B·L)
    entropy = torch.full((14,), 2.0)
    telemetry.record("student", valid, entropy, entropy * 2, divergence)
    telemetry.record("student", valid[1:], entropy[:7], None, divergence[7:] + 100)
    values = {key: float(value) for key, value in telemetry.values().items()}
    # row 0 targets at flat 1, 2, 3, 5, 6 -> bins 0,0,1,1,2; row 1 at 7, 8 -> bins 0,0;
    # the second batch (one row) targets at 0, 1 with values 107, 108 -> bin 0
    assert values["telemetry/on_policy/divergence_by_position/0-1"] == pytest.approx(
        (1 + 2 + 7 + 8 + 107 + 108) / 6)
    assert values["telemetry/on_policy/divergence_by_position/2-3"] == pytest.approx(4.0)
    assert values["telemetry/on_policy/divergence_by_position/4+"] == pytest.approx(6.0)
    assert values["telemetry/on_policy/divergence"] == pytest.approx(
        (1 + 2 + 3 + 5 + 6 + 7 + 8 + 107 + 108) / 9)
    assert values["telemetry/on_policy/student_entropy"] == pytest.approx(2.0)
    # the teacher's entropy came with the first batch only: its sum over all 9 targets
    assert values["telemetry/on_policy/teacher_entropy"] == pytest.approx(4.0 * 7 / 9)
    assert telemetry.values() == {}  # read once per step


def _gpt2(seed, n_embd=16):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=n_embd, n_head=2, vocab_size=VOCAB,
                                      n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, bos_token_id=0, eos_token_id=1))


def _examples(count=6):
    generator = torch.Generator().manual_seed(0)
    result = []
    for length in [7, 4, 6, 5, 7, 3][:count]:
        ids = torch.randint(2, VOCAB, (length,), generator=generator)
        labels = ids.clone()
        labels[:2] = -100
        result.append({"input_ids": ids, "labels": labels})
    return result


class Recording(CausalLMDistiller):
    """Keeps each step's KD term and logged telemetry."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd, self.kinds, self.logged = [], [], []

    def compute_token_loss(self, prepared, args):
        loss, named = super().compute_token_loss(prepared, args)
        self.kd.append(float(named["unweighted_kd_loss"]))
        self.kinds.append(prepared.source)
        return loss, named

    def observed_values(self):
        values = super().observed_values()
        self.logged.append({key: float(value) for key, value in values.items()
                            if key.startswith("telemetry/")})
        return values


def _run(tmp_path, name, **options):
    options.setdefault("telemetry_bins", (2,))
    student = _gpt2(1, n_embd=8)
    distiller = Recording(
        TrainingConfig(device="cpu", output_dir=str(tmp_path / name),
                       log_dir=str(tmp_path / name / "runs")),
        DistillationConfig(temperature=1.0, hard_label_weight=0.0), _gpt2(0), student,
        lm_config=LMDistillationConfig(telemetry=True, **options))
    loader = torch.utils.data.DataLoader(_examples(), batch_size=3, collate_fn=pad_collate)
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1), loader, num_epochs=1)
    return distiller


@pytest.mark.parametrize("path", ["dense", "fused"])
def test_the_logged_divergence_is_the_kd_term_the_step_trained_on(tmp_path, path):
    """One micro-batch per step: the step's mean divergence is its KD term, the bins
    average back to it, and the dense and fused paths log the same numbers."""
    runs = {}
    for run_path in ("chunked", path):
        d = _run(tmp_path, run_path, divergence="reverse_kl", path=run_path)
        assert len(d.logged) == 2 and d.kinds == ["data", "data"]
        for kd, logged in zip(d.kd, d.logged):
            prefix = "telemetry/dataset/"
            assert logged[prefix + "divergence"] == pytest.approx(kd, rel=1e-5)
            assert logged[prefix + "student_entropy"] > 0
            assert logged[prefix + "teacher_entropy"] > 0
            assert {key[len(prefix):] for key in logged} == {
                "divergence", "student_entropy", "teacher_entropy",
                "divergence_by_position/0-1", "divergence_by_position/2+"}
        runs[run_path] = d.logged
    for chunked, other in zip(runs["chunked"], runs[path]):
        for key in chunked:
            assert other[key] == pytest.approx(chunked[key], rel=1e-5), key


def test_on_policy_batches_are_logged_as_their_own_kind(tmp_path):
    d = _run(tmp_path, "on_policy", divergence="forward_kl", lmbda=1.0, max_new_tokens=4,
             top_k=10, path="dense")
    assert d.kinds == ["student", "student"]
    for kd, logged in zip(d.kd, d.logged):
        assert logged["telemetry/on_policy/divergence"] == pytest.approx(kd, rel=1e-5)
        assert not any(key.startswith("telemetry/dataset/") for key in logged)
    # in TensorBoard, one point per optimizer step, beside the generated length
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "on_policy" / "runs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("telemetry/on_policy/divergence", "telemetry/on_policy/student_entropy",
                 "telemetry/on_policy/teacher_entropy", "on_policy/generated_length",
                 "telemetry/on_policy/divergence_by_position/0-1"):
        assert f"scalar/{name}" in tags, (name, sorted(tags))
    points = [event.value for event in events.Scalars("scalar/telemetry/on_policy/divergence")]
    assert points == pytest.approx([logged["telemetry/on_policy/divergence"]
                                    for logged in d.logged], rel=1e-6)


def test_telemetry_options_are_checked():
    with pytest.raises(ValueError, match=r"telemetry_bins must be strictly increasing integers"
                                         r" > 0 .*got \(4, 4\)"):
        LMDistillationConfig(telemetry_bins=(4, 4))
    with pytest.raises(ValueError, match=r"telemetry with token_alignment='uld' is not "
                                         r"supported"):
        LMDistillationConfig(telemetry=True, token_alignment="uld")


def test_a_window_of_two_batches_logs_its_kd_term_and_nothing_runs_without_a_writer(
        tmp_path, monkeypatch):
    """With two micro-batches per step the logged mean is the window's: the step's KD term
    (the sum of its micro-batches' terms, each over the window's tokens). Without
    TensorBoard the statistics are not computed at all."""
    student = _gpt2(1, n_embd=8)
    distiller = Recording(
        TrainingConfig(device="cpu", output_dir=str(tmp_path / "acc"),
                       gradient_accumulation_steps=2, log_dir=str(tmp_path / "acc" / "runs")),
        DistillationConfig(temperature=1.0, hard_label_weight=0.0), _gpt2(0), student,
        lm_config=LMDistillationConfig(telemetry=True, path="dense", telemetry_bins=(2,)))
    loader = torch.utils.data.DataLoader(_examples(), batch_size=3, collate_fn=pad_collate)
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1), loader, num_epochs=1)
    assert len(distiller.kd) == 2 and len(distiller.logged) == 1
    assert distiller.logged[0]["telemetry/dataset/divergence"] == pytest.approx(
        sum(distiller.kd), rel=1e-5)
    calls = []
    real = telemetry_module.token_statistics
    monkeypatch.setattr("textbrewer.distillers.lm.base.token_statistics",
                        lambda *args: calls.append(1) or real(*args))
    student = _gpt2(1, n_embd=8)
    quiet = CausalLMDistiller(
        TrainingConfig(device="cpu", output_dir=str(tmp_path / "quiet"), log_dir=None),
        DistillationConfig(temperature=1.0), _gpt2(0), student,
        lm_config=LMDistillationConfig(telemetry=True, path="dense"))
    with quiet:
        quiet.train(torch.optim.SGD(student.parameters(), lr=0.1), loader, num_epochs=1)
    assert calls == []
