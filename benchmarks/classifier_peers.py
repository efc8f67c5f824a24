"""Classifier distillation loop against peers: a hand-written loop, textbrewer's
GeneralDistiller and torchdistill's DistillationBox, per-step time on the same work.

The three loops get the same teacher and student (``benchmarks/throughput.py``'s BERTs,
built from configs, same seed), the same batches in the same order, the same loss, the same
optimizer (AdamW, lr 1e-4, clip 1.0) and the same number of steps. Per step: teacher
forward (no grad), student forward (dropout on), loss, backward, clip, AdamW step,
zero_grad. Jobs:

* ``logits``: soft cross-entropy on logits at τ = 4 (no τ² factor) + the student's
  hard-label loss (``outputs.loss``);
* ``hidden``: the same, plus hidden-state MSE matches through linear projections
  (student width -> teacher width) on ``throughput.py``'s layer map (embeddings and every
  ``layers_T // layers_S``-th layer).

The steps of the three loops are interleaved one by one in one process (ours drives: its
batch iterator runs one step of each peer, in alternating order, between two of its own
steps), each loop with its own random-number state, so dropout masks agree between loops
and the machine's load hits all three alike. Reported: per-step medians over the timed
steps (warmup excluded), their ratios, and paired ratios (the median over steps of step i
of one loop over step i of the other, which ran next to it).

torchdistill's loop is configured as in its examples: a ``WeightedSumLoss`` with its
``KDLoss`` (``reduction="batchmean"``, ``alpha=0``: the soft term alone, without τ²)
on ``classifier`` outputs captured by forward hooks, the model's own loss as the model
term, ``MSELoss`` terms through ``SimpleLossWrapper`` for the hidden matches, the
projections in an ``AuxiliaryModelWrapper`` around the student, and per batch
``box.forward_process(batch)`` then ``box.post_forward_process(loss=loss)``. Its KD term is
KL(p_T || p_S) where ours is the cross-entropy; they differ by the teacher's entropy, a
constant for the student, so the gradients (and the training) are the same: the JSON shows
its losses with the teacher's entropy added back. One difference we keep: torchdistill clips
the gradient norm over every parameter in its optimizer (student and projections), ours and
the hand loop over the student's alone, so in the ``hidden`` job the losses part at the
1e-4 level from the third step on (``--max-grad-norm 0`` turns clipping off everywhere and
they agree to float error).

    python benchmarks/classifier_peers.py --quick      # seconds, tiny models
    /tmp/peers/bin/python benchmarks/classifier_peers.py --steps 60 --warmup 5
    /tmp/peers/bin/python benchmarks/classifier_peers.py --size tiny --steps 300

Without torchdistill (CI), its column is skipped with the reason in the JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import throughput  # noqa: E402  (benchmarks/throughput.py: models, batches, layer map)

TEMPERATURE = 4.0
LR = 1e-4
MAX_GRAD_NORM = 1.0
TINY_SIZE = dict(layers_T=2, hidden_T=64, layers_S=1, hidden_S=32, heads=2, batch=4,
                 length=16, intermediate_S=64)


class Loop:
    """One side of the comparison: ``step(batch)`` runs one optimizer step and returns the
    detached loss; ``rng`` is its own CPU random-number state."""

    name = ""

    def __init__(self, job, size, device):
        self.job, self.size, self.device = job, size, device
        self.teacher, self.student, self.adaptor, self.kind = \
            throughput.build_models(size, device)
        self.hidden, _ = throughput._layer_map(size["layers_T"], size["layers_S"])
        self.extra = {"output_hidden_states": True} if job == "hidden" else {}
        self.teacher.eval()
        self.student.train()
        self.rng = None
        self.times, self.losses = [], []
        self.max_grad_norm = MAX_GRAD_NORM

    def shared_projections(self):
        """The same initial projections for every loop: seed 1, PyTorch's default init."""
        torch.manual_seed(1)
        return torch.nn.ModuleList(torch.nn.Linear(self.size["hidden_S"], self.size["hidden_T"])
                                   for _ in self.hidden).to(self.device)

    def timed_step(self, batch, record):
        torch.set_rng_state(self.rng)
        start = time.perf_counter()
        loss = self.step(batch)
        self.times.append(time.perf_counter() - start)
        self.rng = torch.get_rng_state()
        if record:
            self.losses.append(loss)


class HandLoop(Loop):
    """``throughput.py``'s hand-written loop (fp32), the reference."""

    name = "hand"

    def __init__(self, job, size, device):
        super().__init__(job, size, device)
        self.projections = self.shared_projections() if job == "hidden" \
            else torch.nn.ModuleList()
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=LR)
        self.optimizer.add_param_group({"params": self.projections.parameters()})
        self.teacher_logits = []  # for the teacher-entropy correction of torchdistill's loss

    def step(self, batch):
        with torch.no_grad():
            out_T = self.adaptor(batch, self.teacher(**batch, **self.extra))
        out_S = self.adaptor(batch, self.student(**batch, **self.extra))
        p_T = F.softmax(out_T["logits"] / TEMPERATURE, dim=-1)
        loss = -(p_T * F.log_softmax(out_S["logits"] / TEMPERATURE, dim=-1)).sum(-1).mean()
        loss = loss + out_S["losses"].mean()
        mask = batch["attention_mask"]
        for projection, (s, t) in zip(self.projections, self.hidden):
            diff = projection(out_S["hidden"][s]) - out_T["hidden"][t]
            weights = mask.to(diff.dtype)
            loss = loss + (diff.pow(2) * weights.unsqueeze(-1)).sum() / \
                (weights.sum() * self.size["hidden_T"]).clamp(min=1)
        loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        if len(self.teacher_logits) < 16:
            self.teacher_logits.append(out_T["logits"])
        return loss.detach()


class OursLoop(Loop):
    """textbrewer.GeneralDistiller, as ``throughput.py``'s library side (fp32)."""

    name = "ours"

    def __init__(self, job, size, device, scratch):
        super().__init__(job, size, device)
        import textbrewer
        matches = []
        if job == "hidden":
            matches = [{"layer_T": t, "layer_S": s, "feature": "hidden", "loss": "hidden_mse",
                        "weight": 1, "proj": ["linear", size["hidden_S"], size["hidden_T"]]}
                       for s, t in self.hidden]
        config = textbrewer.TrainingConfig(device=str(device), output_dir=scratch,
                                           log_steps=10 ** 9, ckpt_steps=10 ** 9)
        self.distiller = textbrewer.GeneralDistiller(
            config, textbrewer.DistillationConfig(temperature=TEMPERATURE, hard_label_weight=1,
                                                  intermediate_matches=matches),
            self.teacher, self.student, self.adaptor, self.adaptor)
        if job == "hidden":
            for mine, shared in zip(self.distiller.projs, self.shared_projections()):
                mine.load_state_dict(shared.state_dict())
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=LR)
        self.recording = False
        original = self.distiller.train_on_batch

        def train_on_batch(batch, args):  # keeps a reference to the loss of recorded steps
            result = original(batch, args)
            if self.recording:
                total = result[0] if isinstance(result, tuple) else result
                self.losses.append(total.detach())
            return result

        self.distiller.train_on_batch = train_on_batch

    def run(self, batches, total, peers, record_steps):
        """Drives the interleaving: between two of its own steps, one step of each peer."""
        marks = []

        def stream():
            for index in range(total + 1):
                now = time.perf_counter()
                if index > 0:
                    self.rng = torch.get_rng_state()
                    self.times.append(now - marks[-1])
                batch = batches[index % len(batches)]
                record = index < record_steps
                if index < total:  # the last batch's step is ours alone, untimed
                    for peer in (peers if index % 2 == 0 else peers[::-1]):
                        peer.timed_step(batch, record)
                torch.set_rng_state(self.rng)
                self.recording = record
                marks.append(time.perf_counter())
                yield batch

        with self.distiller:
            # One step more than is timed: the last one ends without a batch request.
            self.distiller.train(self.optimizer, stream(), num_steps=total + 1,
                                 max_grad_norm=self.max_grad_norm, **self.extra)


def _teacher_path(t):  # hidden state t of a BertForSequenceClassification
    return "bert.embeddings" if t == 0 else f"bert.encoder.layer.{t - 1}"


def torchdistill_unavailable():
    try:
        import torchdistill  # noqa: F401
        from torchdistill.core.distillation import DistillationBox  # noqa: F401
    except Exception as error:  # ImportError, or torchvision's own import errors
        return f"{type(error).__name__}: {error}"
    return None


_REGISTERED = {}


def _register_torchdistill_pieces():
    """A forward process taking the batch as keyword arguments and the model-loss extractor,
    both as in torchdistill's examples/hf_transformers/custom, and a wrapper that applies the
    projections to the hooked student features (torchdistill's AuxiliaryModelWrapper way)."""
    if _REGISTERED:
        return _REGISTERED
    from torchdistill.core.interfaces.registry import register_forward_proc_func
    from torchdistill.losses.registry import register_func2extract_model_output
    from torchdistill.models.registry import register_auxiliary_model_wrapper
    from torchdistill.models.wrapper import AuxiliaryModelWrapper

    @register_forward_proc_func
    def forward_batch_as_kwargs_bench(model, sample_batch, targets=None, supp_dict=None,
                                      **kwargs):
        return model(**sample_batch)

    @register_func2extract_model_output
    def extract_transformers_loss_bench(student_outputs, targets, **kwargs):
        return {"loss": student_outputs.loss}

    @register_auxiliary_model_wrapper
    class ProjectedStudentBench(AuxiliaryModelWrapper):
        def __init__(self, student_model, projections, feature_paths, **kwargs):
            super().__init__()
            self.student_model = student_model
            self.projections = projections
            self.feature_paths = feature_paths

        def forward(self, *args, **kwargs):
            return self.student_model(*args, **kwargs)

        def secondary_forward(self, io_dict):
            for index, (projection, path) in enumerate(zip(self.projections,
                                                           self.feature_paths)):
                io_dict[f"proj{index}"] = {"output": projection(io_dict[path]["output"])}

    _REGISTERED.update(forward="forward_batch_as_kwargs_bench",
                       extract="extract_transformers_loss_bench",
                       wrapper="ProjectedStudentBench")
    return _REGISTERED


class TorchdistillLoop(Loop):
    """torchdistill's DistillationBox from a config dict, stepped as in its examples."""

    name = "torchdistill"

    def __init__(self, job, size, device):
        super().__init__(job, size, device)
        from torchdistill.core.distillation import DistillationBox
        keys = _register_torchdistill_pieces()
        # Hook paths are relative to the student as the box sees it: inside the
        # projection wrapper (hidden job), the student is its `student_model`.
        prefix = "student_model." if job == "hidden" else ""
        student_hooks, teacher_hooks = [prefix + "classifier"], ["classifier"]
        sub_terms = {"kd": {"criterion": {"key": "KDLoss", "kwargs": {
            "student_module_path": prefix + "classifier", "student_module_io": "output",
            "teacher_module_path": "classifier", "teacher_module_io": "output",
            "temperature": TEMPERATURE, "alpha": 0, "reduction": "batchmean"}},
            "weight": 1.0}}
        student = {"forward_proc": keys["forward"], "requires_grad": True, "frozen_modules": [],
                   "sequential": [], "wrapper": None}
        if job == "hidden":
            paths_S = [prefix + _teacher_path(s) for s, _ in self.hidden]
            paths_T = [_teacher_path(t) for _, t in self.hidden]
            student_hooks += paths_S
            teacher_hooks += paths_T
            student["auxiliary_model_wrapper"] = {"key": keys["wrapper"], "kwargs": {
                "projections": self.shared_projections(), "feature_paths": paths_S}}
            for index, path_T in enumerate(paths_T):
                sub_terms[f"hidden{index}"] = {
                    "criterion": {"key": "MSELoss", "kwargs": {"reduction": "mean"}},
                    "criterion_wrapper": {"key": "SimpleLossWrapper", "kwargs": {
                        "input": {"is_from_teacher": False, "module_path": f"proj{index}",
                                  "io": "output"},
                        "target": {"is_from_teacher": True, "module_path": path_T,
                                   "io": "output"}}},
                    "weight": 1.0}
        student["forward_hook"] = {"input": [], "output": student_hooks}
        train_config = {
            "num_epochs": 1,
            "teacher": {"forward_proc": keys["forward"], "requires_grad": False,
                        "frozen_modules": [], "sequential": [], "wrapper": None,
                        "forward_hook": {"input": [], "output": teacher_hooks}},
            "student": student,
            "optimizer": {"key": "AdamW", "kwargs": {"lr": LR},
                          "max_grad_norm": MAX_GRAD_NORM or None, "grad_accum_step": 1},
            "criterion": {"key": "WeightedSumLoss", "kwargs": {
                "model_term": {"weight": 1.0}, "sub_terms": sub_terms},
                "func2extract_model_loss": keys["extract"]},
        }
        self.box = DistillationBox(self.teacher, self.student, {}, train_config, device,
                                   None, False, 1)
        self.box.pre_epoch_process(epoch=0)
        self.teacher.eval()  # DistillationBox leaves the teacher's mode to the caller

    def step(self, batch):
        loss = self.box.forward_process(batch, targets=None, supp_dict=None)
        self.box.post_forward_process(loss=loss)
        return loss.detach()


def _median_ms(values):
    return round(1000 * statistics.median(values), 3)


def run_job(job, size, args):
    device = torch.device("cpu")
    hand = HandLoop(job, size, device)
    scratch = tempfile.mkdtemp(prefix="classifier-peers-")  # ours' final checkpoint
    ours = OursLoop(job, size, device, scratch)
    # Progress lines are still built (print_freq, as in 0.2.1), just not shown.
    logging.getLogger("textbrewer").setLevel(logging.WARNING)
    peers = [hand]
    reason = None if args.no_torchdistill else torchdistill_unavailable()
    if args.no_torchdistill:
        reason = "--no-torchdistill"
    if reason is None:
        logging.getLogger().setLevel(logging.WARNING)  # torchdistill logs its setup at INFO
        peers.append(TorchdistillLoop(job, size, device))
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    for loop in [ours] + peers:
        loop.rng = state.clone()
    vocab = 30522 if hand.kind.startswith("transformers") else 1000
    batches = throughput.make_batches(size, device, 4, vocab)
    total = args.warmup + args.steps
    try:
        ours.run(batches, total, peers, args.check_steps)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    medians = {loop.name: _median_ms(loop.times[args.warmup:]) for loop in [ours] + peers}
    losses = {loop.name: [float(x) for x in loop.losses] for loop in [ours] + peers}
    quartiles = {loop.name: [round(1000 * q, 3) for q in
                             statistics.quantiles(loop.times[args.warmup:], n=4)[::2]]
                 for loop in [ours] + peers} if args.steps > 1 else {}
    timed = {loop.name: loop.times[args.warmup:] for loop in [ours] + peers}

    def paired(a, b):  # step i of `a` over step i of `b`: neighbours in time, same load
        return round(statistics.median(x / y for x, y in zip(timed[a], timed[b])), 4)

    result = {"job": job, "models": hand.kind, "median_step_ms": medians,
              "quartiles_step_ms": quartiles,
              "ratio_ours_over_hand": round(medians["ours"] / medians["hand"], 4),
              "paired_ratio_ours_over_hand": paired("ours", "hand")}
    if reason is None:
        # torchdistill's KD term is KL = CE - H(p_T): add the teacher's entropy back.
        entropy = []
        for logits in hand.teacher_logits[:args.check_steps]:
            p_T = F.softmax(logits / TEMPERATURE, dim=-1)
            entropy.append(float(-(p_T * p_T.clamp_min(1e-30).log()).sum(-1).mean()))
        losses["torchdistill_plus_teacher_entropy"] = [
            loss + h for loss, h in zip(losses["torchdistill"], entropy)]
        result["ratio_torchdistill_over_hand"] = round(medians["torchdistill"] / medians["hand"],
                                                        4)
        result["ratio_ours_over_torchdistill"] = round(medians["ours"] / medians["torchdistill"],
                                                        4)
        result["paired_ratio_torchdistill_over_hand"] = paired("torchdistill", "hand")
        result["paired_ratio_ours_over_torchdistill"] = paired("ours", "torchdistill")
    else:
        result["torchdistill_skipped"] = reason
    result["first_losses"] = {name: [round(x, 6) for x in values]
                              for name, values in losses.items()}
    reference = losses["hand"]
    result["max_abs_loss_diff_vs_hand"] = {
        name: max(abs(a - b) for a, b in zip(values, reference))
        for name, values in losses.items() if name not in ("hand", "torchdistill")}
    result["rounds"] = {"timed_steps": args.steps, "warmup_steps": args.warmup}
    return result


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _loadavg():
    try:
        with open("/proc/loadavg") as handle:
            return " ".join(handle.read().split()[:3])
    except OSError:
        return None


def main():
    global MAX_GRAD_NORM  # --max-grad-norm sets it for every loop
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", default="logits,hidden")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--check-steps", type=int, default=5,
                        help="steps whose losses are reported for every loop")
    parser.add_argument("--size", choices=("cpu", "tiny"), default="cpu",
                        help="cpu: throughput.py's CPU BERTs; tiny: 2x64 teacher, 1x32 "
                             "student, batch 4 x 16 (the loops' own overhead shows)")
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps")
    parser.add_argument("--max-grad-norm", type=float, default=MAX_GRAD_NORM,
                        help="0: no clipping in any loop (torchdistill clips the projections "
                             "with the student, ours and the hand loop the student alone)")
    parser.add_argument("--no-torchdistill", action="store_true")
    args = parser.parse_args()
    MAX_GRAD_NORM = args.max_grad_norm
    size = dict(throughput.SIZES["cpu"] if args.size == "cpu" else TINY_SIZE)
    if args.quick:
        size = dict(TINY_SIZE)
        args.steps, args.warmup, args.check_steps = 4, 1, 3
    args.check_steps = min(args.check_steps, args.warmup + args.steps)
    load_before = _loadavg()
    results = [run_job(job, size, args) for job in args.jobs.split(",")]
    try:
        import torchdistill
        torchdistill_version = torchdistill.__version__
    except Exception:
        torchdistill_version = None
    print(json.dumps({
        "torch": torch.__version__, "torchdistill": torchdistill_version,
        "python": platform.python_version(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "loadavg_before": load_before,
        "loadavg_after": _loadavg(), "size": size, "temperature": TEMPERATURE,
        "results": results}, indent=2))


if __name__ == "__main__":
    main()
