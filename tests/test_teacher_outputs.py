"""Teacher sources for the classifier distillers and schemes (textbrewer.teachers.outputs):
training from a source with model_T=None equals training against the live teacher."""
import json
import os

import pytest
import torch

from textbrewer import (BasicDistiller, DistillationConfig, GeneralDistiller,
                        MultiTeacherDistiller, TrainingConfig)
from textbrewer.cache import IndexedDataset
from textbrewer.schemes import AdversarialDistiller
from textbrewer.teachers import (CachedOutputs, LocalOutputs, MixtureOutputs, RoutedOutputs,
                                 TeacherOutputsCollator, write_teacher_outputs)
from textbrewer.testing import TinyTransformer, make_classification_data, tiny_adaptor

MATCH = [{"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
          "proj": ["linear", 8, 16]}]


def dataset(count=12, seed=1):
    data = make_classification_data(count, length=6, vocab_size=12, seed=seed)
    return [{key: value[i] for key, value in data.items()} for i in range(count)]


def model(seed, hidden=16, layers=2):
    torch.manual_seed(seed)
    return TinyTransformer(vocab_size=12, hidden_size=hidden, num_layers=layers)


def flat_forward(teacher, batch):
    """The teacher's outputs as (B, ...) tensors: logits and the hidden state of layer 2."""
    outputs = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return {"logits": outputs["logits"], "hidden_2": outputs["hidden_states"][2]}


def cached_adaptor(batch, outputs):
    return {"logits": outputs["logits"], "hidden": [None, None, outputs["hidden_2"]],
            "inputs_mask": batch["attention_mask"]}


def train(tmp_path, name, distiller_class, model_T, loader, adaptor_T=tiny_adaptor,
          matches=(), **options):
    student = model(5, hidden=8, layers=1)
    config = DistillationConfig(temperature=2.0, hard_label_weight=0.5,
                                **({"intermediate_matches": list(matches)} if matches else {}))
    distiller = distiller_class(
        TrainingConfig(device="cpu", output_dir=str(tmp_path / name), log_dir=None), config,
        model_T, student, adaptor_T, tiny_adaptor, **options)
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1), loader, num_epochs=2)
    return student.state_dict()


def assert_same(got, want, rtol=1e-6, atol=1e-7):
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=atol, msg=key)


def loader_of(examples, collate_fn=None, shuffle=False):
    generator = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(examples, batch_size=4, shuffle=shuffle,
                                       generator=generator, collate_fn=collate_fn)


def test_a_local_source_trains_like_the_live_teacher(tmp_path):
    teacher = model(0).eval()
    live = train(tmp_path, "live", GeneralDistiller, teacher, loader_of(dataset()),
                 matches=MATCH)
    source = LocalOutputs(teacher, forward=flat_forward)
    sourced = train(tmp_path, "source", GeneralDistiller, None,
                    loader_of(dataset(), TeacherOutputsCollator(source)), cached_adaptor,
                    matches=MATCH)
    assert_same(sourced, live)
    assert teacher.training is False


def test_cached_outputs_in_a_shuffled_order_train_like_the_live_teacher(tmp_path):
    teacher = model(0).eval()
    manifest = write_teacher_outputs(teacher, dataset(), str(tmp_path / "cache"),
                                     keys=("logits", "hidden_2"), forward=flat_forward,
                                     batch_size=5)
    assert manifest["count"] == 12 and manifest["shapes"] == {"logits": [3],
                                                              "hidden_2": [6, 16]}
    cache = CachedOutputs(str(tmp_path / "cache"))
    live = train(tmp_path, "live", GeneralDistiller, teacher,
                 loader_of(dataset(), shuffle=True), matches=MATCH)
    cached = train(tmp_path, "cached", GeneralDistiller, None,
                   loader_of(IndexedDataset(dataset()), TeacherOutputsCollator(cache),
                             shuffle=True), cached_adaptor, matches=MATCH)
    assert_same(cached, live)
    # the lookup itself, on a batch in another order: the live teacher's values
    examples = [IndexedDataset(dataset())[i] for i in (7, 2, 11)]
    batch = torch.utils.data.default_collate([{k: v for k, v in e.items()
                                               if k != "example_index"} for e in examples])
    with torch.no_grad():
        want = flat_forward(teacher, batch)
    got = cache.outputs(batch, examples)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_the_cache_refuses_changed_data_and_unknown_examples(tmp_path):
    teacher = model(0)
    write_teacher_outputs(teacher, dataset(), str(tmp_path / "cache"))
    cache = CachedOutputs(str(tmp_path / "cache"))
    changed = IndexedDataset(dataset())[3]
    changed["input_ids"] = (changed["input_ids"] + 1) % 12
    with pytest.raises(ValueError, match=r"example 3's 'input_ids' differs from the data"):
        cache.outputs({}, [changed])
    with pytest.raises(ValueError, match=r"example_index 12 is outside the cache \(12 "):
        cache.outputs({}, [{**dataset()[0], "example_index": 12}])
    with pytest.raises(ValueError, match=r"example 0 of the batch has no 'example_index'; "
                                         r"wrap the dataset in IndexedDataset"):
        cache.outputs({}, [dataset()[0]])
    with pytest.raises(ValueError, match=r"holds no teacher outputs"):
        CachedOutputs(str(tmp_path))


def test_writing_is_atomic_and_refuses_what_it_cannot_store(tmp_path):
    teacher = model(0)
    path = str(tmp_path / "cache")
    write_teacher_outputs(teacher, dataset(), path)
    before = json.load(open(os.path.join(path, "outputs_manifest.json")))
    with pytest.raises(ValueError, match=r"is not empty; pass overwrite=True"):
        write_teacher_outputs(teacher, dataset(), path)

    def failing(model_, batch):
        if batch["input_ids"].shape[0] < 4:  # the last, short batch
            raise RuntimeError("the teacher fell over")
        return model_(**batch)
    with pytest.raises(RuntimeError, match="fell over"):
        write_teacher_outputs(teacher, dataset(10), path, batch_size=4, forward=failing,
                              overwrite=True)
    assert json.load(open(os.path.join(path, "outputs_manifest.json"))) == before
    assert sorted(os.listdir(tmp_path)) == ["cache"]  # no staging folder left behind

    def ragged(model_, batch):
        length = 5 + int(batch["input_ids"][0, 0] >= 4)
        return {"logits": torch.zeros(batch["input_ids"].shape[0], length)}
    with pytest.raises(ValueError, match=r"output 'logits': examples 4\.\.7 give shape "
                                         r"\(\d,\), earlier ones \(\d,\); every example"):
        write_teacher_outputs(teacher, [{"input_ids": torch.tensor([i, 0])} for i in range(8)],
                              str(tmp_path / "ragged"), batch_size=4, forward=ragged)


def test_an_equal_logit_mixture_is_the_multi_teacher_distillers_target(tmp_path):
    """MixtureOutputs(mode='logits') with equal weights + BasicDistiller = the live
    MultiTeacherDistiller (the mean of the teachers' logits)."""
    teachers = [model(0).eval(), model(1).eval()]
    live = train(tmp_path, "live", MultiTeacherDistiller, teachers, loader_of(dataset()))
    source = MixtureOutputs([LocalOutputs(t, keys=("logits",)) for t in teachers])
    mixed = train(tmp_path, "mixed", BasicDistiller, None,
                  loader_of(dataset(), TeacherOutputsCollator(source)),
                  lambda batch, outputs: {"logits": outputs["logits"]})
    assert_same(mixed, live)


def test_a_probability_mixture_by_hand():
    class Fixed:
        def __init__(self, logits):
            self.logits = torch.tensor(logits)

        def outputs(self, batch, examples):
            return {"logits": self.logits}
    a, b = [[0.0, 1.0, 2.0]], [[3.0, 0.0, -1.0]]
    mixed = MixtureOutputs([Fixed(a), Fixed(b)], weights=[3, 1],
                           mode="probabilities").outputs({}, [])["logits"]
    want = 0.75 * torch.tensor(a).softmax(-1) + 0.25 * torch.tensor(b).softmax(-1)
    torch.testing.assert_close(mixed.softmax(-1), want)
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(1))  # already log-probs
    averaged = MixtureOutputs([Fixed(a), Fixed(b)], weights=[3, 1]).outputs({}, [])["logits"]
    torch.testing.assert_close(averaged, torch.tensor([[0.75, 0.75, 1.25]]))
    with pytest.raises(ValueError, match=r"mode must be one of \['logits', 'probabilities'\]"):
        MixtureOutputs([Fixed(a)], mode="mean")
    with pytest.raises(ValueError, match=r"weights must be finite, ≥ 0 and not all 0"):
        MixtureOutputs([Fixed(a), Fixed(b)], weights=[0, 0])


def test_routing_by_key_puts_each_answer_back_in_its_row():
    teachers = {"a": LocalOutputs(model(0), keys=("logits",)),
                "b": LocalOutputs(model(1), keys=("logits",))}
    examples = [{**example, "task": task} for example, task in zip(dataset(5), "abbab")]
    batch = torch.utils.data.default_collate([{k: v for k, v in e.items() if k != "task"}
                                              for e in examples])
    routed = RoutedOutputs(teachers, key="task").outputs(batch, examples)["logits"]
    for row, task in enumerate("abbab"):
        want = teachers[task].outputs({k: v[row:row + 1] for k, v in batch.items()})["logits"]
        torch.testing.assert_close(routed[row:row + 1], want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"example 1 of the batch routes to 'c' \(field "
                                         r"'task'\); routes: \['a', 'b'\]"):
        RoutedOutputs(teachers).outputs(batch, [examples[0], {"task": "c"}])


def test_the_adversarial_scheme_trains_from_a_source(tmp_path):
    teacher = model(0).eval()
    options = dict(input_dim=3, hidden_size=8, adversarial_weight=0.5)
    torch.manual_seed(3)
    live = train(tmp_path, "live", AdversarialDistiller, teacher, loader_of(dataset()),
                 **options)
    torch.manual_seed(3)
    sourced = train(tmp_path, "source", AdversarialDistiller, None,
                    loader_of(dataset(), TeacherOutputsCollator(LocalOutputs(
                        teacher, forward=flat_forward))), cached_adaptor, **options)
    assert_same(sourced, live)


def test_no_teacher_and_no_outputs_is_an_error_that_says_so(tmp_path):
    with pytest.raises(ValueError, match=r"model_T is None and the batch carries no "
                                         r"'teacher_cache'"):
        train(tmp_path, "none", GeneralDistiller, None, loader_of(dataset()))


def test_two_view_batches_give_the_source_the_teachers_view(tmp_path):
    """Cross-modal batches ({'teacher', 'student'}): the source runs on the teacher's view
    (the whole sequence) while the student sees its own (the first four tokens)."""
    from textbrewer.schemes import TwoViewCollate

    def short(example):
        return {"input_ids": example["input_ids"][:4],
                "attention_mask": example["attention_mask"][:4], "labels": example["labels"]}
    teacher = model(0).eval()
    views = TwoViewCollate(student_view=short)
    live = train(tmp_path, "live", GeneralDistiller, teacher, loader_of(dataset(), views))
    source = TeacherOutputsCollator(LocalOutputs(teacher, keys=("logits",)), collate_fn=views)
    sourced = train(tmp_path, "source", GeneralDistiller, None, loader_of(dataset(), source),
                    lambda batch, outputs: {"logits": outputs["logits"]})
    assert_same(sourced, live)


def test_routes_must_agree_and_per_example_lists_are_split():
    class Echo:
        def __init__(self, keys):
            self.keys, self.seen = keys, []

        def outputs(self, batch, examples):
            self.seen.append(list(batch["names"]))
            size = batch["input_ids"].shape[0]
            return {key: torch.zeros(size, 2) for key in self.keys}
    batch = {"input_ids": torch.zeros(3, 4), "names": ["x", "y", "z"]}
    examples = [{"task": task} for task in "abb"]
    a, b = Echo(["logits"]), Echo(["logits"])
    RoutedOutputs({"a": a, "b": b}).outputs(batch, examples)
    assert a.seen == [["x"]] and b.seen == [["y", "z"]]
    with pytest.raises(ValueError, match=r"route 'b' gives the outputs \['logits'\], route "
                                         r"'a' \['hidden', 'logits'\]: every route must give"):
        RoutedOutputs({"a": Echo(["logits", "hidden"]), "b": Echo(["logits"])}).outputs(
            batch, examples)


def test_overwriting_replaces_the_cache_and_a_failed_swap_restores_it(tmp_path, monkeypatch):
    path = str(tmp_path / "cache")
    write_teacher_outputs(model(0), dataset(), path)
    first = CachedOutputs(path).outputs({}, [IndexedDataset(dataset())[0]])["logits"]
    write_teacher_outputs(model(1), dataset(), path, overwrite=True)
    second = CachedOutputs(path).outputs({}, [IndexedDataset(dataset())[0]])["logits"]
    assert not torch.equal(first, second) and sorted(os.listdir(tmp_path)) == ["cache"]
    real_rename, calls = os.rename, []

    def second_rename_fails(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise OSError("disk gone")
        real_rename(source, target)
    monkeypatch.setattr(os, "rename", second_rename_fails)
    with pytest.raises(OSError, match="disk gone"):
        write_teacher_outputs(model(2), dataset(), path, overwrite=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert sorted(os.listdir(tmp_path)) == ["cache"]
    torch.testing.assert_close(
        CachedOutputs(path).outputs({}, [IndexedDataset(dataset())[0]])["logits"], second)
