"""Mixed precision, compile, and the non-finite-loss stop, on CPU (CUDA variants skip)."""
import math
import os

import pytest
import torch

from textbrewer import (BasicTrainer, DistillationConfig, GeneralDistiller, NonFiniteLossError,
                        TrainingConfig)
from textbrewer.testing import TinyTransformer, make_classification_data, tiny_adaptor

MATCHES = [{"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
            "proj": ["linear", 16, 32]},
           {"layer_T": 1, "layer_S": 0, "feature": "attention", "loss": "attention_ce_mean",
            "weight": 1}]

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]


def _loader(num_examples=64):
    data = make_classification_data(num_examples, length=8, vocab_size=16, seed=3)
    rows = [{key: value[i] for key, value in data.items()} for i in range(num_examples)]
    return torch.utils.data.DataLoader(rows, batch_size=16, shuffle=False)


def _distil(tmp_path, device="cpu", epochs=4, **train):
    torch.manual_seed(0)
    teacher = TinyTransformer(vocab_size=16, hidden_size=32, num_layers=2, num_heads=4).to(device)
    student = TinyTransformer(vocab_size=16, hidden_size=16, num_layers=1).to(device)
    config = TrainingConfig(device=device, output_dir=str(tmp_path), log_steps=1,
                            log_dir=str(tmp_path / "tb"), **train)
    distiller = GeneralDistiller(config, DistillationConfig(hard_label_weight=1,
                                                            intermediate_matches=MATCHES),
                                 teacher, student, tiny_adaptor, tiny_adaptor)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    with distiller:
        distiller.train(optimizer, _loader(), num_epochs=epochs)
    return student, distiller


def _final_loss(student, device="cpu"):
    student.eval()
    with torch.no_grad():
        batch = {k: v.to(device) for k, v in make_classification_data(
            64, length=8, vocab_size=16, seed=3).items()}
        return student(**batch)["loss"].item()


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_ends_close_to_fp32(tmp_path, device):
    fp32, _ = _distil(tmp_path / "fp32", device)
    bf16, _ = _distil(tmp_path / "bf16", device, mixed_precision="bf16")
    loss_fp32, loss_bf16 = _final_loss(fp32, device), _final_loss(bf16, device)
    # Stated tolerance: after 16 steps the bf16 run's loss is within 5% of the fp32 run's
    # (bf16 keeps 8 mantissa bits; weights and optimizer state stay fp32).
    assert loss_bf16 == pytest.approx(loss_fp32, rel=0.05)
    # and it really ran in reduced precision: the weights are not bit-identical
    assert any(not torch.equal(a, b) for a, b in zip(fp32.state_dict().values(),
                                                      bf16.state_dict().values()))


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_with_grad_scaler_trains_and_counts_skipped_steps(tmp_path, device):
    student, distiller = _distil(tmp_path, device, fp16=True)
    assert distiller.runtime.scaler is not None
    assert math.isfinite(_final_loss(student, device))
    # the first steps at scale 65536 overflow in fp16 and are skipped, then the scale adapts
    skipped = int(distiller.runtime.skipped_steps)
    assert 0 <= skipped < 16
    assert distiller.runtime.scaler.get_scale() == 65536.0 * 0.5 ** skipped


def test_fp16_opt_level_o0_means_full_precision():
    config = TrainingConfig(device="cpu", fp16=True, fp16_opt_level="O0")
    assert config.mixed_precision == "no"


def test_compile_gives_the_same_numbers_as_eager(tmp_path):
    eager, _ = _distil(tmp_path / "eager", epochs=1)
    compiled, distiller = _distil(tmp_path / "compiled", epochs=1,
                                  compile={"backend": "eager"})
    assert hasattr(distiller._student_forward, "_orig_mod")
    for a, b in zip(eager.state_dict().values(), compiled.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("log_steps", [1, 50])
def test_non_finite_loss_names_the_step_and_the_term(tmp_path, log_steps):
    model = TinyTransformer(vocab_size=16, hidden_size=8, num_layers=1)
    calls = []

    def adaptor(batch, outputs):
        calls.append(1)
        loss = outputs["loss"]
        if len(calls) == 3:
            loss = loss * float("nan")
        return {"losses": loss}

    trainer = BasicTrainer(TrainingConfig(device="cpu", output_dir=str(tmp_path),
                                          log_steps=log_steps), model, adaptor)
    # log_steps=1 checks every micro-batch before its step; 50 finds it at the first
    # checkpoint, the end of the epoch (3 micro-batches, so 3 optimizer steps applied)
    applied = 2 if log_steps == 1 else 3
    with pytest.raises(NonFiniteLossError,
                       match=rf"'total_loss' is nan at micro-batch 2 \(during optimizer step 3\); "
                             rf"detected at the next check, after {applied} optimizer steps"):
        trainer.train(torch.optim.SGD(model.parameters(), lr=0.1), _loader(), num_epochs=1)
    assert not os.path.exists(tmp_path / "gs3.pkl")  # no checkpoint of a broken student


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp32_training_matches_cpu(tmp_path):
    cpu, _ = _distil(tmp_path / "cpu", "cpu", epochs=1)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cuda, _ = _distil(tmp_path / "cuda", "cuda", epochs=1)
    for key, value in cpu.state_dict().items():
        torch.testing.assert_close(cuda.state_dict()[key].cpu(), value, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compile_with_inductor_trains(tmp_path):
    student, _ = _distil(tmp_path, "cuda", epochs=1, mixed_precision="bf16", compile=True)
    assert math.isfinite(_final_loss(student, "cuda"))
