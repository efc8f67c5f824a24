"""Teacher assistants: distil through intermediate students (Mirzadeh et al., AAAI 2020).

When the student is much smaller than the teacher, it can learn less from the teacher than
from a model of intermediate size that learnt from the teacher first (the "capacity gap").
:func:`distil_through_assistants` runs that chain: teacher → assistant 1 → ... → student,
each link one ordinary distillation with the distiller of your choice, each model the next
one's teacher.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..configurations import DistillationConfig, TrainingConfig
from ..distillers.general import GeneralDistiller
from ..logs import logger

__all__ = ["AssistantStage", "distil_through_assistants"]

Adaptor = Callable[[Any, Any], dict]


@dataclasses.dataclass
class AssistantStage:
    """One link of :func:`distil_through_assistants`.

    Attributes:
        index: 1 for teacher → first model, then 2, 3, ...
        teacher, model: the link's teacher and the model it trained (in place).
        output_dir: where the link's checkpoints went (``{output_dir}/stage{index}``).
        metric: what ``evaluate(model)`` returned (None without ``evaluate``).
    """

    index: int
    teacher: nn.Module
    model: nn.Module
    output_dir: str
    metric: Any = None


def distil_through_assistants(
        train_config: TrainingConfig,
        distill_config: Union[DistillationConfig, Sequence[DistillationConfig]],
        chain: Sequence[Tuple[nn.Module, Adaptor]],
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        dataloader: Any, distiller_class: Optional[type] = None,
        evaluate: Optional[Callable[[nn.Module], Any]] = None,
        **train_options: Any) -> List[AssistantStage]:
    """Distils ``chain[0]`` (the teacher) into ``chain[1]``, that into ``chain[2]``, ... .

    Link k trains ``chain[k][0]`` in place with
    ``distiller_class(config_k, distill_config_k, chain[k-1][0], chain[k][0], chain[k-1][1],
    chain[k][1])`` and ``train(make_optimizer(model), dataloader, **train_options)`` inside
    ``with distiller:``; ``config_k`` is ``train_config`` with ``output_dir`` set to
    ``{output_dir}/stage{k}`` (and ``log_dir``, if set, to ``{log_dir}/stage{k}``), so
    ``resume_from='latest'`` resumes each link from its own folder. The teacher
    (``chain[0]``) must be trained already. ``evaluate`` sees the model in the mode the
    distiller left it (train mode): put it in eval mode inside ``evaluate``.

    Args:
        train_config: the training configuration of every link (its ``output_dir`` is the
            parent of the links' folders).
        distill_config: one ``DistillationConfig`` for every link, or one per link
            (``len(chain) - 1``; e.g. different intermediate matches for different widths).
        chain: ``(model, adaptor)`` pairs from the teacher to the final student (≥ 2).
        make_optimizer: ``model -> optimizer`` over that model's parameters (a fresh one per
            link; the distiller adds its projections to it).
        dataloader: the training data of every link.
        distiller_class: default :class:`~textbrewer.GeneralDistiller`.
        evaluate: ``model -> metric``, run after each link.
        **train_options: passed to each ``train()`` (``num_epochs``, ``scheduler_class``,
            ``callback``, ...).

    Returns:
        one :class:`AssistantStage` per link, in order; the last one's ``model`` is the
        student.
    """
    if len(chain) < 2:
        raise ValueError(f"chain needs the teacher and at least one student, got {len(chain)} "
                         f"model(s)")
    for position, link in enumerate(chain):
        if not (isinstance(link, (tuple, list)) and len(link) == 2):
            raise TypeError(f"chain[{position}] must be a (model, adaptor) pair, got "
                            f"{type(link).__name__}")
        if not isinstance(link[0], nn.Module):
            raise TypeError(f"chain[{position}][0] must be the model (an nn.Module), got "
                            f"{type(link[0]).__name__}")
        if not callable(link[1]):
            raise TypeError(f"chain[{position}][1] must be the adaptor (a function), got "
                            f"{type(link[1]).__name__}")
    if train_config.resume_from not in (None, "latest"):
        raise ValueError(f"distil_through_assistants: resume_from={train_config.resume_from!r} "
                         f"names one checkpoint, but each link writes its own folder; use "
                         f"resume_from='latest' (each link resumes from its own) or None")
    models = [model for model, _ in chain]
    if len({id(model) for model in models}) != len(models):
        raise ValueError("each model of the chain must be a different module (a model "
                         "cannot teach itself)")
    configs = [distill_config] * (len(chain) - 1) if isinstance(distill_config,
                                                                DistillationConfig) \
        else list(distill_config)
    if len(configs) != len(chain) - 1 or not all(isinstance(c, DistillationConfig)
                                                 for c in configs):
        raise ValueError(f"distill_config must be a DistillationConfig or a list of "
                         f"{len(chain) - 1} (one per link), got {distill_config!r:.120}")
    if not callable(make_optimizer):
        raise TypeError("make_optimizer must be a function model -> optimizer")
    distiller_class = GeneralDistiller if distiller_class is None else distiller_class
    stages = []
    for index in range(1, len(chain)):
        (teacher, adaptor_T), (student, adaptor_S) = chain[index - 1], chain[index]
        output_dir = os.path.join(train_config.output_dir, f"stage{index}")
        fields = {**train_config.to_dict(), "output_dir": output_dir}
        if train_config.log_dir:
            fields["log_dir"] = os.path.join(train_config.log_dir, f"stage{index}")
        config = TrainingConfig.from_dict(fields)
        distiller = distiller_class(config, configs[index - 1], teacher, student, adaptor_T,
                                    adaptor_S)
        with distiller:
            distiller.train(make_optimizer(student), dataloader, **train_options)
        metric = evaluate(student) if evaluate is not None else None
        stages.append(AssistantStage(index, teacher, student, output_dir, metric))
        logger.info("teacher-assistant link %d of %d: metric %s", index, len(chain) - 1, metric)
    return stages
