"""Deep mutual learning: two or more students, trained from scratch, teach each other.

Zhang, Xiang, Hospedales, Lu, "Deep Mutual Learning", CVPR 2018 (arXiv:1706.00384).

Each student ``i`` has its own optimizer and minimises

``hard_label_weight · Σ mean(losses_i) + kd_loss_weight · 1/(K-1) Σ_{j≠i} KD(logits_i, logits_j.detach())``

with the KD loss, temperature and weight schedules of the
:class:`~textbrewer.DistillationConfig` (DML itself uses ``kd_loss_type='kl'`` at
``temperature=1``). There is no teacher. One training step is one phase per student, in
order: student 0 (the distiller's ``model_S``, trained with the optimizer given to
``train()``) updates first, then student 1 learns from the *updated* student 0, and so
on, as in the paper's Algorithm 1.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import checkpoint as ckpt
from ..adaptors import AdaptorError
from ..configurations import DistillationConfig, TrainingConfig
from ..distillers.basic import BasicDistiller
from ..distillers.composer import hard_label_sum
from ..distillers.engine import Phase, forward_model, split_batch
from ..training.phase import check_optimizer_holds
from ..logs import logger

__all__ = ["MutualLearningDistiller", "peer_checkpoint_path"]


def peer_checkpoint_path(output_dir: str, global_step: int, index: int) -> str:
    """``{output_dir}/gs{global_step}.student{index}.pkl``: student ``index`` (≥ 1)'s weights
    (student 0's are ``gs{global_step}.pkl``, as for any distiller)."""
    return os.path.join(output_dir, f"gs{global_step}.student{index}.pkl")


class MutualLearningDistiller(BasicDistiller):
    """Deep mutual learning of ``K ≥ 2`` students (no teacher).

    Args:
        train_config: :class:`~textbrewer.TrainingConfig`.
        distill_config: :class:`~textbrewer.DistillationConfig`: ``kd_loss_type``,
            ``temperature`` (and its scheduler), ``kd_loss_weight``, ``hard_label_weight``
            and their schedules. Intermediate matches and logits caching are not used.
        students: the K students. ``students[0]`` is the distiller's ``model_S``: it is
            trained with the optimizer, scheduler and ``max_grad_norm`` given to ``train()``,
            saved as ``gs{N}.pkl`` and handed to the callback. Student ``i ≥ 1`` is saved as
            ``gs{N}.student{i}.pkl`` (see :func:`peer_checkpoint_path`).
        adaptor_S: ``adaptor(batch, outputs) -> dict`` with ``logits`` (each head
            (B, C) or (B, L, C) with ``logits_mask``) and ``losses`` (the hard-label
            losses); one for all students, or a list of K.
        optimizers: one optimizer per student ``i ≥ 1`` (K - 1 of them), each over that
            student's parameters only. Default: for each, an optimizer of the same class
            and defaults (lr, weight decay, ...) as the one given to ``train()``, over the
            student's parameters (one param group).
        schedulers: one LR scheduler (or None) per student ``i ≥ 1``. Default: built like
            the first student's, with ``scheduler_class(optimizer=..., **scheduler_args)``
            when ``train()`` gets a ``scheduler_class``; none otherwise.
        model_T: must be None (mutual learning has no teacher); accepted for the usual
            argument order.

    Logged terms: ``student/...`` for student 0, ``student{i}/...`` for the others, each
    with ``unweighted_kd_loss`` (the mean over peers) and ``unweighted_hard_label_loss``.

    Example:
        >>> distiller = MutualLearningDistiller(train_config, DistillationConfig(
        ...     kd_loss_type="kl", temperature=1), [net_a, net_b], adaptor_S=adaptor)
        >>> with distiller:
        ...     distiller.train(torch.optim.Adam(net_a.parameters(), 1e-3), loader,
        ...                     num_epochs=10)   # net_b: Adam(lr=1e-3) too, by default
    """

    supports_logits_caching = False

    def __init__(self, train_config: TrainingConfig, distill_config: DistillationConfig,
                 students: Sequence[nn.Module], adaptor_S: Union[Callable, Sequence[Callable]],
                 optimizers: Optional[Sequence[torch.optim.Optimizer]] = None,
                 schedulers: Optional[Sequence[Any]] = None, model_T: Any = None):
        if model_T is not None:
            raise ValueError("MutualLearningDistiller trains students from each other and has "
                             "no teacher: give model_T=None (for a frozen teacher as well, "
                             "add its KD term in a subclass)")
        if isinstance(students, nn.Module) or not isinstance(students, (list, tuple)):
            raise TypeError(f"students must be a list of at least two nn.Module, got "
                            f"{type(students).__name__}")
        if len(students) < 2:
            raise ValueError(f"mutual learning needs at least two students, got {len(students)}")
        for index, student in enumerate(students):
            if not isinstance(student, nn.Module):
                raise TypeError(f"students[{index}] must be an nn.Module, got "
                                f"{type(student).__name__}")
        if len({id(student) for student in students}) != len(students):
            raise ValueError("students must be distinct modules (the same object appears twice)")
        if isinstance(adaptor_S, (list, tuple)):
            if len(adaptor_S) != len(students):
                raise ValueError(f"adaptor_S: {len(adaptor_S)} adaptors for {len(students)} "
                                 f"students; give one for all, or one per student")
            adaptors = list(adaptor_S)
        else:
            adaptors = [adaptor_S] * len(students)
        for index, adaptor in enumerate(adaptors):
            if not callable(adaptor):
                raise TypeError(f"adaptor_S[{index}] is not callable "
                                f"({type(adaptor).__name__})")
        if distill_config.intermediate_matches:
            raise ValueError("MutualLearningDistiller has no teacher features to match: "
                             "intermediate_matches must be empty")
        super().__init__(train_config, distill_config, None, students[0], None, adaptors[0])
        #: all K students, ``students[0] is model_S``
        self.students: List[nn.Module] = list(students)
        self.student_adaptors: List[Callable] = adaptors
        peers = self.students[1:]
        for name, given in (("optimizers", optimizers), ("schedulers", schedulers)):
            if given is not None and not isinstance(given, (list, tuple)):
                raise TypeError(f"{name} must be a list with one entry per student after the "
                                f"first ({len(peers)}: students[1:]), e.g. {name}=[...], got "
                                f"{type(given).__name__}")
        if optimizers is not None:
            optimizers = list(optimizers)
            if len(optimizers) != len(peers):
                raise ValueError(f"optimizers: {len(optimizers)} given for the {len(peers)} "
                                 f"students after the first (students[1:]); student 0 uses the "
                                 f"optimizer given to train()")
            for index, (optimizer, peer) in enumerate(zip(optimizers, peers), 1):
                self._check_peer_optimizer(index, optimizer, peer)
        if schedulers is not None:
            schedulers = list(schedulers)
            if len(schedulers) != len(peers):
                raise ValueError(f"schedulers: {len(schedulers)} given for the {len(peers)} "
                                 f"students after the first")
        if distill_config.hard_label_weight == 0 and \
                distill_config.hard_label_weight_scheduler == "none":
            logger.warning("MutualLearningDistiller: hard_label_weight=0 (DistillationConfig's "
                           "default): the students learn only from each other and never from "
                           "the labels; deep mutual learning uses hard_label_weight=1")
        self._peer_optimizers = optimizers
        self._peer_schedulers = schedulers
        self._scheduler_factory: Optional[Tuple[Callable, Dict[str, Any]]] = None
        self._peer_modes: Optional[List[bool]] = None

    # ------------------------------------------------------------------------------ checks
    def _check_peer_optimizer(self, index: int, optimizer: Any, peer: nn.Module) -> None:
        others = [p for i, s in enumerate(self.students) if i != index for p in s.parameters()]
        check_optimizer_holds(optimizer, f"optimizers[{index - 1}] (student {index})",
                              peer.parameters(), f"student {index}'s parameters",
                              f"students[{index}].parameters()", changes="its phase",
                              forbidden=[(others, "parameters of another student",
                                          "each student needs an optimizer of its own")])

    def initialize_training(self, optimizer, scheduler_class, scheduler_args, scheduler):
        # Remember how student 0's scheduler is built, to build the others' the same way.
        self._scheduler_factory = ((scheduler_class, dict(scheduler_args or {}))
                                   if scheduler_class is not None else None)
        if scheduler_class is None and scheduler is not None and self._peer_schedulers is None:
            logger.warning("MutualLearningDistiller: a ready `scheduler` schedules student 0 "
                           "only; pass scheduler_class/scheduler_args to train() (or "
                           "schedulers=[...]) to schedule every student")
        check_optimizer_holds(optimizer, "the optimizer given to train()", (), "", "",
                              forbidden=[([p for s in self.students[1:] for p in s.parameters()],
                                          "parameters of students[1:]", "build it from "
                                          "students[0].parameters() only (each student has an "
                                          "optimizer of its own)")])
        return super().initialize_training(optimizer, scheduler_class, scheduler_args, scheduler)

    # ------------------------------------------------------------------------------ phases
    def phases(self, student_phase: Phase) -> List[Phase]:
        """Student 0's phase (``train()``'s optimizer), then one phase per other student."""
        phases = [student_phase]
        template = student_phase.optimizer
        for index, peer in enumerate(self.students[1:], 1):
            if self._peer_optimizers is not None:
                optimizer = self._peer_optimizers[index - 1]
            else:
                optimizer = type(template)(peer.parameters(), **template.defaults)
            if self._peer_schedulers is not None:
                scheduler = self._peer_schedulers[index - 1]
            elif self._scheduler_factory is not None:
                factory, options = self._scheduler_factory
                scheduler = factory(optimizer=optimizer, **options)
            else:
                scheduler = None
            phases.append(Phase(f"student{index}", optimizer,
                                functools.partial(self.student_loss, index), [peer], scheduler,
                                student_phase.max_grad_norm))
        return phases

    def train_on_batch(self, batch: Any, args: Dict[str, Any]):
        """Student 0's loss on one micro-batch (its phase)."""
        return self.student_loss(0, batch, args)

    def _forward(self, index: int, batch: Any, args: Dict[str, Any]) -> Dict[str, Any]:
        model = self.forward_student if index == 0 else functools.partial(
            forward_model, self.wrapped(self.students[index]))
        outputs = model(batch, args)
        return self.adapt(self.student_adaptors[index], batch, outputs,
                          f"students[{index}]'s adaptor")

    def student_loss(self, index: int, batch: Any, args: Dict[str, Any]
                     ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Student ``index``'s loss: its hard labels plus the mean KD to the other students'
        detached predictions on the same micro-batch.

        Returns:
            ``(total, {'unweighted_kd_loss': (), 'unweighted_hard_label_loss': ()})``.
        """
        _, student_batch, _ = split_batch(batch)
        student_batch = self.runtime.to_device(student_batch)
        own = self._forward(index, student_batch, args)
        if "logits" not in own:
            raise AdaptorError(f"students[{index}]'s adaptor returned no 'logits' (needed for "
                               f"mutual learning); it returned {sorted(own)}")
        kd = 0
        peers = [j for j in range(len(self.students)) if j != index]
        with torch.no_grad():
            peer_results = [self._forward(j, student_batch, args) for j in peers]
        for j, peer in zip(peers, peer_results):
            if "logits" not in peer:
                raise AdaptorError(f"students[{j}]'s adaptor returned no 'logits'")
            target = {"logits": [head.detach() for head in peer["logits"]]}
            if "logits_mask" in peer:
                target["logits_mask"] = peer["logits_mask"]
            logits_S, logits_T, labels = self.composer.select_logits(own, target)
            kd = kd + self.composer.kd_term(logits_S, logits_T, labels)
        kd = kd / len(peers)
        composer = self.composer
        total = kd * composer.kd_loss_weight
        parts = {"unweighted_kd_loss": kd}
        if "losses" in own:
            hard = hard_label_sum(own["losses"])
            total = total + hard * composer.hard_label_weight
            parts["unweighted_hard_label_loss"] = hard
        elif composer.hard_label_weight > 0:
            composer._warn_once("hard", f"hard_label_weight={composer.hard_label_weight} but "
                                        f"the students' adaptor returns no 'losses': mutual "
                                        f"learning then has no labels to learn from")
        return total, parts

    # ------------------------------------------------------------------------------ modes
    def attach_training_hooks(self) -> None:
        super().attach_training_hooks()
        # the loop sets model_S's mode; the other students train too
        self._peer_modes = [peer.training for peer in self.students[1:]]
        for peer in self.students[1:]:
            peer.train()

    def remove_training_hooks(self) -> None:
        if self._peer_modes is not None:
            for peer, mode in zip(self.students[1:], self._peer_modes):
                peer.train(mode)
            self._peer_modes = None
        super().remove_training_hooks()

    # ------------------------------------------------------------------------------ saving
    def save_and_callback(self, global_step: int, step: int, epoch: int,
                          callback: Optional[Callable]) -> None:
        """Saves students 1.. as ``gs{N}.student{i}.pkl`` (atomically, main process), then
        student 0 as ``gs{N}.pkl`` and runs the callback, as every distiller does."""
        if self.runtime.is_main:
            for index, peer in enumerate(self.students[1:], 1):
                path = peer_checkpoint_path(self.t_config.output_dir, global_step, index)
                ckpt.atomic_save(peer.state_dict(), path)
        super().save_and_callback(global_step, step, epoch, callback)
