"""Cross-modal distillation: the teacher and the student see different views of a sample.

No new distiller is needed: a batch of the form ``{'teacher': ..., 'student': ...}`` feeds
each model its own inputs (see :func:`textbrewer.distillers.engine.split_batch`), and
:class:`~textbrewer.BasicDistiller` / :class:`~textbrewer.GeneralDistiller` distil across
the two as they are. :class:`TwoViewCollate` builds such batches from single examples in
a DataLoader; the view functions below are examples of a second modality for images.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch.utils.data import default_collate

__all__ = ["TwoViewCollate", "row_column_profiles", "downsample", "crop"]


class TwoViewCollate:
    """A DataLoader ``collate_fn`` giving ``{'teacher': batch_T, 'student': batch_S}``.

    Each example goes through ``teacher_view`` and ``student_view`` (either may be None:
    the example as it is), and each side is collated with ``collate`` (default
    ``torch.utils.data.default_collate``). The labels travel in both views when the view
    functions keep them, so both adaptors can see them.

    Args:
        teacher_view: ``example -> teacher example`` (e.g. the full image).
        student_view: ``example -> student example`` (e.g. projections of the image).
        collate: ``list of examples -> batch``.

    Example:
        >>> views = TwoViewCollate(
        ...     student_view=lambda ex: {"features": row_column_profiles(ex["image"]),
        ...                              "labels": ex["labels"]},
        ...     teacher_view=lambda ex: {"features": ex["image"], "labels": ex["labels"]})
        >>> loader = DataLoader(examples, batch_size=32, shuffle=True, collate_fn=views)
        >>> next(iter(loader))["student"]["features"].shape   # (32, 16)
    """

    def __init__(self, teacher_view: Optional[Callable[[Any], Any]] = None,
                 student_view: Optional[Callable[[Any], Any]] = None,
                 collate: Optional[Callable[[list], Any]] = None):
        for name, view in (("teacher_view", teacher_view), ("student_view", student_view),
                           ("collate", collate)):
            if view is not None and not callable(view):
                raise TypeError(f"{name} must be callable or None, got {type(view).__name__}")
        self.teacher_view = teacher_view
        self.student_view = student_view
        self.collate = collate or default_collate

    def __call__(self, examples: list) -> Dict[str, Any]:
        if not examples:
            raise ValueError("TwoViewCollate got an empty list of examples")
        teacher = [self.teacher_view(e) if self.teacher_view else e for e in examples]
        student = [self.student_view(e) if self.student_view else e for e in examples]
        return {"teacher": self.collate(teacher), "student": self.collate(student)}


def _image(image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.dim() < 2:
        raise ValueError(f"expected an image tensor (..., H, W), got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    return image


def row_column_profiles(image: torch.Tensor) -> torch.Tensor:
    """The mean of each row and of each column of an image: a 1-D "projection" modality.

    Args:
        image: ``(..., H, W)``.

    Returns:
        ``(..., H + W)``: the H row means, then the W column means.
    """
    image = _image(image)
    return torch.cat([image.mean(dim=-1), image.mean(dim=-2)], dim=-1)


def downsample(image: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Average-pools an image by ``factor`` in both directions (a low-resolution view).

    Args:
        image: ``(..., H, W)`` with H and W divisible by ``factor``.

    Returns:
        ``(..., H / factor, W / factor)``.
    """
    image = _image(image)
    height, width = image.shape[-2:]
    if factor < 1 or height % factor or width % factor:
        raise ValueError(f"downsample: factor {factor} does not divide the image size "
                         f"{height}x{width}")
    shaped = image.reshape(*image.shape[:-2], height // factor, factor, width // factor, factor)
    return shaped.mean(dim=(-3, -1))


def crop(image: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """A partial view: ``image[..., top:top + height, left:left + width]``.

    Raises:
        ValueError: the window does not fit in the image.
    """
    image = _image(image)
    full_height, full_width = image.shape[-2:]
    if top < 0 or left < 0 or height < 1 or width < 1 or top + height > full_height \
            or left + width > full_width:
        raise ValueError(f"crop: window top={top}, left={left}, {height}x{width} does not fit "
                         f"in an image of {full_height}x{full_width}")
    return image[..., top:top + height, left:left + width]
