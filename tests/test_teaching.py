"""Consistent teaching (textbrewer.teaching), the patient-teacher recipe and the
teacher-assistant chain: the same view reaches both models, a cached teacher forward equals a
fresh one, and the helpers equal the runs they stand for."""
import math

import numpy
import pytest
import torch
from torch import nn

from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
from textbrewer.recipes import PatientTeacher, WarmupCosine
from textbrewer.schemes import distil_through_assistants
from textbrewer.teaching import (AugmentedViews, CachedTeacher, FunctionMatching, cutmix,
                                 mixup, views_for_both)
from textbrewer.testing import TinyTransformer, tiny_adaptor


def test_mixup_is_the_convex_combination_with_the_partner():
    inputs = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    mixed = mixup(inputs, torch.tensor([2, 0, 1]), 0.25)
    assert torch.equal(mixed, torch.tensor([[4.0, 5.0], [1.5, 2.5], [3.5, 4.5]]))
    with pytest.raises(TypeError, match="floating-point"):
        mixup(torch.tensor([[1, 2]]), torch.tensor([0]), 0.5)


def test_cutmix_pastes_one_box_of_the_partner_and_reports_the_area_kept():
    images = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 8, 8)
    partner = torch.tensor([1, 0])
    mixed, kept = cutmix(images, partner, 0.75, torch.Generator().manual_seed(3))
    from_partner = mixed != images
    assert torch.equal(mixed[from_partner], images[partner][from_partner])
    # the same box in both images; the fraction of pixels left is what cutmix reports
    assert torch.equal(from_partner[0], from_partner[1])
    assert kept == pytest.approx(1 - from_partner[0].float().mean().item())
    assert 0.75 <= kept < 1  # a 4x4 box (1 - 0.75 of the area) or less where it is clipped
    with pytest.raises(ValueError, match="images"):
        cutmix(torch.zeros(2, 5), partner, 0.5, torch.Generator())


def test_function_matching_draws_follow_the_seed_and_drop_the_labels():
    batch = {"features": torch.randn(6, 4, 3), "labels": torch.arange(6)}
    first = FunctionMatching("features", seed=7)
    mixed = first(batch)
    assert "labels" not in mixed and torch.equal(batch["labels"], torch.arange(6))
    # the same mix from the recipe: partner permutation, then a numpy Beta(1, 1) weight
    generator = torch.Generator().manual_seed(7)
    partner = torch.randperm(6, generator=generator)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator).item())
    weight = numpy.random.default_rng(seed).beta(1.0, 1.0)
    assert first.last_weight == pytest.approx(weight)
    assert torch.allclose(mixed["features"], mixup(batch["features"], partner, weight))
    state = first.state_dict()
    again = FunctionMatching("features", seed=0)
    again.load_state_dict(state)
    assert torch.equal(first(batch)["features"], again(batch)["features"])
    kept = FunctionMatching("features", labels="keep", probability=0.0)(batch)
    assert kept is batch
    with pytest.raises(KeyError, match="'pixels'.*features"):
        FunctionMatching("pixels")(batch)
    with pytest.raises(ValueError, match="mode must be one of"):
        FunctionMatching(mode="mixout")


class Recorder(nn.Module):
    """Keeps a copy of the features every forward pass receives."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, **batch):
        self.seen.append(batch["features"].detach().clone())
        return self.model(**batch)


def _feature_data(count=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.rand(count, 5, 4, generator=generator)
    return [{"features": features[i], "labels": torch.tensor(i % 3)} for i in range(count)]


def _models(seed=0):
    torch.manual_seed(seed)
    teacher = TinyTransformer(input_dim=4, hidden_size=8, num_layers=2,
                              num_labels=3).eval()
    student = TinyTransformer(input_dim=4, hidden_size=4, num_layers=1,
                              num_labels=3)
    return teacher, student


def test_function_matching_gives_both_models_the_same_mixed_view(tmp_path):
    teacher, student = _models()
    teacher, student = Recorder(teacher), Recorder(student)
    loader = torch.utils.data.DataLoader(_feature_data(), batch_size=8)
    matching = FunctionMatching("features", seed=1)
    distiller = GeneralDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path)),
                                 DistillationConfig(kd_loss_type="kl", hard_label_weight=0),
                                 teacher, student, tiny_adaptor, tiny_adaptor)
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1), loader, num_epochs=1,
                        batch_postprocessor=matching)
    raw = [batch["features"] for batch in loader]
    assert len(teacher.seen) == len(student.seen) == 2
    replay = FunctionMatching("features", seed=1)
    for seen_T, seen_S, batch in zip(teacher.seen, student.seen, raw):
        assert torch.equal(seen_T, seen_S)  # the same view, not two draws
        assert torch.equal(seen_T, replay({"features": batch})["features"])
        assert not torch.equal(seen_T, batch)


def _shift(example, generator):
    noise = torch.randn(example["features"].shape, generator=generator) * 0.1
    return {**example, "features": example["features"] + noise}


def test_augmented_views_are_fixed_by_their_index():
    data = _feature_data(4)
    views = AugmentedViews(data, _shift, views_per_example=3, seed=2)
    assert len(views) == 12
    item = views[7]  # example 2, view 1
    seed = int(numpy.random.SeedSequence([2, 7]).generate_state(1, numpy.uint64)[0])
    expected = _shift(data[2], torch.Generator().manual_seed(seed))
    assert torch.equal(item["features"], expected["features"]) and int(item["view_id"]) == 7
    assert torch.equal(views[7]["features"], item["features"])
    assert not torch.equal(views[6]["features"], item["features"])
    with pytest.raises(IndexError):
        views[12]


def test_augmented_views_fix_a_global_rng_augment_and_leave_the_dataset_alone():
    data = _feature_data(3)
    original = data[1]["features"].clone()

    def global_noise(example, generator):  # draws from torch's global generator, in place
        example["features"].add_(torch.rand(example["features"].shape))
        return example

    views = AugmentedViews(data, global_noise, views_per_example=2)
    torch.manual_seed(123)
    first = views[3]["features"]
    torch.manual_seed(456)
    state = torch.random.get_rng_state()
    again = views[3]["features"]
    assert torch.equal(first, again)  # the same view whatever the global state
    assert torch.equal(torch.random.get_rng_state(), state)  # and that state restored
    assert torch.equal(data[1]["features"], original)  # the dataset not modified


def test_cached_teacher_serves_what_a_fresh_forward_computes():
    teacher, _ = _models()
    cached = CachedTeacher(teacher)
    views = AugmentedViews(_feature_data(12), _shift, views_per_example=2)
    order = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(views, batch_size=5, shuffle=True, generator=order)
    split = views_for_both()
    for epoch in range(2):
        for batch in loader:
            both = split(batch)
            assert "view_id" not in both["student"]
            assert both["student"]["features"] is both["teacher"]["features"]
            served = cached(**both["teacher"])
            with torch.no_grad():
                fresh = teacher(**both["student"])
            assert "loss" not in served  # a batch mean is not cached per view
            assert torch.allclose(served["logits"], fresh["logits"], atol=1e-6, rtol=0)
            for key in ("hidden_states", "attentions"):
                assert len(served[key]) == len(fresh[key])
                for got, want in zip(served[key], fresh[key]):
                    assert torch.allclose(got, want, atol=1e-6, rtol=0), key
        if epoch == 0:
            forwards_after_first_epoch = cached.forwards
            assert len(cached) == 24 and cached.rows_computed == 24
    assert cached.forwards == forwards_after_first_epoch  # epoch 2: no teacher forward
    with pytest.raises(KeyError, match="view_id"):
        cached(features=torch.zeros(2, 5, 4))


def test_distilling_from_a_cached_teacher_equals_distilling_from_the_teacher(tmp_path):
    views = AugmentedViews(_feature_data(16), _shift, views_per_example=1)
    # shuffled: the second epoch's batches mix rows cached in different first-epoch batches
    loader = torch.utils.data.DataLoader(views, batch_size=8, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    drop_ids = lambda batch: {k: v for k, v in batch.items() if k != "view_id"}  # noqa: E731
    students = []
    wrapped = []
    for name, wrap, postprocess in (("fresh", lambda t: t, drop_ids),
                                    ("cached", CachedTeacher, views_for_both())):
        teacher, student = _models()
        wrapped.append(wrap(teacher))
        loader.generator.manual_seed(0)
        distiller = GeneralDistiller(
            TrainingConfig(device="cpu", output_dir=str(tmp_path / name)),
            DistillationConfig(kd_loss_type="kl", temperature=2), wrapped[-1], student,
            tiny_adaptor, tiny_adaptor)
        with distiller:
            distiller.train(torch.optim.SGD(student.parameters(), lr=0.1), loader,
                            num_epochs=3, batch_postprocessor=postprocess)
        students.append(student.state_dict())
    assert wrapped[1].forwards == 2 and wrapped[1].rows_computed == 16  # epoch 1 only
    for key in students[0]:
        assert torch.allclose(students[0][key], students[1][key], atol=1e-6, rtol=0), key


def test_warmup_cosine_is_linear_then_half_a_cosine():
    schedule = WarmupCosine(total_steps=110, warmup_steps=10, final_fraction=0.1)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(110) == pytest.approx(0.1) and schedule(500) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(10, 10)
    with pytest.raises(ValueError, match="final_fraction"):
        WarmupCosine(10, 0, final_fraction=2.0)
    assert WarmupCosine(4)(0) == pytest.approx(1.0)  # no warm-up: the peak at once


def test_patient_teacher_is_kd_only_with_mixup_and_its_schedule(tmp_path):
    recipe = PatientTeacher(total_steps=4, input_key="features", temperature=2.0,
                            warmup_fraction=0.25)
    config = recipe.distill_config
    assert (config.kd_loss_type, config.temperature, config.hard_label_weight,
            config.kd_loss_weight) == ("kl", 2.0, 0, 1)
    teacher, student = _models()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    rates, seen = [], []

    def probe(module, args, kwargs):  # the rate each step's forward pass trains with
        rates.append(optimizer.param_groups[0]["lr"])
        seen.append(kwargs["features"].clone())

    student.register_forward_pre_hook(probe, with_kwargs=True)
    distiller = GeneralDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path)), config,
                                 teacher, student, tiny_adaptor, tiny_adaptor)
    data = _feature_data(8)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    with distiller:
        distiller.train(optimizer, loader, num_steps=4, **recipe.train_options())
    # warm-up of one step (0.5 * 1/1), then 0.5 * (1 + cos(pi * k / 3)) / 2, k = 0, 1, 2
    assert rates == pytest.approx([0.5, 0.5, 0.375, 0.125])
    assert not torch.equal(seen[0], torch.stack([d["features"] for d in data[:4]]))
    assert isinstance(recipe.train_options()["batch_postprocessor"], FunctionMatching)
    assert "batch_postprocessor" not in PatientTeacher(4, mix=None).train_options()
    assert PatientTeacher(4, mix_probability=0.5).batch_postprocessor.probability == 0.5
    with pytest.raises(ValueError, match="mix=None"):
        PatientTeacher(4, hard_label_weight=1)
    assert PatientTeacher(4, mix=None, hard_label_weight=1).distill_config.hard_label_weight == 1


def test_the_assistant_chain_equals_two_distillations_by_hand(tmp_path):
    def models():
        torch.manual_seed(0)
        teacher = TinyTransformer(input_dim=4, hidden_size=16, num_layers=2,
                                  num_labels=3).eval()
        assistant = TinyTransformer(input_dim=4, hidden_size=8, num_layers=2,
                                    num_labels=3)
        student = TinyTransformer(input_dim=4, hidden_size=4, num_layers=1,
                                  num_labels=3)
        return teacher, assistant, student

    loader = torch.utils.data.DataLoader(_feature_data(16), batch_size=8)
    config = DistillationConfig(kd_loss_type="kl", temperature=2, hard_label_weight=0.5)
    optimizer = lambda model: torch.optim.SGD(model.parameters(), lr=0.1)  # noqa: E731
    teacher, assistant, student = models()
    stages = distil_through_assistants(
        TrainingConfig(device="cpu", output_dir=str(tmp_path / "chain")), config,
        [(teacher, tiny_adaptor), (assistant, tiny_adaptor), (student, tiny_adaptor)],
        optimizer, loader, evaluate=lambda model: "scored", num_epochs=1)
    assert [(s.index, s.teacher, s.model, s.metric) for s in stages] == [
        (1, teacher, assistant, "scored"), (2, assistant, student, "scored")]
    assert (tmp_path / "chain" / "stage2" / "gs2.pkl").exists()

    teacher, assistant_by_hand, student_by_hand = models()
    for name, teacher_model, model in (("a", teacher, assistant_by_hand),
                                       ("s", assistant_by_hand, student_by_hand)):
        distiller = GeneralDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path / name)),
                                     config, teacher_model, model, tiny_adaptor, tiny_adaptor)
        with distiller:
            distiller.train(optimizer(model), loader, num_epochs=1)
    for got, want in ((assistant, assistant_by_hand), (student, student_by_hand)):
        for key, value in want.state_dict().items():
            assert torch.equal(got.state_dict()[key], value), key


def test_the_assistant_chain_rejects_a_bad_chain(tmp_path):
    teacher, student = _models()
    config = TrainingConfig(device="cpu", output_dir=str(tmp_path))
    optimizer = lambda model: torch.optim.SGD(model.parameters(), lr=0.1)  # noqa: E731
    with pytest.raises(ValueError, match="at least one student"):
        distil_through_assistants(config, DistillationConfig(), [(teacher, tiny_adaptor)],
                                  optimizer, [])
    with pytest.raises(ValueError, match="cannot teach itself"):
        distil_through_assistants(config, DistillationConfig(),
                                  [(teacher, tiny_adaptor), (teacher, tiny_adaptor)], optimizer, [])
    with pytest.raises(ValueError, match="one per link"):
        distil_through_assistants(config, [DistillationConfig()] * 2,
                                  [(teacher, tiny_adaptor), (student, tiny_adaptor)], optimizer, [])
    with pytest.raises(ValueError, match="resume_from='latest'"):
        distil_through_assistants(
            TrainingConfig(device="cpu", output_dir=str(tmp_path), resume_from="gs2.pkl"),
            DistillationConfig(), [(teacher, tiny_adaptor), (student, tiny_adaptor)],
            optimizer, [])
    with pytest.raises(TypeError, match=r"chain\[1\]\[1\] must be the adaptor"):
        distil_through_assistants(config, DistillationConfig(),
                                  [(teacher, tiny_adaptor), (student, "adaptor")], optimizer, [])
    with pytest.raises(TypeError, match=r"chain\[1\]"):
        distil_through_assistants(config, DistillationConfig(), [(teacher, tiny_adaptor), student],
                                  optimizer, [])


def test_mixing_weights_follow_beta_alpha_alpha():
    # Beta(1, 1) is uniform: mean 1/2, variance 1/12; Beta(0.2, 0.2) piles up near 0 and 1
    batch = {"features": torch.randn(4, 3)}
    uniform, peaked = FunctionMatching(seed=0), FunctionMatching(alpha=0.2, seed=0)
    draws = []
    for matching in (uniform, peaked):
        weights = []
        for _ in range(4000):
            matching(batch)
            weights.append(matching.last_weight)
        draws.append(torch.tensor(weights))
    assert abs(draws[0].mean().item() - 0.5) < 0.02 and abs(draws[0].var().item() - 1 / 12) < 0.005
    # Beta(a, a) has variance 1 / (4 (2a + 1)): 0.1786 at a = 0.2
    assert abs(draws[1].var().item() - 1 / (4 * 1.4)) < 0.01


def test_function_matching_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="labels='keep'"):
        FunctionMatching(0)((torch.randn(4, 3), torch.arange(4)))
    mixed = FunctionMatching(0, labels="keep", seed=0)((torch.randn(4, 3), torch.arange(4)))
    assert torch.equal(mixed[1], torch.arange(4)) and isinstance(mixed, tuple)
    with pytest.raises(ValueError, match="CachedTeacher"):
        FunctionMatching()({"features": torch.randn(4, 3), "view_id": torch.arange(4)})
    single = FunctionMatching()({"features": torch.randn(1, 3), "labels": torch.tensor([1])})
    assert "labels" not in single  # every batch loses its labels, mixed or not
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mixup(torch.randn(2, 3), torch.tensor([1, 0]), 1.5)


def test_cached_teacher_keeps_the_output_type_and_computes_a_repeated_view_once():
    outputs_module = pytest.importorskip("transformers.modeling_outputs")

    class HFStyle(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x):
            logits = self.linear(x)
            return outputs_module.SequenceClassifierOutput(logits=logits,
                                                           hidden_states=(x, logits))

    teacher = HFStyle().eval()
    cached = CachedTeacher(teacher, keys=["logits"])
    x = torch.randn(3, 3)
    served = cached(x=x[[0, 1, 0]], view_id=torch.tensor([5, 6, 5]))
    assert isinstance(served, outputs_module.SequenceClassifierOutput)
    assert served.hidden_states is None  # not in keys: not cached
    assert torch.allclose(served.logits, teacher(x[[0, 1, 0]]).logits, atol=1e-6, rtol=0)
    assert cached.rows_computed == 2 and len(cached) == 2
    teacher.train()
    with pytest.raises(RuntimeError, match="train mode"):
        cached(x=x, view_id=torch.tensor([7, 8, 9]))
    with pytest.raises(KeyError, match="'scores'"):
        CachedTeacher(teacher.eval(), keys=["scores"])(x=x, view_id=torch.tensor([1, 2, 3]))
