"""Self-distillation: a network that teaches itself, and born-again generations.

* :class:`SelfDistiller` ("Be Your Own Teacher", Zhang et al. 2019, arXiv:1905.08094): a
  network with auxiliary exits (shallow classifiers on intermediate features). The deepest
  exit teaches the shallower ones (KD on softened logits plus feature hints) and every exit
  learns from the labels. There is no separate teacher model: one forward pass gives the
  students and the teacher.
* :func:`born_again` (Born-Again Networks, Furlanello et al. 2018, arXiv:1805.04770): a
  model of the teacher's own architecture is distilled from it, then the next generation
  from that one, and so on.

How the exits are declared: the model returns what it likes, and the adaptor returns the
exits in TextBrewer's usual keys, shallowest first, deepest (the teacher) last::

    def adaptor(batch, outputs):
        return {"logits": outputs["exit_logits"],      # [(B, C)] * K
                "hidden": outputs["exit_features"],    # [(B, D_k)] * K (optional)
                "labels": batch["labels"]}             # (B,)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..adaptors import AdaptorError
from ..configurations import DistillationConfig, TrainingConfig
from ..distillers.composer import LossComposer, select_logits_with_mask
from ..distillers.engine import AbstractDistiller, split_batch
from ..logs import logger
from ..registry import MATCH_LOSSES

__all__ = ["SelfDistiller", "Generation", "born_again"]


class SelfDistiller(AbstractDistiller):
    """Be Your Own Teacher: the deepest exit of a network distils into its shallower exits.

    With K exits (logits ``z_1 .. z_K``, features ``f_1 .. f_K``, the deepest last) the loss
    of a micro-batch is::

        total = deepest_label_weight · CE(z_K, y)
              + Σ_{k<K} [ hard_label_weight · CE(z_k, y)
                          + kd_loss_weight · KD(z_k, sg(z_K), T)
                          + feature_weight · feature_loss(proj_k(f_k), sg(f_K)) ]

    where ``sg`` stops the gradient (the teacher signal trains only the shallow exits, as in
    the paper), ``KD`` is ``distill_config.kd_loss_type`` at ``distill_config.temperature``
    (with its temperature scheduler) and the weights follow ``distill_config``'s weight
    schedules. The paper's ``(1 − α)·CE + α·KL`` for the shallow exits is
    ``hard_label_weight = 1 − α``, ``kd_loss_weight = α`` with ``kd_loss_type='kl'``
    (T²-scaled), and its ``λ·‖F_k − F_K‖²`` is ``feature_weight = λ`` with
    ``feature_loss='hidden_mse'``.

    The hard-label term of each exit is the cross entropy with the adaptor's ``labels``
    (``-100`` ignored); if the adaptor instead returns ``losses`` with one entry per exit,
    those are used (their means).

    Args:
        train_config: :class:`~textbrewer.TrainingConfig`.
        distill_config: :class:`~textbrewer.DistillationConfig` (``intermediate_matches``
            are not used: the feature hints are this class's ``feature_*`` arguments).
        model: the network with exits (it is trained; there is no other model).
        adaptor: ``adaptor(batch, outputs) -> dict``: ``logits``, a list of K ≥ 2 tensors
            ``(B, C)`` (or ``(B, L, C)`` with ``logits_mask``), shallowest first; ``labels``
            ``(B,)`` / ``(B, L)`` or ``losses`` (K entries); ``hidden``, a list of K features
            ``(B, D_k)`` or ``(B, L, D_k)``, when ``feature_weight > 0``; optional
            ``inputs_mask`` ``(B, L)`` for the feature loss.
        feature_weight: weight λ of the feature hints (0: none; ``hidden`` not needed).
        feature_loss: a match-loss name (``'hidden_mse'``, ``'cos'``, ...) called as
            ``loss(feature_k, feature_K, mask=inputs_mask)``.
        feature_projections: one module (or None) per shallow exit (K − 1 entries) mapping
            its feature to the deepest feature's width (the paper's bottlenecks when they
            are not part of the model); trained with the model.
        deepest_label_weight: weight of the deepest exit's hard-label loss.

    Example:
        >>> distiller = SelfDistiller(TrainingConfig(), DistillationConfig(
        ...     kd_loss_type="kl", temperature=3, kd_loss_weight=0.5, hard_label_weight=0.5),
        ...     model, adaptor, feature_weight=0.03)
        >>> with distiller:
        ...     distiller.train(optimizer, dataloader, num_epochs=10)
    """

    def __init__(self, train_config: TrainingConfig, distill_config: DistillationConfig,
                 model: nn.Module, adaptor: Callable, feature_weight: float = 0.0,
                 feature_loss: str = "hidden_mse",
                 feature_projections: Optional[Sequence[Optional[nn.Module]]] = None,
                 deepest_label_weight: float = 1.0):
        if not isinstance(distill_config, DistillationConfig):
            raise TypeError(f"distill_config must be a DistillationConfig, got "
                            f"{type(distill_config).__name__}")
        super().__init__(train_config, distill_config, None, model, None, adaptor)
        if distill_config.intermediate_matches:
            logger.warning("SelfDistiller ignores intermediate_matches: the feature hints "
                           "between exits are set by feature_weight / feature_loss")
        if feature_weight < 0 or deepest_label_weight < 0:
            raise ValueError(f"feature_weight and deepest_label_weight must be ≥ 0, got "
                             f"{feature_weight} and {deepest_label_weight}")
        self.model = model
        self.adaptor = adaptor
        self.feature_weight = float(feature_weight)
        self.deepest_label_weight = float(deepest_label_weight)
        self.feature_loss_name = feature_loss
        try:
            self.feature_loss = MATCH_LOSSES[feature_loss] if feature_weight > 0 else None
        except KeyError as error:
            raise ValueError(f"feature_loss: {error}") from None
        self.feature_projections: List[Optional[nn.Module]] = list(feature_projections or [])
        for index, projection in enumerate(self.feature_projections):
            if projection is not None and not callable(projection):
                raise TypeError(f"feature_projections[{index}] must be a module or None, got "
                                f"{type(projection).__name__}")
        self.composer = LossComposer(distill_config, use_matches=False, require_logits=True)
        self.composer.to(self.runtime.device)

    # what the loop needs -------------------------------------------------------------------
    def extra_trainable_modules(self) -> List[Tuple[nn.Module, Dict[str, Any]]]:
        """The feature projections (trained with the model)."""
        seen, modules = set(), []
        for projection in self.feature_projections:
            if isinstance(projection, nn.Module) and id(projection) not in seen:
                seen.add(id(projection))
                modules.append((projection, {}))
        return modules

    def update_schedules(self, progress: float) -> None:
        self.composer.update_weights(progress)

    def reset_schedules(self) -> None:
        self.composer.reset_weights()

    # the loss --------------------------------------------------------------------------------
    def exits(self, batch: Any, args: Dict[str, Any]) -> Dict[str, Any]:
        """The adaptor's normalised output on one batch (moved to the device), checked.

        Returns:
            dict with ``logits``, a list of K tensors (mask-selected when the adaptor gives
            ``logits_mask``), and the other keys the adaptor returned.
        """
        _, student_batch, _ = split_batch(batch)
        student_batch = self.runtime.to_device(student_batch)
        results = self.adapt(self.adaptor, student_batch,
                             self.forward_student(student_batch, args), "the exits' adaptor")
        logits = results.get("logits")
        if not logits or len(logits) < 2:
            raise AdaptorError(f"SelfDistiller needs the adaptor to return 'logits' as a list "
                               f"of at least 2 exits (shallowest first, deepest last), got "
                               f"{0 if not logits else len(logits)}")
        shapes = [tuple(z.shape) for z in logits]
        if len(set(shapes)) != 1:
            raise AdaptorError(f"the exits' logits must all have the same shape (the same "
                               f"classes), got {shapes}")
        if "logits_mask" in results:
            results["labels"] = self._select_labels(results)
            results["logits"] = select_logits_with_mask(logits, results["logits_mask"][:1])
        return results

    @staticmethod
    def _select_labels(results: Dict[str, Any]) -> Any:
        labels = results.get("labels")
        if labels is None or labels[0].dim() < 2:
            return labels
        return [labels[0][results["logits_mask"][0].to(torch.bool)]]

    def hard_label_losses(self, results: Dict[str, Any]) -> List[torch.Tensor]:
        """One scalar per exit: the mean cross entropy with ``labels`` (``-100`` ignored),
        or the adaptor's ``losses`` (one per exit)."""
        count = len(results["logits"])
        losses = results.get("losses")
        if losses is not None and len(losses) == count:
            return [loss.mean() for loss in losses]
        labels = results.get("labels")
        if labels is None:
            given = "no 'losses'" if losses is None else f"{len(losses)} 'losses'"
            raise AdaptorError(f"SelfDistiller needs the gold 'labels' (or 'losses' with one "
                               f"entry per exit) from the adaptor; it returned {given} for "
                               f"{count} exits")
        gold = labels[0].reshape(-1)
        out = []
        for logits in results["logits"]:
            rows = logits.reshape(-1, logits.size(-1))
            if rows.size(0) != gold.numel():
                raise AdaptorError(f"{gold.numel()} labels for logits of shape "
                                   f"{tuple(logits.shape)}")
            if bool((gold != -100).any()):
                out.append(F.cross_entropy(rows, gold, ignore_index=-100))
            else:
                out.append(rows.sum() * 0)
        return out

    def feature_losses(self, results: Dict[str, Any]) -> List[torch.Tensor]:
        """One scalar per shallow exit: ``feature_loss(proj_k(f_k), sg(f_K))``."""
        count = len(results["logits"])
        features = results.get("hidden")
        if features is None or len(features) != count:
            raise AdaptorError(f"feature_weight={self.feature_weight} needs 'hidden' from the "
                               f"adaptor: one feature per exit ({count}), got "
                               f"{'none' if features is None else len(features)}")
        if self.feature_projections and len(self.feature_projections) != count - 1:
            raise ValueError(f"feature_projections has {len(self.feature_projections)} entries "
                             f"for {count - 1} shallow exits")
        target = features[-1].detach()
        mask = results.get("inputs_mask")
        out = []
        for index in range(count - 1):
            feature = features[index]
            projection = self.feature_projections[index] if self.feature_projections else None
            if projection is not None:
                feature = projection(feature)
            if feature.shape != target.shape:
                raise AdaptorError(f"exit {index}: feature {tuple(feature.shape)} (after its "
                                   f"projection) and the deepest exit's {tuple(target.shape)} "
                                   f"differ; give feature_projections to map the widths")
            out.append(self.feature_loss(feature, target, mask=mask))
        return out

    def compute_loss(self, results: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The total loss and its parts from the checked adaptor output (see the class)."""
        logits = results["logits"]
        deepest = logits[-1].detach()
        hard = self.hard_label_losses(results)
        labels = results.get("labels")
        kd_terms = [self.composer.kd_term([z], [deepest.clone()], labels)
                    for z in logits[:-1]]
        kd = sum(kd_terms)
        shallow_hard = sum(hard[:-1])
        total = (self.deepest_label_weight * hard[-1]
                 + self.composer.hard_label_weight * shallow_hard
                 + self.composer.kd_loss_weight * kd)
        parts = {"unweighted_kd_loss": kd, "unweighted_hard_label_loss": shallow_hard,
                 "deepest_hard_label_loss": hard[-1]}
        for index, term in enumerate(kd_terms):
            parts[f"exit{index}_kd_loss"] = term
        if self.feature_weight > 0:
            feature = sum(self.feature_losses(results))
            total = total + self.feature_weight * feature
            parts["unweighted_feature_loss"] = feature
        return total, parts

    def train_on_batch(self, batch: Any, args: Dict[str, Any]):
        return self.compute_loss(self.exits(batch, args))


# ---------------------------------------------------------------------------- born-again
@dataclasses.dataclass
class Generation:
    """One generation of :func:`born_again`.

    Attributes:
        index: 0 for the first model (trained on the labels, or given), then 1, 2, ...
        model: the trained model.
        metric: what ``evaluate(model)`` returned.
        teacher: the model it learnt from (the previous generation's), None for index 0.
    """

    index: int
    model: nn.Module
    metric: Any
    teacher: Optional[nn.Module] = None


def born_again(make_student: Callable[[int], nn.Module],
               train_fn: Callable[[nn.Module, Optional[nn.Module], int], None],
               generations: int, evaluate: Optional[Callable[[nn.Module], Any]] = None,
               first_model: Optional[nn.Module] = None) -> List[Generation]:
    """Born-again networks: each generation's student is the next generation's teacher.

    Generation 0 is ``first_model`` if given, else ``make_student(0)`` trained by
    ``train_fn(model, None, 0)`` (on the labels). Generation g ≥ 1 is ``make_student(g)``
    trained by ``train_fn(student, teacher, g)`` with generation g − 1 as the teacher:
    ``train_fn`` builds and runs a distiller (BasicDistiller, GeneralDistiller, ...) of its
    choice. Each model is evaluated right after its training.

    Args:
        make_student: ``generation -> fresh model`` (the same architecture, usually; a new
            initialisation per generation, as in the paper).
        train_fn: ``(student, teacher_or_None, generation) -> None``; trains ``student`` in
            place.
        generations: the number of born-again generations after generation 0 (≥ 1).
        evaluate: ``model -> metric`` (None: metrics are None).
        first_model: an already trained generation 0 (then it is only evaluated).

    Returns:
        ``generations + 1`` :class:`Generation` records, generation 0 first.

    Example:
        >>> def train_fn(student, teacher, generation):
        ...     if teacher is None:
        ...         trainer = BasicTrainer(TrainingConfig(output_dir=f"gen{generation}"),
        ...                                student, adaptor)
        ...     else:
        ...         trainer = BasicDistiller(TrainingConfig(output_dir=f"gen{generation}"),
        ...                                  DistillationConfig(), teacher, student,
        ...                                  adaptor, adaptor)
        ...     with trainer:
        ...         trainer.train(torch.optim.AdamW(student.parameters()), loader,
        ...                       num_epochs=10)
        >>> history = born_again(lambda g: Net(), train_fn, generations=3, evaluate=accuracy)
        >>> [g.metric for g in history]
    """
    if isinstance(generations, bool) or not isinstance(generations, int) or generations < 1:
        raise ValueError(f"generations must be a positive integer (born-again generations "
                         f"after the first model), got {generations!r}")
    if not callable(make_student) or not callable(train_fn):
        raise TypeError("make_student and train_fn must be callables")

    def score(model: nn.Module) -> Any:
        return evaluate(model) if evaluate is not None else None

    def build(index: int) -> nn.Module:
        model = make_student(index)
        if not isinstance(model, nn.Module):
            raise TypeError(f"make_student({index}) returned {type(model).__name__}, not an "
                            f"nn.Module")
        return model

    if first_model is None:
        first_model = build(0)
        train_fn(first_model, None, 0)
    history = [Generation(0, first_model, score(first_model))]
    logger.info("born-again generation 0: metric %s", history[0].metric)
    for index in range(1, generations + 1):
        teacher = history[-1].model
        student = build(index)
        if student is teacher:
            raise ValueError(f"make_student({index}) returned the previous generation's model; "
                             f"each generation needs a new one")
        train_fn(student, teacher, index)
        history.append(Generation(index, student, score(student), teacher))
        logger.info("born-again generation %d: metric %s", index, history[-1].metric)
    return history
