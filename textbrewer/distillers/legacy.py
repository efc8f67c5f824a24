"""What TextBrewer 0.2.1's distiller subclasses read from ``self.d_config``.

0.2.1 resolved the schedule names of a ``DistillationConfig`` into functions (or None)
and overwrote ``kd_loss_weight`` / ``hard_label_weight`` with their scheduled values
during training; published subclasses (e.g. the BERT-EMD distiller of its MNLI example)
call ``self.d_config.temperature_scheduler(l_S, l_T, self.d_config.temperature)``. Our
configs stay plain data and are never modified, so distillers hand subclasses this view.
"""
from __future__ import annotations

from typing import Any, Dict

from ..configurations import DistillationConfig

__all__ = ["LegacyDistillationView"]


class LegacyDistillationView:
    """A :class:`~textbrewer.DistillationConfig` as 0.2.1's distillers saw it.

    - ``temperature_scheduler``, ``kd_loss_weight_scheduler``,
      ``hard_label_weight_scheduler``: the resolved callables, or None for ``'none'``;
    - ``kd_loss_weight``, ``hard_label_weight``: the current (scheduled) weights;
    - everything else: the configuration's own fields.

    Assignments (``self.d_config.is_caching_logits = False``) are kept in the view and
    never reach the user's configuration object; assigning a weight sets the current
    weight, as it did in 0.2.1.

    Args:
        config: the configuration.
        composer: the :class:`~textbrewer.distillers.composer.LossComposer` holding the
            resolved schedules and current weights.
    """

    _WEIGHTS = ("kd_loss_weight", "hard_label_weight")

    def __init__(self, config: DistillationConfig, composer: Any):
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "_composer", composer)
        object.__setattr__(self, "_overrides", {})

    def __getattr__(self, name: str) -> Any:
        overrides: Dict[str, Any] = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        composer = object.__getattribute__(self, "_composer")
        if name == "temperature_scheduler":
            return composer.temperature_scheduler
        if name == "kd_loss_weight_scheduler":
            return composer.kd_weight_schedule
        if name == "hard_label_weight_scheduler":
            return composer.hard_label_weight_schedule
        if name in self._WEIGHTS:
            return getattr(composer, name)
        return getattr(object.__getattribute__(self, "config"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._WEIGHTS:
            setattr(self._composer, name, value)
        else:
            self._overrides[name] = value

    def to_dict(self) -> Dict[str, Any]:
        """The configuration's ``to_dict()`` (the view's overrides are run-time state)."""
        return self.config.to_dict()

    def __repr__(self) -> str:
        return f"LegacyDistillationView({self.config!r})"
