"""GeneralDistiller: BasicDistiller plus intermediate-feature matches and custom matches."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

from ..adaptors import AdaptorError
from ..capture import ModuleCapture
from ..configurations import DistillationConfig, TrainingConfig
from ..registry import MATCH_LOSSES
from .basic import BasicDistiller

__all__ = ["GeneralDistiller", "CustomMatch"]


@dataclass
class CustomMatch:
    """A match between the outputs of any two submodules, captured with forward hooks.

    The loss term is ``weight · loss(proj_func(output_S), output_T, inputs_mask_S,
    inputs_mask_T)``.

    Args:
        module_T: a submodule of the teacher; its forward output is captured.
        module_S: a submodule of the student.
        weight: weight of the term.
        loss: ``loss(output_S, output_T, mask_S, mask_T) -> scalar``, or the name of a
            match loss (then called as ``loss(output_S, output_T, mask=mask_S)``).
        proj_func: optional callable applied to the student's output; an ``nn.Module``
            is trained with the student.
        proj_group: optimizer param-group options for ``proj_func``'s parameters.
    """

    module_T: nn.Module
    module_S: nn.Module
    weight: float
    loss: Union[Callable, str]
    proj_func: Optional[Callable] = None
    proj_group: Optional[Dict[str, Any]] = field(default=None)

    def __post_init__(self) -> None:
        for side in ("module_T", "module_S"):
            if not isinstance(getattr(self, side), nn.Module):
                raise TypeError(f"CustomMatch.{side} must be an nn.Module (a submodule whose "
                                f"output is matched), got {type(getattr(self, side)).__name__}")
        if isinstance(self.loss, str):
            MATCH_LOSSES.validate(self.loss)
        elif not callable(self.loss):
            raise TypeError(f"CustomMatch.loss must be callable or a match-loss name, got "
                            f"{type(self.loss).__name__}")
        if self.proj_group is None:
            self.proj_group = {}


class GeneralDistiller(BasicDistiller):
    """Single-teacher distillation with intermediate matches (hidden states, attentions).

    Loss: the BasicDistiller terms (the KD term only when both adaptors return ``logits``)
    ``+ Σ_i weight_i · match_loss_i(proj_i(feature_S[layer_S]), feature_T[layer_T])
    + Σ_j weight_j · custom_match_j``.

    Projections (``proj`` in a match) are built here, moved to the training device, and
    join the optimizer as extra param groups when ``train()`` starts.

    Args:
        train_config, distill_config, model_T, model_S, adaptor_T, adaptor_S: as for
            :class:`~textbrewer.BasicDistiller`; the adaptors should also return
            ``hidden`` / ``attention`` lists (and ``inputs_mask``) for the matches.
        custom_matches: list of :class:`CustomMatch`.
    """

    supports_logits_caching = False
    uses_intermediate_matches = True

    def __init__(self, train_config: TrainingConfig, distill_config: DistillationConfig,
                 model_T: Any, model_S: nn.Module, adaptor_T: Any, adaptor_S: Callable,
                 custom_matches: Optional[Sequence[CustomMatch]] = None):
        super().__init__(train_config, distill_config, model_T, model_S, adaptor_T, adaptor_S)
        self.custom_matches: List[CustomMatch] = []
        self._captured_T: Dict[int, Any] = {}
        self._captured_S: Dict[int, Any] = {}
        self._capturing = False
        self._hook_handles = []
        for index, match in enumerate(custom_matches or []):
            if isinstance(match, dict):
                match = CustomMatch(**match)
            if not isinstance(match, CustomMatch):
                raise TypeError(f"custom_matches[{index}] must be a CustomMatch, got "
                                f"{type(match).__name__}")
            self.add_match(match)
        self._captures = self._build_captures()

    def _build_captures(self) -> Dict[Tuple[str, str], ModuleCapture]:
        """One :class:`ModuleCapture` per (role, 'output'/'input') for module-named matches."""
        names: Dict[Tuple[str, str], List[str]] = {}
        for match in self.composer.matches:
            if match.by_module:
                names.setdefault(("teacher", match.capture), []).append(match.module_T)
                names.setdefault(("student", match.capture), []).append(match.module_S)
        if names and not isinstance(self.model_T, nn.Module):
            raise TypeError(f"intermediate matches by module name need a single teacher "
                            f"nn.Module, got {type(self.model_T).__name__}")
        models = {"teacher": self.model_T, "student": self.model_S}
        for index, match in enumerate(self.composer.matches):
            if not match.by_module:
                continue
            for role, name in (("teacher", match.module_T), ("student", match.module_S)):
                try:  # one name at a time, to say which match names a missing module
                    ModuleCapture(models[role], [name], match.capture, role)
                except ValueError as error:
                    raise ValueError(f"intermediate_matches[{index}]: module_"
                                     f"{role[0].upper()}={name!r}: {error}") from None
        return {(role, what): ModuleCapture(models[role], module_names, what, role)
                for (role, what), module_names in names.items()}

    def attach_training_hooks(self) -> None:
        for capture in self._captures.values():
            capture.attach()

    def remove_training_hooks(self) -> None:
        for capture in self._captures.values():
            capture.remove()

    @property
    def has_custom_matches(self) -> bool:
        """Whether custom matches are set (TextBrewer 0.2.1's attribute)."""
        return bool(self.custom_matches)

    def add_match(self, match: CustomMatch) -> None:
        """Adds a custom match: forward hooks on its two modules capture their outputs.

        Args:
            match: a :class:`CustomMatch` (its modules must be submodules that run in the
                teacher's and the student's forward passes).
        """
        if not isinstance(match, CustomMatch):
            raise TypeError(f"add_match expects a CustomMatch, got {type(match).__name__}")
        index = len(self.custom_matches)
        self.custom_matches.append(match)
        if isinstance(match.proj_func, nn.Module):
            match.proj_func.to(self.runtime.device)
        self._hook_handles.append(match.module_T.register_forward_hook(
            self._capture(self._captured_T, index)))
        self._hook_handles.append(match.module_S.register_forward_hook(
            self._capture(self._captured_S, index)))

    def _capture(self, store: Dict[int, Any], index: int):
        def hook(module, inputs, output):
            if self._capturing:  # evaluation in callbacks must not collect outputs
                store[index] = output
        return hook

    def extra_trainable_modules(self) -> List[Tuple[nn.Module, Dict[str, Any]]]:
        modules = super().extra_trainable_modules()
        for match in self.custom_matches:
            if isinstance(match.proj_func, nn.Module):
                modules.append((match.proj_func, dict(match.proj_group)))
        return modules

    def run_models(self, batch: Any, args: Dict[str, Any]):
        if not self.custom_matches and not self._captures:
            return super().run_models(batch, args)
        self._captured_T.clear()
        self._captured_S.clear()
        self._capturing = True
        with contextlib.ExitStack() as stack:
            for capture in self._captures.values():
                stack.enter_context(capture)
            try:
                results_S, results_T = super().run_models(batch, args)
            finally:
                self._capturing = False
            for (role, _), capture in self._captures.items():
                results = results_S if role == "student" else results_T
                modules = results.setdefault("modules", {})
                for name in capture.names:
                    try:
                        modules[name] = capture[name]
                    except KeyError:
                        pass  # reported by the composer, with the match's index
        return results_S, results_T

    def custom_terms(self, results_S: Dict[str, Any], results_T: Dict[str, Any]):
        """``(name, weight, loss)`` for each custom match, from the captured outputs."""
        terms = []
        for index, match in enumerate(self.custom_matches):
            for side, store in (("teacher", self._captured_T), ("student", self._captured_S)):
                if index not in store:
                    raise AdaptorError(f"custom_matches[{index}]: the {side} module "
                                       f"{type(getattr(match, 'module_' + side[0].upper())).__name__}"
                                       f" did not run during the forward pass")
            output_S, output_T = self._captured_S[index], self._captured_T[index]
            if match.proj_func is not None:
                output_S = match.proj_func(output_S)
            mask_S, mask_T = results_S.get("inputs_mask"), results_T.get("inputs_mask")
            if isinstance(match.loss, str):
                loss = MATCH_LOSSES[match.loss](output_S, output_T, mask=mask_S)
            else:
                loss = match.loss(output_S, output_T, mask_S, mask_T)
            terms.append((f"unweighted_custom_match_{index}", match.weight, loss))
        return terms

    def train_on_batch(self, batch: Any, args: Dict[str, Any]):
        results_S, results_T = self.run_models(batch, args)
        return self.compute_loss(results_S, results_T)

    def compute_loss(self, results_S: Dict[str, Any], results_T: Dict[str, Any]):
        """KD, intermediate-match, custom-match and hard-label terms (0.2.1's method)."""
        return self.composer.compose(results_S, results_T, self.custom_terms(results_S, results_T),
                                     projections=self.projs)

    def remove_hooks(self) -> None:
        """Detaches the custom-match and module-capture hooks from the models."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        self.remove_training_hooks()


