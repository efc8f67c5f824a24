"""Bad inputs, tried as a new user would: each is a clear error that names what is wrong
(the key, the match, the shapes, the valid choices), raised before the first optimizer
step, and a failing run leaves every file already written as it was; silent nonsense
warns instead.

A "before the first step" case runs in an output_dir that already holds a previous run's
checkpoints (``gs2``/``gs4``, weights and training states), and checks that the student's
parameters, the optimizer's state and every byte of those files are unchanged.
"""
import hashlib
import logging
import os
import shutil

import pytest
import torch
from torch import nn

from textbrewer import (AdaptorError, DistillationConfig, GeneralDistiller, IntermediateMatch,
                        TrainingConfig)
from textbrewer.cache import CachedTeacherCollator, TeacherCache, write_teacher_cache
from textbrewer.capture import ModuleCapture
from textbrewer.distillers.basic import BasicDistiller
from textbrewer.distillers.engine import Phase
from textbrewer.distillers.lm import CausalLMDistiller, LMDistillationConfig
from textbrewer.schemes import (AdversarialDistiller, DeepInversionSynthesizer, DFADDistiller,
                                MLPGenerator, MutualLearningDistiller, SelfDistiller,
                                SyntheticBatch, WeightedMultiTeacherDistiller)
from textbrewer.testing import TinyTransformer, make_classification_data, tiny_adaptor


# ---------------------------------------------------------------- helpers
def _loader(num_examples=16, batch_size=4):
    data = make_classification_data(num_examples, length=6, vocab_size=12)
    rows = [{key: value[i] for key, value in data.items()} for i in range(num_examples)]
    return torch.utils.data.DataLoader(rows, batch_size=batch_size)


def _models(hidden_T=16, hidden_S=8, layers_S=1):
    torch.manual_seed(0)
    teacher = TinyTransformer(vocab_size=12, hidden_size=hidden_T, num_layers=2)
    student = TinyTransformer(vocab_size=12, hidden_size=hidden_S, num_layers=layers_S)
    return teacher, student


def _config(output_dir, **overrides):
    return TrainingConfig(device="cpu", output_dir=str(output_dir), **overrides)


def _general(output_dir, distill=None, adaptor_S=tiny_adaptor, adaptor_T=tiny_adaptor,
             models=None, **train):
    teacher, student = models or _models()
    distiller = GeneralDistiller(_config(output_dir, **train),
                                 DistillationConfig(**(distill or {})), teacher, student,
                                 adaptor_T, adaptor_S)
    return distiller, student, torch.optim.AdamW(student.parameters(), lr=1e-2)


def _digest(folder):
    """relative path -> sha256 of every file under ``folder``."""
    result = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                result[os.path.relpath(path, folder)] = hashlib.sha256(handle.read()).hexdigest()
    return result


def _weights(module):
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _unchanged(before, module):
    after = module.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _messages(caplog):
    return [record.getMessage() for record in caplog.records
            if record.name == "textbrewer" and record.levelno == logging.WARNING]


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory):
    """A finished run's folder: gs2/gs4 weights and training states."""
    folder = tmp_path_factory.mktemp("previous")
    distiller, _, optimizer = _general(folder, ckpt_steps=2, keep_train_states=None)
    with distiller:
        distiller.train(optimizer, _loader(), num_steps=4)
    assert sorted(os.listdir(folder)) == ["gs2.pkl", "gs2.train_state.pt", "gs4.pkl",
                                          "gs4.train_state.pt"]
    return folder


@pytest.fixture
def output_dir(previous_run, tmp_path):
    """A copy of the previous run's folder, for a run that must leave it as it is."""
    folder = tmp_path / "out"
    shutil.copytree(previous_run, folder)
    return folder


# ---------------------------------------------------------------- 1. configurations
_HIDDEN = {"layer_T": 1, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse"}


@pytest.mark.parametrize("make, error, pattern", [
    # a dict instead of a list of dicts
    (lambda: DistillationConfig(intermediate_matches=dict(_HIDDEN)), ValueError,
     r"intermediate_matches must be a list of dicts \(or IntermediateMatch\), one per match, "
     r"got a dict \{'layer_T': 1, .*wrap a single match in a list"),
    (lambda: DistillationConfig(intermediate_matches=IntermediateMatch(layer_T=0, layer_S=0)),
     ValueError, r"must be a list of dicts .*got a IntermediateMatch.*wrap a single match"),
    (lambda: DistillationConfig(intermediate_matches="L3_hidden_mse"), ValueError,
     r"got a str 'L3_hidden_mse'; for the preset, write intermediate_matches="
     r"textbrewer\.MATCHES\['L3_hidden_mse'\]"),
    # schedules given as lists with their parameters
    (lambda: DistillationConfig(temperature_scheduler=["flsw", 1]), ValueError,
     r"temperature scheduler 'flsw' is written \['flsw', beta, gamma\] \(its parameters: "
     r"beta, gamma, eps=0\.0001, \*ignored\); got \['flsw', 1\]: missing a required "
     r"argument: 'gamma'"),
    (lambda: DistillationConfig(temperature_scheduler=["flsw", {"beta": 1}]), ValueError,
     r"'flsw' is written \['flsw', beta, gamma\].*missing a required argument: 'gamma'"),
    (lambda: DistillationConfig(temperature_scheduler=["flsw", "a", "b"]), ValueError,
     r"temperature_scheduler=\['flsw', 'a', 'b'\]: flsw: beta must be a finite number, "
     r"got 'a'"),
    (lambda: DistillationConfig(temperature_scheduler=["cwsm", None]), ValueError,
     r"cwsm: beta must be a finite number, got None"),
    (lambda: DistillationConfig(kd_loss_weight_scheduler=["warmup", 2]), ValueError,
     r"kd_loss_weight_scheduler=\['warmup', 2\]: warmup: fraction must be a number in "
     r"\(0, 1\], got 2"),
    (lambda: DistillationConfig(kd_loss_weight_scheduler=["warmup", 0.1, 0.2]), ValueError,
     r"weight scheduler 'warmup' is written \['warmup', fraction\].*too many positional"),
    # an empty output_dir
    (lambda: TrainingConfig(device="cpu", output_dir=""), ValueError,
     r"output_dir='' is not a folder; give the folder for the gs\{N\}\.pkl checkpoints, e\.g\. "
     r"output_dir='\./saved_models' \(the default\), or output_dir='\.'"),
])
def test_configuration_errors_name_the_key_and_the_form(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()


def test_a_correct_schedule_list_still_builds():
    config = DistillationConfig(temperature_scheduler=["flsw", 1, 2],
                                kd_loss_weight_scheduler=["warmup", 0.5])
    assert config.temperature_scheduler == ["flsw", 1, 2]


# ---------------------------------------------------------------- 2. before the first step
class MLP(nn.Module):
    def __init__(self, inputs=4, outputs=3, batch_norm=False):
        super().__init__()
        self.linear = nn.Linear(inputs, outputs)
        self.norm = nn.BatchNorm1d(outputs) if batch_norm else None

    def forward(self, x):
        y = self.linear(x)
        return self.norm(y) if self.norm is not None else y


def _vectors():
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 4, generator=generator),) for _ in range(4)]


def _logits_adaptor(batch, outputs):
    return {"logits": outputs}


class _Scheme(BasicDistiller):
    """A scheme whose extra phases a case gives (``extra(distiller, student_phase)``)."""

    def __init__(self, output_dir, extra):
        torch.manual_seed(0)
        super().__init__(_config(output_dir), DistillationConfig(), MLP(), MLP(),
                         _logits_adaptor, _logits_adaptor)
        self.extra = extra

    def phases(self, student_phase):
        return self.extra(self, student_phase)


def _phase(name="d", module=None, optimizer=None, loss=None, modules=None, **options):
    module = module or MLP(3, 1)
    return Phase(name, optimizer or torch.optim.AdamW(module.parameters()),
                 loss or (lambda batch, args: module(torch.randn(2, 3)).sum()),
                 [module] if modules is None else modules, **options)


def _holding_the_student(distiller):
    module = MLP(3, 1)
    both = [*module.parameters(), *distiller.model_S.parameters()]
    return _phase(module=module, optimizer=torch.optim.AdamW(both))


class _LM(nn.Module):
    """A tiny causal LM: (B, L) ids -> (B, L, V) logits."""

    def __init__(self, vocab=11, width=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.embed(input_ids))

    def get_output_embeddings(self):
        return self.head


def _lm_batches(**extra):
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 11, (4, 5), generator=generator), **extra}
            for _ in range(2)]


class NoneOutput(nn.Module):
    def forward(self, x):
        return None


def _case_general(distill=None, adaptor_S=tiny_adaptor, adaptor_T=tiny_adaptor, train=None,
                  resume_from=None):
    def build(output_dir):
        resume = resume_from(output_dir) if callable(resume_from) else resume_from
        distiller, student, optimizer = _general(output_dir, distill, adaptor_S, adaptor_T,
                                                 resume_from=resume)
        return distiller, student, optimizer, _loader(), dict(train or {})
    return build


def _with(key, change):
    """tiny_adaptor, with ``change(result)`` applied."""
    def adaptor(batch, outputs):
        result = tiny_adaptor(batch, outputs)
        change(result)
        return result
    return adaptor


def _hidden_as_attention(result):
    result["attention"] = result["hidden"]


def _no_inputs_mask(result):
    result.pop("inputs_mask")


def _logits_on_meta(result):
    result["logits"] = result["logits"].to("meta")


def _case_scheme(extra):
    def build(output_dir):
        distiller = _Scheme(output_dir, extra)
        student = distiller.model_S
        return distiller, student, torch.optim.AdamW(student.parameters()), _vectors(), {}
    return build


def _case_module_capture(module_T, module_S):
    def build(output_dir):
        teacher, student = _models()
        student.extra = NoneOutput()
        forward = student.forward

        def forward_with_extra(*args, **kwargs):
            outputs = forward(*args, **kwargs)
            student.extra(outputs["logits"])
            return outputs
        student.forward = forward_with_extra
        match = {"module_T": module_T, "module_S": module_S, "loss": "hidden_mse"}
        distiller, student, optimizer = _general(output_dir, {"intermediate_matches": [match]},
                                                 models=(teacher, student))
        return distiller, student, optimizer, _loader(), {}
    return build


def _case_adversarial(**options):
    def build(output_dir):
        torch.manual_seed(0)
        student = MLP()
        distiller = AdversarialDistiller(_config(output_dir), DistillationConfig(), MLP(), student,
                                         _logits_adaptor, _logits_adaptor, **options)
        return distiller, student, torch.optim.AdamW(student.parameters()), _vectors(), {}
    return build


def _case_dfad(generator):
    def build(output_dir):
        torch.manual_seed(0)
        student = MLP()
        distiller = DFADDistiller(_config(output_dir), DistillationConfig(), MLP(), student,
                                  generator=generator, batch_size=4)
        return distiller, student, torch.optim.AdamW(student.parameters()), None, \
            {"num_steps": 2}
    return build


def _case_deep_inversion(targets):
    def build(output_dir):
        torch.manual_seed(0)
        batch = SyntheticBatch(torch.randn(4, 4), targets)
        distiller = DeepInversionSynthesizer(_config(output_dir), MLP(batch_norm=True), batch)
        return distiller, batch, torch.optim.AdamW(batch.parameters()), None, {"num_steps": 2}
    return build


def _case_self(adaptor, **options):
    def build(output_dir):
        torch.manual_seed(0)
        model = MLP()
        distiller = SelfDistiller(_config(output_dir), DistillationConfig(), model, adaptor,
                                  **options)
        return distiller, model, torch.optim.AdamW(model.parameters()), _vectors(), {}
    return build


def _case_weighted(**options):
    def build(output_dir):
        torch.manual_seed(0)
        student = MLP()
        distiller = WeightedMultiTeacherDistiller(_config(output_dir), DistillationConfig(),
                                                  [MLP(), MLP()], student, _logits_adaptor,
                                                  _logits_adaptor, **options)
        return distiller, student, torch.optim.AdamW(student.parameters()), _vectors(), {}
    return build


def _case_lm(batches, teacher=True, lm=None, **options):
    def build(output_dir):
        torch.manual_seed(0)
        student = _LM()
        distiller = CausalLMDistiller(_config(output_dir), DistillationConfig(),
                                      _LM() if teacher else None, student,
                                      lm_config=LMDistillationConfig(**(lm or {})), **options)
        return distiller, student, torch.optim.AdamW(student.parameters()), batches, \
            {"num_steps": 2}
    return build


def _callback_model_only(model):
    pass


BEFORE_FIRST_STEP = {
    # train()'s own arguments
    "callback without step": (
        _case_general(train={"callback": _callback_model_only}), TypeError,
        r"callback _callback_model_only\(model\) cannot be called as callback\(model=student, "
        r"step=global_step\) \(got an unexpected keyword argument 'step'\); give it the "
        r"parameters model and step, e\.g\. def callback\(model, step\): \.\.\., or accept "
        r"\*\*kwargs"),
    "callback with other names": (
        _case_general(train={"callback": lambda m: None}), TypeError,
        r"callback .*<lambda>\(m\) cannot be called as callback\(model=student, "
        r"step=global_step\) \(missing a required argument: 'm'\)"),
    "callback not callable": (
        _case_general(train={"callback": "evaluate"}), TypeError,
        r"callback must be a function called as callback\(model=student, step=global_step\), "
        r"got str 'evaluate'"),
    "max_grad_norm a string": (
        _case_general(train={"max_grad_norm": "1.0"}), ValueError,
        r"max_grad_norm must be a number \(<= 0: no clipping\), got '1\.0'"),
    "batch_postprocessor not callable": (
        _case_general(train={"batch_postprocessor": 3}), TypeError,
        r"batch_postprocessor must be a function batch -> batch, got int"),
    "scheduler_args typo": (
        _case_general(train={"scheduler_class": torch.optim.lr_scheduler.StepLR,
                             "scheduler_args": {"step": 1}}), TypeError,
        r"scheduler_class StepLR could not be built as StepLR\(optimizer=optimizer, "
        r"\*\*scheduler_args\) with scheduler_args=\{'step': 1\}: .*unexpected keyword "
        r"argument 'step'"),
    # resume_from names a folder
    "resume_from a folder": (
        _case_general(resume_from=str), ValueError,
        r"resume_from='.*out' is a folder; resume_from takes one of the training-state files "
        r"\(gs\{N\}\.train_state\.pt\).*It holds 2 training state\(s\): '.*gs4\.train_state\.pt', "
        r"'.*gs2\.train_state\.pt'; e\.g\. resume_from='.*gs4\.train_state\.pt' \(the newest\), "
        r"or TrainingConfig\(output_dir='.*out', resume_from='latest'\)"),
    # the adaptors' outputs
    "attention loss on hidden states": (
        _case_general(distill={"intermediate_matches": [
            {"layer_T": 1, "layer_S": 1, "feature": "hidden", "loss": "attention_mse"}]}),
        AdaptorError,
        r"intermediate_matches\[0\] \(hidden, attention_mse, layer_T=1, layer_S=1\): loss "
        r"'attention_mse' compares attention maps of shape \(batch, heads, len, len\) or "
        r"\(batch, len, len\), but the student's hidden has shape \(4, 6, 8\) \(student "
        r"\(4, 6, 8\), teacher \(4, 6, 16\)\): these look like hidden states"),
    "attention key holding hidden states, no inputs_mask": (
        _case_general(distill={"intermediate_matches": [
            {"layer_T": 1, "layer_S": 1, "feature": "attention", "loss": "attention_ce"}]},
            adaptor_S=_with("attention", lambda r: (_hidden_as_attention(r),
                                                    _no_inputs_mask(r))),
            adaptor_T=_with("attention", lambda r: (_hidden_as_attention(r),
                                                    _no_inputs_mask(r)))), AdaptorError,
        r"intermediate_matches\[0\] \(attention, attention_ce, layer_T=1, layer_S=1\): .*"
        r"the student's attention has shape \(4, 6, 8\).*the adaptor's 'attention' should "
        r"hold the attention maps"),
    "logits on another device": (
        _case_general(adaptor_S=_with("logits", _logits_on_meta)), AdaptorError,
        r"'logits' head 0: the student's adaptor returned it on meta, the teacher's on cpu; "
        r"the loss needs both on the training device \(TrainingConfig\.device\)"),
    "hidden states on another device": (
        _case_general(distill={"intermediate_matches": [_HIDDEN]},
                      adaptor_T=_with("hidden", lambda r: r.update(
                          hidden=[h.to("meta") for h in r["hidden"]]))), AdaptorError,
        r"intermediate_matches\[0\] \(hidden, hidden_mse, layer_T=1, layer_S=1\): 'hidden': "
        r"the student's adaptor returned it on cpu, the teacher's on meta"),
    "LM logits on another device": (
        _case_lm(_lm_batches(), adaptor_S=lambda batch, outputs: {"logits": outputs.to("meta")}),
        AdaptorError, r"'logits': the student's adaptor returned it on meta, the teacher's on "
                      r"cpu"),
    "match layer out of range": (
        _case_general(distill={"intermediate_matches": [
            {"layer_T": 9, "layer_S": 0, "feature": "hidden", "loss": "hidden_mse"}]}),
        AdaptorError, r"intermediate_matches\[0\]: layer_T=9 but the teacher's adaptor "
                      r"returned 3 hidden entries \(valid: 0\.\.2\)"),
    # capture by module name
    "module name typo": (
        _case_module_capture("layers.1", "layers.9"), ValueError,
        r"intermediate_matches\[0\]: module_S='layers\.9': the student \(TinyTransformer\) "
        r"has no submodule 'layers\.9'; closest: \['layers\.0'"),
    "captured module gives no tensor": (
        _case_module_capture("classifier", "extra"), TypeError,
        r"the student's module 'extra' \(NoneOutput\) gave no tensor as its output \(it was a "
        r"NoneType\)"),
    "captured widths differ": (
        _case_module_capture("classifier", "layers.0"), AdaptorError,
        r"intermediate_matches\[0\] \(hidden_mse, module_T='classifier', module_S='layers\.0'\)"
        r": student \(4, 6, 8\) and teacher \(4, 3\) do not fit this loss"),
    # phases of a scheme
    "phases without the student's": (
        _case_scheme(lambda self, student: [_phase()]), ValueError,
        r"_Scheme\.phases\(\) must return the student phase it was given exactly once.*"
        r"it returned 0 times the student phase, in \['d'\]"),
    "phases not Phase objects": (
        _case_scheme(lambda self, student: [student, "discriminator"]), TypeError,
        r"_Scheme\.phases\(\) must return a list of Phase objects"),
    "phase names repeat": (
        _case_scheme(lambda self, student: [_phase(), _phase(), student]), ValueError,
        r"phase names must differ, got \['d', 'd', 'student'\]"),
    "phase named with a slash": (
        _case_scheme(lambda self, student: [_phase("d/1"), student]), ValueError,
        r"a phase's name must be a non-empty string without '/'.*got 'd/1'"),
    "phase optimizer a string": (
        _case_scheme(lambda self, student: [_phase(optimizer="adam"), student]), TypeError,
        r"phase 'd': its optimizer must be a torch\.optim\.Optimizer, got str"),
    "phase loss None": (
        _case_scheme(lambda self, student: [
            Phase("d", torch.optim.AdamW(MLP().parameters()), None, [MLP()]), student]),
        TypeError, r"phase 'd': loss must be a function \(batch, args\) -> loss"),
    "phase modules not a list": (
        _case_scheme(lambda self, student: [_phase(modules=MLP()), student]), TypeError,
        r"phase 'd': modules must be a list of nn\.Module objects, e\.g\. "
        r"modules=\[discriminator\], got MLP"),
    "phase optimizer over other parameters": (
        _case_scheme(lambda self, student: [
            _phase(optimizer=torch.optim.AdamW(MLP().parameters())), student]), ValueError,
        r"phase 'd': its optimizer holds none of the parameters of its modules \['MLP'\] "
        r"\(2 others\), so this phase would change nothing"),
    "phase optimizer holds the student": (
        _case_scheme(lambda self, student: [_holding_the_student(self), student]),
        ValueError, r"phase 'd': its optimizer holds 2 parameters of the student"),
    "phase max_grad_norm a string": (
        _case_scheme(lambda self, student: [_phase(max_grad_norm="1"), student]), ValueError,
        r"phase 'd': max_grad_norm must be a number \(<= 0: no clipping\), got '1'"),
    "phase loss returns a float": (
        _case_scheme(lambda self, student: [_phase(loss=lambda batch, args: 1.0), student]),
        TypeError, r"phase 'd': its loss returned float, expected a loss tensor"),
    # schemes
    "adversarial input_dim": (
        _case_adversarial(input_dim=5), AdaptorError,
        r"AdversarialDistiller: the discriminator takes rows of width 5 \(input_dim\), but "
        r"the logits rows it is given are \(4, 3\) \(index=-1\); set input_dim=3"),
    "adversarial index": (
        _case_adversarial(input_dim=3, index=2), AdaptorError,
        r"AdversarialDistiller: index=2 but the teacher's adaptor returned 1 logits entries"),
    "DFAD generator of the wrong width": (
        _case_dfad(MLPGenerator(2, 5)), ValueError,
        r"DFADDistiller: the teacher failed on the generator's output of shape \(4, 5\) "
        r"\(mat1 and mat2 shapes cannot be multiplied.*\); the generator must produce the "
        r"inputs the models take"),
    "DeepInversion targets outside the classes": (
        _case_deep_inversion(torch.full((4,), 7)), ValueError,
        r"SyntheticBatch targets must be classes in \[0, 3\) of the teacher's logits "
        r"\(4, 3\), got \[7, 7, 7, 7\]"),
    "self-distillation with one exit": (
        _case_self(lambda batch, outputs: {"logits": [outputs]}), AdaptorError,
        r"SelfDistiller needs the adaptor to return 'logits' as a list of at least 2 exits"),
    "self-distillation without labels": (
        _case_self(lambda batch, outputs: {"logits": [outputs, outputs]}), AdaptorError,
        r"SelfDistiller needs the gold 'labels' \(or 'losses' with one entry per exit\)"),
    "weighted teachers, gold without labels": (
        _case_weighted(weighting="gold"), AdaptorError,
        r"weighting='gold' needs 'labels' from the teachers' adaptor"),
    # LM distillers
    "LM cache rows under another key": (
        _case_lm(_lm_batches(teacher_topk={"topk_ids": torch.zeros(4, 5, 2)}), teacher=False,
                 lm={"cache_key": "teacher_top_k"}), ValueError,
        r"batch\['teacher_topk'\] holds teacher-cache rows, but "
        r"LMDistillationConfig\.cache_key='teacher_top_k': set cache_key='teacher_topk'"),
    "LM without teacher or cache": (
        _case_lm(_lm_batches(), teacher=False), ValueError,
        r"model_T is None and the batch carries no 'teacher_topk' \(teacher cache rows\).*"
        r"the batch has keys \['input_ids'\]"),
    "LM batch key the model does not take": (
        _case_lm(_lm_batches(foo=torch.zeros(4))), TypeError,
        r"the student was called as model\(\*\*batch, \*\*train_kwargs\) with the batch keys "
        r"\['foo', 'input_ids'\].*unexpected keyword argument 'foo'"),
    "LM adaptor logits of rank 2": (
        _case_lm(_lm_batches(), adaptor_S=lambda batch, outputs: {"logits": outputs[:, 0]}),
        ValueError, r"the student's logits have shape \(4, 11\); a token-level loss needs "
                    r"\(batch, length, vocab\) logits"),
    "LM tuple batches": (
        _case_lm([(torch.zeros(4, 5, dtype=torch.long),)] * 2), ValueError,
        r"CausalLMDistiller needs dict batches with 'input_ids' \(B, L\); the student's batch "
        r"is a tuple"),
    "LM topk above the vocabulary": (
        _case_lm(_lm_batches(), lm={"divergence": "topk_kl", "topk": 50, "path": "dense"}),
        ValueError, r"topk=50 is larger than the teacher's vocabulary 11"),
}


@pytest.mark.parametrize("case", list(BEFORE_FIRST_STEP))
def test_fails_before_the_first_step_and_leaves_the_files(case, output_dir):
    build, error, pattern = BEFORE_FIRST_STEP[case]
    files = _digest(output_dir)
    built = {}
    with pytest.raises(error, match=pattern):
        distiller, student, optimizer, loader, train = build(output_dir)  # may raise already
        built.update(student=student, optimizer=optimizer, initial=_weights(student))
        steps = train.pop("num_steps", None)
        with distiller:
            if steps is not None:
                distiller.train(optimizer, loader, num_steps=steps, **train)
            else:
                distiller.train(optimizer, loader, num_epochs=1, **train)
    if built:
        assert _unchanged(built["initial"], built["student"])
        assert not built["optimizer"].state  # AdamW makes its state at the first step
    assert _digest(output_dir) == files


def test_a_failed_fresh_run_leaves_the_older_run_resumable(output_dir):
    """The older run's later states are set aside when a fresh run writes its first
    checkpoint, not when it starts: a fresh run that fails first leaves them in place."""
    def bad(result):
        result["logits"] = result["logits"][:, :2]
    distiller, _, optimizer = _general(output_dir, adaptor_S=_with("logits", bad),
                                       ckpt_steps=2)
    with pytest.raises(AdaptorError, match=r"logits head 0: student logits \(4, 2\)"):
        with distiller:
            distiller.train(optimizer, _loader(), num_steps=4)
    assert not (output_dir / "superseded_train_states").exists()
    distiller, student, optimizer = _general(output_dir, ckpt_steps=2, resume_from="latest")
    with distiller:
        distiller.train(optimizer, _loader(), num_steps=4)  # nothing left to do: complete
    assert sorted(os.listdir(output_dir)) == ["gs2.pkl", "gs2.train_state.pt", "gs4.pkl",
                                              "gs4.train_state.pt"]


@pytest.mark.parametrize("make, error, pattern", [
    (lambda: MutualLearningDistiller(_config("unused"), DistillationConfig(), [MLP(), MLP()],
                                     _logits_adaptor,
                                     optimizers=torch.optim.AdamW(MLP().parameters())),
     TypeError, r"optimizers must be a list with one entry per student after the first "
                r"\(1: students\[1:\]\), e\.g\. optimizers=\[\.\.\.\], got AdamW"),
    (lambda: AdversarialDistiller(_config("unused"), DistillationConfig(), MLP(), MLP(),
                                  _logits_adaptor, _logits_adaptor, input_dim=3,
                                  adversarial_weight="0.1"),
     ValueError, r"adversarial_weight must be a number, got '0\.1'"),
    (lambda: DFADDistiller(_config("unused"), DistillationConfig(), MLP(), MLP(),
                           generator=MLPGenerator(2, 4), generator_optimizer="adam"),
     TypeError, r"generator_optimizer must be a torch\.optim\.Optimizer over the generator's "
                r"parameters \(or None for Adam\), got str"),
    (lambda: DFADDistiller(_config("unused"), DistillationConfig(), MLP(), MLP(),
                           generator=MLPGenerator(2, 4), batch_size=0),
     ValueError, r"batch_size must be an integer >= 1 \(noise vectors per batch\), got 0"),
    (lambda: SelfDistiller(_config("unused"), DistillationConfig(), MLP(), _logits_adaptor,
                           feature_weight=1.0, feature_loss="hidden_mes"),
     ValueError, r"feature_loss: unknown match loss 'hidden_mes'; valid choices: \[.*\] "
                 r"\(did you mean 'hidden_mse'\?\)"),
    (lambda: WeightedMultiTeacherDistiller(_config("unused"), DistillationConfig(),
                                           [MLP(), MLP()], MLP(), _logits_adaptor,
                                           _logits_adaptor, weights=[1, 2, 3]),
     ValueError, r"weights: 3 teacher weights for 2 teachers \(one per teacher"),
    (lambda: ModuleCapture(MLP(), "linear"), TypeError,
     r"names must be a list of submodule names, e\.g\. \['linear'\], got str 'linear'"),
])
def test_construction_errors_name_the_argument(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()


# ---------------------------------------------------------------- 3. silent nonsense warns
def _resumed(output_dir, caplog, lr, schedule=False, distill=None):
    os.remove(output_dir / "gs4.train_state.pt")  # resume from gs2
    distiller, _, _ = _general(output_dir, distill, ckpt_steps=2, keep_train_states=None,
                               resume_from="latest")
    optimizer = torch.optim.AdamW(distiller.model_S.parameters(), lr=lr)
    extra = ({"scheduler_class": torch.optim.lr_scheduler.LambdaLR,
              "scheduler_args": {"lr_lambda": lambda step: 1 - step / 8}} if schedule else {})
    with caplog.at_level(logging.WARNING, logger="textbrewer"), distiller:
        distiller.train(optimizer, _loader(), num_steps=4, **extra)
    return [m for m in _messages(caplog) if "optimizer's settings differ" in m]


def test_resuming_with_another_learning_rate_warns_naming_both(output_dir, caplog):
    warned = _resumed(output_dir, caplog, lr=1e-3)
    assert len(warned) == 1
    assert "param group 0: lr 0.01 in the checkpoint, 0.001 in this run" in warned[0]
    assert "training goes on with the checkpoint's" in warned[0]
    assert "gs2.train_state.pt" in warned[0]


def test_resuming_with_the_same_learning_rate_is_quiet(output_dir, caplog):
    assert _resumed(output_dir, caplog, lr=1e-2) == []


def test_with_an_lr_scheduler_the_starting_rates_are_compared(tmp_path, caplog):
    run, copy = tmp_path / "run", tmp_path / "copy"
    distiller, _, _ = _general(run, ckpt_steps=2, keep_train_states=None)
    optimizer = torch.optim.AdamW(distiller.model_S.parameters(), lr=1e-2)
    with distiller:
        distiller.train(optimizer, _loader(), num_steps=4,
                        scheduler_class=torch.optim.lr_scheduler.LambdaLR,
                        scheduler_args={"lr_lambda": lambda step: 1 - step / 8})
    shutil.copytree(run, copy)
    assert _resumed(run, caplog, lr=1e-2, schedule=True) == []  # the scheduled lr differs
    warned = _resumed(copy, caplog, lr=1e-3, schedule=True)
    assert len(warned) == 1 and "lr (before the LR scheduler) 0.01 in the checkpoint, 0.001 " \
                                "in this run" in warned[0]


def test_a_changed_distillation_config_names_both_values(output_dir, caplog):
    _resumed(output_dir, caplog, lr=1e-2, distill={"temperature": 2})
    changed = [m for m in _messages(caplog) if "DistillationConfig differs" in m]
    assert len(changed) == 1
    assert "['temperature'] (temperature: 4 in the checkpoint, 2 now)" in changed[0]


# ---------------------------------------------------------------- 4. the teacher cache
class _CacheLM(_LM):
    pass


def _cache_data(count=6, labels=True):
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 11, (5,), generator=generator),
             **({"labels": torch.randint(0, 11, (5,), generator=generator)} if labels else {})}
            for _ in range(count)]


@pytest.fixture
def cache_dir(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "cache"
    write_teacher_cache(_CacheLM(), _cache_data(), folder, k=3)
    return folder


@pytest.mark.parametrize("options, error, pattern", [
    ({"k": 50}, ValueError, r"k=50 is larger than the teacher's vocab_size=11"),
    ({"dataset": []}, ValueError, r"the dataset is empty: nothing to cache"),
    ({"dataset": [{"ids": [1, 2]}]}, ValueError,
     r"example 0 of the batch is a dict without input_ids"),
    ({"dataset": _cache_data(labels=False), "positions": "labels"}, ValueError,
     r"positions='labels' needs 'labels' in every batch; this batch has keys "
     r"\['attention_mask', 'input_ids'\]"),
    ({"logits_fn": lambda teacher, batch: teacher(batch["input_ids"])[:, :2]}, ValueError,
     r"logits have shape \(6, 2, 11\), expected \(B, L, V\) with \(B, L\) = \(6, 5\)"),
    ({"batch_size": "8"}, ValueError, r"batch_size must be an integer >= 1, got '8'"),
    ({"positions": "label"}, ValueError,
     r"positions must be one of \['attention_mask', 'labels', 'shifted_labels'\], got 'label'"),
    ({"fingerprint": "fast"}, ValueError, r"fingerprint must be 'full' or 'structure'"),
])
def test_a_failed_overwrite_leaves_the_old_cache(cache_dir, options, error, pattern):
    files = _digest(cache_dir)
    arguments = {"dataset": _cache_data(), "k": 3, **options}
    dataset = arguments.pop("dataset")
    with pytest.raises(error, match=pattern):
        write_teacher_cache(_CacheLM(), dataset, cache_dir, overwrite=True, **arguments)
    assert _digest(cache_dir) == files
    assert sorted(os.listdir(cache_dir)) == sorted(files)  # no staging folder left
    TeacherCache(str(cache_dir), verify="checksum")


def test_an_overwrite_that_succeeds_replaces_the_cache(cache_dir):
    before = TeacherCache(str(cache_dir)).manifest
    write_teacher_cache(_CacheLM(), _cache_data(count=4), cache_dir, k=2, overwrite=True)
    after = TeacherCache(str(cache_dir), verify="checksum")
    assert (before.num_examples, before.k) == (6, 3) and (len(after), after.k) == (4, 2)
    assert not [name for name in os.listdir(cache_dir) if name.startswith(".")]


def test_a_killed_writers_staging_folder_is_ignored_then_removed(cache_dir):
    leftover = cache_dir / ".staging-killed"
    leftover.mkdir()
    (leftover / "shard-00000.ids.npy.tmp").write_bytes(b"partial")
    TeacherCache(str(cache_dir), verify="checksum")  # the old cache still opens
    write_teacher_cache(_CacheLM(), _cache_data(), cache_dir, k=3, overwrite=True)
    assert not leftover.exists()


@pytest.mark.parametrize("make, error, pattern", [
    (lambda folder: CachedTeacherCollator(str(folder)), TypeError,
     r"cache must be an opened TeacherCache, e\.g\. CachedTeacherCollator\(TeacherCache\("
     r"'.*cache'\)\), got str"),
    (lambda folder: TeacherCache(str(folder / "manifest.json")), FileNotFoundError,
     r"manifest\.json: is a file; a teacher cache is the folder write_teacher_cache wrote "
     r"\(here perhaps '.*cache'\)"),
    (lambda folder: TeacherCache(str(folder), expected_vocab_size=12), ValueError,
     r"the cache was written for vocab_size=11, but expected_vocab_size=12"),
    (lambda folder: write_teacher_cache(_CacheLM(), _cache_data(), folder, k=3),
     FileExistsError, r"output_dir is not empty \(it holds a teacher cache\); pass "
                      r"overwrite=True"),
])
def test_cache_errors_name_the_argument(cache_dir, make, error, pattern):
    files = _digest(cache_dir)
    with pytest.raises(error, match=pattern):
        make(cache_dir)
    assert _digest(cache_dir) == files
