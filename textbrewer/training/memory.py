"""How much memory one training step of causal-LM distillation needs, before any is spent:
:func:`plan_lm_memory` (one loss path) and :func:`plan_lm_memory_paths` (all of them).

The estimate is an exact count where it can be. Parameters, gradients and optimizer state
are counted from the models' parameters. The forward and backward pass are *run*: once, on
``meta`` tensors (shapes and dtypes, no data, no time), under a
:class:`LiveBytesTracker` that adds every new storage an operator creates, drops it when it
is freed, and keeps the peak. What runs is the distiller's own step: the teacher's forward
under ``no_grad``, the student's forward, the library's token loss
(:func:`~textbrewer.losses.token.token_distillation_loss` or
:func:`~textbrewer.losses.token.fused_token_distillation_loss`, called as
:class:`~textbrewer.distillers.lm.CausalLMDistiller` calls them) and ``backward``. The
models may be real or on the meta device: either way they run with meta stand-ins of their
parameters (``torch.func.functional_call``), so nothing is allocated or loaded.

The optimizer step cannot run on meta tensors (it reads its step counter with ``.item()``);
it is counted by formula: its state and the temporaries of ``torch.optim``'s update.

Read the plan as the steady state (step 2 onwards): the optimizer state exists during the
forward pass, the gradients are freed by ``zero_grad()`` before it::

    peak = teacher + student parameters + optimizer state
           + max(forward/backward peak, gradients + optimizer-step temporaries)
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..losses.token import (DIVERGENCES, TopKTeacher, fused_token_distillation_loss,
                            token_distillation_loss)

try:  # the documented way to see every operator; guarded: it lives in a private module
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.multiprocessing.reductions import StorageWeakRef
except ImportError:  # pragma: no cover - an old or stripped torch: analytic plans only
    TorchDispatchMode = object
    StorageWeakRef = None

__all__ = ["MemoryPlan", "LiveBytesTracker", "plan_lm_memory", "plan_lm_memory_paths",
           "format_memory_plans", "PLAN_PATHS", "OPTIMIZER_STATES"]

#: the loss paths a plan can be made for; ``'cache'``: no teacher in memory, its top-k
#: rows come with the batch (the student side then runs ``path``, see :func:`plan_lm_memory`)
PLAN_PATHS = ("dense", "chunked", "fused", "cache")
_LOSS_PATHS = ("auto", "dense", "chunked", "fused")
#: optimizer name -> tensors of state per trainable parameter (torch.optim's, in the
#: parameter's dtype: ``zeros_like(param)``)
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "sgd_momentum": 1}
_METHODS = ("auto", "meta", "analytic")


# ---------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one training step needs, by part (see the module docstring for the formula).

    Attributes:
        path: ``'dense'``, ``'chunked'``, ``'fused'`` or ``'cache'``.
        loss_path: the path the student's loss runs (``'cache'`` runs one of the others).
        method: ``'meta'`` (the step was run on meta tensors and its live bytes counted) or
            ``'analytic'`` (a formula: the loss path's [tokens, vocab] tensors and a
            GPT-like student's saved activations; rough, see ``docs/benchmarks.md``).
        batch_size, sequence_length: the batch planned, B rows of L tokens.
        teacher_parameters: the teacher's parameters and buffers (0 for ``'cache'``).
        student_parameters: the student's parameters and buffers.
        gradients: one gradient per trainable student parameter.
        optimizer_state: e.g. AdamW's two moments per trainable parameter (and its step
            counters).
        activations: the forward/backward peak above the persistent state, without the
            gradients alive at that moment: activations saved for backward, logits and
            the loss path's intermediates, the batch.
        gradients_at_peak: gradients already alive at that peak (≤ ``gradients``).
        optimizer_step: temporaries of the optimizer's update (after backward, beside
            the gradients).
        total_peak: the estimated peak of the whole step.
        largest_allocation: the largest single tensor the forward/backward pass creates
            (what an allocator must find in one piece; 0 for an analytic plan).
        notes: what was assumed or could not be counted.
    """

    path: str
    loss_path: str
    method: str
    batch_size: int
    sequence_length: int
    teacher_parameters: int
    student_parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    gradients_at_peak: int
    optimizer_step: int
    total_peak: int
    largest_allocation: int = 0
    notes: Tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> Dict[str, Any]:
        """The plan as plain Python values (byte counts as ints), for JSON."""
        result = asdict(self)
        result["notes"] = list(self.notes)
        return result

    def format_table(self) -> str:
        """A two-column text table, sizes in MiB / GiB."""
        return format_memory_plans({self.path: self})


_ROWS = (("teacher parameters", "teacher_parameters"),
         ("student parameters", "student_parameters"),
         ("gradients", "gradients"),
         ("optimizer state", "optimizer_state"),
         ("activations + loss", "activations"),
         ("  + gradients at that peak", "gradients_at_peak"),
         ("optimizer step temporaries", "optimizer_step"),
         ("estimated peak", "total_peak"),
         ("largest single tensor", "largest_allocation"))


def _human(count: int) -> str:
    if count >= 2 ** 30:
        return f"{count / 2 ** 30:.2f} GiB"
    return f"{count / 2 ** 20:.1f} MiB"


def format_memory_plans(plans: Mapping[str, MemoryPlan]) -> str:
    """One text table of several plans (a column each, e.g. from :func:`plan_lm_memory_paths`).

    Example:
        >>> print(format_memory_plans(plan_lm_memory_paths(student, teacher, batch_size=8,
        ...                                                 sequence_length=1024)))
    """
    names = list(plans)
    header = ["", *names]
    rows = [header, ["method", *(plans[n].method for n in names)]]
    rows += [[label, *(_human(getattr(plans[n], key)) for n in names)] for label, key in _ROWS]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                       for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    notes = sorted({note for n in names for note in plans[n].notes})
    return "\n".join(lines + [f"note: {note}" for note in notes])


# ---------------------------------------------------------------------------------------
# counting live bytes
# ---------------------------------------------------------------------------------------
def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)


class LiveBytesTracker(TorchDispatchMode):
    """Counts the bytes of storages that operators create while it is active, and the peak.

    Every operator's outputs are looked at: a storage that none of its inputs holds (not
    a view, not an in-place result) and that is not counted yet is new, and its
    ``nbytes()`` are added. A storage is dropped from the count once freed (its weak
    reference expired): the count is swept before each operator, so the peak, taken
    after each operator, is that of the storages alive at that moment. Storages created
    before the tracker started (parameters) are never counted. Works on any device,
    meta included; kernels' internal scratch buffers are invisible to it.

    Attributes:
        current: bytes alive now.  peak: the largest ``current`` seen.
        largest: the largest single storage created.
        peak_storages: ``{key: weak reference}`` of the storages alive at the peak.

    Example:
        >>> with LiveBytesTracker() as tracker:
        ...     a = torch.empty(1000, device='meta')   # 4000 bytes
        ...     b = torch.empty(1000, device='meta')   # 8000 alive
        ...     del a                                  # 4000 alive
        >>> tracker.peak, tracker.current
        (8000, 4000)
    """

    def __init__(self) -> None:
        if StorageWeakRef is None:  # pragma: no cover
            raise RuntimeError("this torch has no TorchDispatchMode / StorageWeakRef")
        super().__init__()
        self._live: Dict[int, Tuple[Any, int]] = {}
        self._current = 0
        self.peak = 0
        self.largest = 0
        self.peak_storages: Dict[int, Any] = {}

    def _sweep(self) -> None:
        dead = [key for key, (ref, _) in self._live.items() if ref.expired()]
        for key in dead:
            self._current -= self._live.pop(key)[1]

    @property
    def current(self) -> int:
        """Bytes of the counted storages alive now (freed ones are dropped first)."""
        self._sweep()
        return self._current

    def alive(self, key: int) -> bool:
        """Whether the storage counted under ``key`` (:meth:`key_of`) is still alive."""
        entry = self._live.get(key)
        return entry is not None and not entry[0].expired()

    @staticmethod
    def key_of(tensor: torch.Tensor) -> int:
        """The key under which ``tensor``'s storage is counted."""
        return StorageWeakRef(tensor.untyped_storage()).cdata

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # freed since the last operator: their addresses may be reused by this one's outputs
        self._sweep()
        inputs = {self.key_of(t) for t in _tensors((args, kwargs))}
        out = func(*args, **kwargs)
        for tensor in _tensors(out):
            storage = tensor.untyped_storage()
            ref = StorageWeakRef(storage)
            if ref.cdata in inputs or ref.cdata in self._live:
                continue  # a view or an in-place result: no new memory
            self._live[ref.cdata] = (ref, storage.nbytes())
            self._current += storage.nbytes()
            self.largest = max(self.largest, storage.nbytes())
        if self._current > self.peak:
            self.peak = self._current
            self.peak_storages = {key: ref for key, (ref, _) in self._live.items()}
        return out


# ---------------------------------------------------------------------------------------
# the models as meta stand-ins
# ---------------------------------------------------------------------------------------
def _state_bytes(model: Optional[nn.Module], dtype: Optional[torch.dtype]) -> int:
    """Bytes of the parameters and buffers (tied ones once), in ``dtype`` where floating."""
    if model is None:
        return 0
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        total += tensor.numel() * _element_size(tensor, dtype)
    return total


def _element_size(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> int:
    if dtype is not None and tensor.is_floating_point():
        return torch.empty((), dtype=dtype).element_size()
    return tensor.element_size()


def _trainable(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _stand_ins(model: nn.Module, dtype: Optional[torch.dtype], trainable: bool
               ) -> Tuple[Dict[str, torch.Tensor], Dict[int, torch.Tensor]]:
    """Meta tensors for the parameters and buffers: ``{name: stand-in}`` for
    ``functional_call`` (tied parameters under one name: it ties the others) and
    ``{id(original): stand-in}``."""
    by_name: Dict[str, torch.Tensor] = {}
    by_id: Dict[int, torch.Tensor] = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        stand_in = torch.empty(tensor.shape, dtype=target, device="meta")
        if trainable and isinstance(tensor, nn.Parameter) and tensor.requires_grad:
            stand_in.requires_grad_(True)
        by_name[name] = stand_in
        by_id[id(tensor)] = stand_in
    return by_name, by_id


def _output_head(model: nn.Module) -> Optional[nn.Module]:
    """``get_output_embeddings()`` when it is Linear-like (a 2-D weight), else None."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(getattr(head, "weight", None), torch.Tensor) \
        and head.weight.dim() == 2 else None


def _vocab(model: nn.Module) -> int:
    head = _output_head(model)
    if head is not None:
        return int(head.weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int):
        return size
    raise ValueError(f"cannot tell the vocabulary size of {type(model).__name__}: it has no "
                     f"get_output_embeddings() Linear and no config.vocab_size")


def _hidden(model: nn.Module) -> int:
    head = _output_head(model)
    if head is not None:
        return int(head.weight.shape[1])
    config = getattr(model, "config", None)
    return int(getattr(config, "hidden_size", getattr(config, "n_embd", 0)) or 0)


def _logits_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise ValueError(f"cannot find logits in the model's output ({type(outputs).__name__})")


@contextlib.contextmanager
def _modes(student: nn.Module, teacher: Optional[nn.Module]):
    """Student in training mode (dropout masks are memory too), teacher in eval mode, as
    the distillers run them; every module's flag restored afterwards."""
    saved = [(m, m.training) for model in (student, teacher) if model is not None
             for m in model.modules()]
    student.train()
    if teacher is not None:
        teacher.eval()
    try:
        yield
    finally:
        for module, flag in saved:
            module.training = flag


@contextlib.contextmanager
def _head_skipped(head: nn.Module, captured: List[torch.Tensor]):
    """The head's forward replaced by a capture of its input (an empty (..., 0) result),
    as the fused path of the LM distillers runs the models: no [tokens, vocab] logits."""
    had = "forward" in head.__dict__
    previous = head.__dict__.get("forward")

    def capture(hidden, *args, **kwargs):
        captured.append(hidden)
        return hidden.new_empty(*hidden.shape[:-1], 0)

    head.forward = capture
    try:
        yield
    finally:
        if had:
            head.forward = previous
        else:
            del head.forward


def _run(model: nn.Module, params: Dict[str, torch.Tensor], inputs: Dict[str, Any]) -> Any:
    return torch.func.functional_call(model, params, args=(), kwargs=inputs, strict=False,
                                      tie_weights=True)


# ---------------------------------------------------------------------------------------
# the step, on meta tensors
# ---------------------------------------------------------------------------------------
@dataclass
class _Step:
    """What ``_meta_step`` measured: the forward/backward peak and the gradients then."""

    peak: int
    gradients_at_peak: int
    largest: int = 0


def _meta_step(student: nn.Module, teacher: Optional[nn.Module], options: Dict[str, Any],
               loss_path: str, batch_size: int, length: int, cache_k: Optional[int],
               dtype: Optional[torch.dtype]) -> _Step:
    """One forward + loss + backward of the distiller's token loss on meta tensors."""
    params_S, ids_S = _stand_ins(student, dtype, trainable=True)
    params_T = ids_T = None
    if teacher is not None and cache_k is None:
        params_T, ids_T = _stand_ins(teacher, dtype, trainable=False)
    head_S = _output_head(student)
    head_T = None if params_T is None else _output_head(teacher)
    meta = torch.device("meta")
    tracker = LiveBytesTracker()
    with _modes(student, teacher), tracker:
        # the batch, as the collator and the distiller's prepare_batch leave it: full rows
        # (no padding, hence no attention mask: models skip an all-ones one anyway)
        input_ids = torch.empty(batch_size, length, dtype=torch.long, device=meta)
        labels = torch.cat([input_ids[:, 1:], input_ids.new_full((batch_size, 1), -100)], 1)
        valid = labels != -100
        inputs = {"input_ids": input_ids}
        topk = None
        if cache_k is not None:  # CachedTeacherCollator's rows: int64 ids, fp32 log-probs
            topk = TopKTeacher(
                torch.empty(batch_size, length, cache_k, dtype=torch.long, device=meta),
                torch.empty(batch_size, length, cache_k, dtype=torch.float32, device=meta))
            # the rest of the collator's dict is in memory too, unused by the loss
            rest = (torch.empty(batch_size, length, device=meta),  # noqa: F841  tail_mass
                    torch.empty(batch_size, length, dtype=torch.bool, device=meta))  # mask
        if loss_path == "fused":
            captured: List[torch.Tensor] = []
            with _head_skipped(head_S, captured):
                _run(student, params_S, inputs)
            hidden_S = captured.pop()
            weight_S = ids_S[id(head_S.weight)]
            bias_S = None if getattr(head_S, "bias", None) is None else ids_S[id(head_S.bias)]
            if topk is None:
                with torch.no_grad(), _head_skipped(head_T, captured):
                    _run(teacher, params_T, inputs)
                hidden_T = captured.pop()
                weight_T = ids_T[id(head_T.weight)]
                bias_T = None if getattr(head_T, "bias", None) is None \
                    else ids_T[id(head_T.bias)]
            else:
                hidden_T, weight_T, bias_T = topk, None, None
            parts = fused_token_distillation_loss(hidden_S, weight_S, hidden_T, weight_T,
                                                  labels, valid, bias_S=bias_S, bias_T=bias_T,
                                                  **options)
            del hidden_S, hidden_T
        else:
            logits_S = _logits_of(_run(student, params_S, inputs))
            if topk is None:
                with torch.no_grad():
                    logits_T = _logits_of(_run(teacher, params_T, inputs))
                if "topk" in options:  # the live teacher cut to its top k, as the distiller does
                    k = options.pop("topk")
                    logprobs, ids = logits_T.float().log_softmax(-1).topk(k, dim=-1)
                    logits_T = TopKTeacher(ids, logprobs)
            else:
                logits_T = topk
            options.pop("topk", None)
            parts = token_distillation_loss(logits_S, logits_T, labels, valid, **options)
            del logits_S, logits_T
        loss = parts.pop("loss")
        parts.clear()
        loss.backward()
        del loss, inputs, input_ids, labels, valid, topk
    grads = [p.grad for p in params_S.values() if p.grad is not None]
    at_peak = sum(g.untyped_storage().nbytes() for g in grads
                  if tracker.key_of(g) in tracker.peak_storages
                  and not tracker.peak_storages[tracker.key_of(g)].expired())
    return _Step(tracker.peak, at_peak, tracker.largest)


def _analytic_step(student: nn.Module, teacher: Optional[nn.Module], options: Dict[str, Any],
                   loss_path: str, batch_size: int, length: int, cache_k: Optional[int],
                   dtype: Optional[torch.dtype]) -> _Step:
    """The loss path's [tokens, vocab] tensors by formula, plus the student body's saved
    activations where its config says its shape (``_body_activations``).

    N = B·L tokens, e the logits' element size, f = 4 (the softmax runs in fp32 at least),
    C = min(chunk_size, N): dense holds both models' logits and about four fp32 [N, V]
    tensors for autograd (up-casts, log-softmaxes, probabilities); chunked holds both
    models' logits, the student's [N, V] gradient and about four [C, V] temporaries; fused
    only the chunk's temporaries and the [N, H] gradient of the student's hidden states.
    """
    tokens = batch_size * length
    element = torch.empty((), dtype=dtype or torch.float32).element_size()
    wide = max(element, 4)
    vocab = _vocab(student)
    chunk = min(options.get("chunk_size") or tokens, tokens)
    teacher_rows = tokens * cache_k * (8 + 4) if cache_k is not None else None
    logits_T = teacher_rows if teacher_rows is not None else tokens * vocab * element
    if loss_path == "dense":
        peak = tokens * vocab * element + logits_T + 4 * tokens * vocab * wide
    elif loss_path == "chunked":
        peak = 2 * tokens * vocab * element + logits_T + 4 * chunk * vocab * wide
    else:
        peak = (teacher_rows or 0) + 4 * chunk * vocab * wide \
            + 2 * tokens * _hidden(student) * element
    return _Step(peak + _body_activations(student, batch_size, length, element), 0)


def _body_activations(model: nn.Module, batch_size: int, length: int, element: int) -> int:
    """Activations a GPT-like student saves for backward, by Korthikanti et al. (2022):
    per layer B·L·H·(34 + 5·a·L/H) bytes at 2-byte activations (a heads, no
    recomputation), scaled to ``element`` bytes; 0 when the config does not say the
    layers, width and heads."""
    config = getattr(model, "config", None)

    def read(*names: str) -> int:
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        return 0

    layers = read("num_hidden_layers", "n_layer")
    hidden = read("hidden_size", "n_embd")
    heads = read("num_attention_heads", "n_head")
    if not (layers and hidden and heads):
        return 0
    per_layer = batch_size * length * hidden * (34 + 5 * heads * length / hidden)
    return int(layers * per_layer * element / 2)


# ---------------------------------------------------------------------------------------
# the public functions
# ---------------------------------------------------------------------------------------
def _choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _optimizer_bytes(student: nn.Module, optimizer: str, dtype: Optional[torch.dtype],
                     foreach: bool) -> Tuple[int, int]:
    """(state, update temporaries) of ``torch.optim``'s ``optimizer`` over the trainable
    parameters (state in the parameter's dtype, as ``zeros_like(param)`` makes it)."""
    trainable = _trainable(student)
    sizes = [p.numel() * _element_size(p, dtype) for p in trainable]
    moments = OPTIMIZER_STATES[optimizer]
    state = moments * sum(sizes)
    if optimizer in ("adam", "adamw"):
        state += 4 * len(trainable)  # a 0-dim fp32 step counter per parameter
        # foreach (torch's default on CUDA): sqrt of every second moment at once; per
        # tensor (the default on CPU): `exp_avg_sq.sqrt() / c` holds two temporaries of
        # one parameter's size
        step = sum(sizes) if foreach else 2 * max(sizes, default=0)
    else:  # SGD updates in place; foreach momentum adds nothing either
        step = 0
    return state, step


def plan_lm_memory(student: nn.Module, teacher: Optional[nn.Module], *, batch_size: int,
                   sequence_length: int, path: Optional[str] = None,
                   divergence: Optional[str] = None, chunk_size: Optional[int] = None,
                   cache_k: Optional[int] = None, lm_config: Optional[Any] = None,
                   temperature: float = 1.0, ce_weight: float = 0.0,
                   optimizer: str = "adamw", dtype: Optional[torch.dtype] = torch.float32,
                   foreach: bool = False, method: str = "auto") -> MemoryPlan:
    """The memory one training step of token-level causal-LM distillation needs.

    Runs the step once on meta tensors and counts its live bytes (see the module
    docstring); the models are not changed (their train/eval flags are restored) and no
    memory of their size is allocated. The batch planned is ``batch_size`` rows of
    ``sequence_length`` tokens with no padding: ``input_ids`` (B, L) int64, the logits
    (B, L, V) or hidden states (B, L, H) the path needs, and for ``cache_k`` the teacher's
    rows (B, L, k) int64 ids and fp32 log-probs.

    Args:
        student: the student causal LM (real or on the meta device), called as
            ``model(input_ids=...)`` and returning (B, L, V) logits (``.logits``, a tensor,
            ``['logits']``); its trainable parameters are those with ``requires_grad``.
        teacher: the teacher, or None with ``cache_k`` (a teacher cache). Ignored (not
            counted) when ``cache_k`` is given.
        batch_size: rows B per micro-batch.
        sequence_length: tokens L per row.
        path: the student's loss path, one of ``'auto'``, ``'dense'``, ``'chunked'``,
            ``'fused'`` (``'auto'``: fused when the models have output embeddings, as the
            distillers resolve it without adaptors or compile). Default: ``lm_config.path``,
            else ``'auto'``.
        divergence: a token divergence (default ``lm_config.divergence``, else
            ``'forward_kl'``), taken against the cached rows with ``cache_k``, and against
            the live teacher cut to ``lm_config.topk`` when that is set.
        chunk_size: tokens per chunk of the chunked and fused paths (default
            ``lm_config.chunk_size``, else 1024).
        cache_k: plan for a teacher cache with k entries per token (``'cache'`` path):
            no teacher parameters or forward pass.
        lm_config: an :class:`~textbrewer.distillers.lm.LMDistillationConfig` (or an object
            with its attributes) whose ``path``, ``divergence``, ``chunk_size``, ``beta``,
            ``alpha``, ``topk``, ``topk_tail`` and ``vocab_alignment`` are used where the
            keywords above are not given.
        temperature: τ (``DistillationConfig.temperature``); τ ≠ 1 costs one more [N, V]
            tensor on the dense path.
        ce_weight: ``DistillationConfig.hard_label_weight`` (> 0 adds the cross-entropy's
            tensors).
        optimizer: one of :data:`OPTIMIZER_STATES` (``'adamw'``, ``'adam'``, ``'sgd'``,
            ``'sgd_momentum'``).
        dtype: the parameters' dtype in training (floating parameters are counted and run
            in it; None: each parameter's own). Autocast is not simulated: plan bf16
            training with ``dtype=torch.bfloat16``.
        foreach: the optimizer's foreach update (torch's default on CUDA; per-tensor is
            the default on CPU): one trainable-sized temporary instead of two
            parameter-sized ones.
        method: ``'auto'`` (meta run, falling back to the formula if an operator cannot
            run on meta tensors; the plan's ``method`` and ``notes`` say which),
            ``'meta'`` (no fallback: the error is raised) or ``'analytic'``.

    Returns:
        A :class:`MemoryPlan` (bytes by part and ``total_peak``).

    Raises:
        ValueError: an unknown ``path``, ``optimizer``, ``divergence`` or ``method`` (the
            message lists the valid ones), a non-positive size, the fused path for a model
            without output embeddings, or no teacher and no ``cache_k``.

    Example:
        >>> with torch.device('meta'):
        ...     teacher = GPT2LMHeadModel(GPT2Config(n_layer=12))
        ...     student = GPT2LMHeadModel(GPT2Config(n_layer=4))
        >>> plan = plan_lm_memory(student, teacher, batch_size=8, sequence_length=1024,
        ...                       path='fused', optimizer='adamw')
        >>> print(plan.format_table()); plan.total_peak
    """
    _positive("batch_size", batch_size)
    _positive("sequence_length", sequence_length)
    if cache_k is not None:
        _positive("cache_k", cache_k)
    _choice("optimizer", optimizer, OPTIMIZER_STATES)
    _choice("method", method, _METHODS)
    if not isinstance(student, nn.Module):
        raise ValueError(f"student must be a torch.nn.Module, got {type(student).__name__}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise ValueError(f"teacher must be a torch.nn.Module or None, got "
                         f"{type(teacher).__name__}")
    if teacher is None and cache_k is None:
        raise ValueError("teacher is None and cache_k is None: plan a live teacher (pass "
                         "teacher=) or a teacher cache (pass cache_k=, its top-k size)")

    def option(name: str, given: Any, default: Any) -> Any:
        if given is not None:
            return given
        return getattr(lm_config, name, default) if lm_config is not None else default

    path = option("path", path, "auto")
    _choice("path", path, _LOSS_PATHS)
    chunk_size = option("chunk_size", chunk_size, 1024)
    _positive("chunk_size", chunk_size)
    divergence = option("divergence", divergence, "forward_kl")
    _choice("divergence", divergence, DIVERGENCES)
    teacher_in_memory = teacher if cache_k is None else None
    notes: List[str] = []
    if cache_k is not None and teacher is not None:
        notes.append("cache: the teacher is not in memory (its parameters are not counted)")
    heads = _output_head(student) is not None and (
        teacher_in_memory is None or _output_head(teacher_in_memory) is not None)
    live_topk = cache_k is None and (divergence == "topk_kl"
                                     or option("topk", None, None) is not None)
    if path == "auto":
        path = "fused" if heads and not live_topk else "chunked"
    if path == "fused" and not heads:
        raise ValueError("path='fused' needs output embeddings (get_output_embeddings() "
                         "returning a Linear) on the student and the live teacher; use "
                         "path='chunked'")
    if path == "fused" and live_topk:
        raise ValueError("path='fused' against a live teacher cut to its top k (topk, or "
                         "divergence='topk_kl') is not possible (it needs the teacher's "
                         "logits); use 'chunked'")
    options = dict(divergence=divergence, temperature=float(temperature),
                   beta=option("beta", None, 0.5), alpha=option("alpha", None, 0.1),
                   tail=option("topk_tail", None, "renormalize"), ce_weight=float(ce_weight),
                   vocab_alignment=option("vocab_alignment", None, None), return_dict=True)
    if path != "dense":
        options["chunk_size"] = chunk_size
    if live_topk:
        topk = option("topk", None, None)
        if topk is None:
            raise ValueError("divergence='topk_kl' against a live teacher needs "
                             "lm_config.topk (entries kept per token), got None")
        options["topk"] = topk
    if path == "fused" and cache_k is None and _vocab(student) != _vocab(teacher) \
            and options["vocab_alignment"] is None:
        raise ValueError(f"the student's vocabulary has {_vocab(student)} entries and the "
                         f"teacher's {_vocab(teacher)}: pass lm_config with "
                         f"vocab_alignment='pad' or 'truncate'")

    step, used = None, method
    if method in ("auto", "meta"):
        try:
            step = _meta_step(student, teacher_in_memory, dict(options), path, batch_size,
                              sequence_length, cache_k, dtype)
            used = "meta"
        except (RuntimeError, NotImplementedError, TypeError) as error:
            if method == "meta":
                raise
            notes.append(f"meta run failed ({type(error).__name__}: {str(error)[:120]}); "
                         "analytic estimate: a formula for the loss path and a GPT-like "
                         "student body")
    if step is None:
        step = _analytic_step(student, teacher_in_memory, options, path, batch_size,
                              sequence_length, cache_k, dtype)
        used = "analytic"
        if method == "analytic":
            notes.append("analytic estimate: a formula for the loss path and a GPT-like "
                         "student body")
    teacher_bytes = _state_bytes(teacher_in_memory, dtype)
    student_bytes = _state_bytes(student, dtype)
    gradients = sum(p.numel() * _element_size(p, dtype) for p in _trainable(student))
    state, update = _optimizer_bytes(student, optimizer, dtype, foreach)
    activations = max(step.peak - step.gradients_at_peak, 0)
    total = teacher_bytes + student_bytes + state + max(step.peak, gradients + update)
    return MemoryPlan(path="cache" if cache_k is not None else path, loss_path=path,
                      method=used, batch_size=batch_size, sequence_length=sequence_length,
                      teacher_parameters=teacher_bytes, student_parameters=student_bytes,
                      gradients=gradients, optimizer_state=state, activations=activations,
                      gradients_at_peak=step.gradients_at_peak, optimizer_step=update,
                      total_peak=total, largest_allocation=step.largest,
                      notes=tuple(notes))


def plan_lm_memory_paths(student: nn.Module, teacher: Optional[nn.Module], *,
                         batch_size: int, sequence_length: int, cache_k: int = 64,
                         **options: Any) -> Dict[str, MemoryPlan]:
    """:func:`plan_lm_memory` for every path of :data:`PLAN_PATHS`, same models and batch.

    ``'cache'`` is the teacher cache with ``cache_k`` entries per token (the student side
    on the fused path when it has output embeddings, else chunked: what ``path='auto'``
    gives); ``'fused'`` is left out when a model has no output embeddings, and the live
    paths when ``teacher`` is None. ``options`` are :func:`plan_lm_memory`'s (``path``
    excepted).

    Returns:
        ``{path: MemoryPlan}`` in :data:`PLAN_PATHS` order; print it with
        :func:`format_memory_plans`.
    """
    if "path" in options:
        raise ValueError("plan_lm_memory_paths plans every path; do not pass path=")
    plans: Dict[str, MemoryPlan] = {}
    common = dict(batch_size=batch_size, sequence_length=sequence_length, **options)
    if teacher is not None:
        fused = _output_head(student) is not None and _output_head(teacher) is not None
        for path in ("dense", "chunked") + (("fused",) if fused else ()):
            plans[path] = plan_lm_memory(student, teacher, path=path, **common)
    plans["cache"] = plan_lm_memory(student, None, path="auto", cache_k=cache_k, **common)
    return plans
