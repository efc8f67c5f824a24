"""The resumable state of a run, and writing and finding it.

:class:`TrainState` is the state as named entries, each an object with ``state_dict()`` and
``load_state_dict()`` (and, optionally, ``check(saved, path)``, run for every entry before
any is loaded): the run's progress, the student's optimizer, scheduler and grad scaler, the
modules trained with the student, each extra phase, the distiller's own. A part that has
state registers an entry; the file is the entries by name, plus what the checkpointer adds
(format, plan, per-process RNG and data position, the configurations, the fingerprint of
the ``gs{N}.pkl`` weights it pairs with), in the same layout as every earlier release
writes (format 1), so their checkpoints resume.

:class:`Checkpointer` finds the state to resume from (``resume_from``: a file, or
``'latest'`` with a fallback past unreadable ones), checks it against this run, restores
it, and writes new ones atomically on the main process.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .. import checkpoint as ckpt
from ..checkpoint import CheckpointError
from ..logs import logger
from .plan import Progress, TrainingPlan
from .runtime import (full_optimizer_state, load_full_optimizer_state, load_full_state_dict)
from .sources import get_rng_state

__all__ = ["TrainState", "Checkpointer", "ModulesEntry", "OptimizerEntry", "OptionalEntry",
           "PhasesEntry", "FunctionsEntry", "check_fits", "unsharded_shapes",
           "on_main_then_together"]

#: the layout of the training-state files (gs{N}.train_state.pt)
FORMAT = 1


class TrainState:
    """The resumable state of a run: named entries, saved and restored together.

    An entry is any object with ``state_dict()`` and ``load_state_dict(state)``; one may
    also have ``check(saved, path)``, which raises a clear error when the saved state does
    not fit (every entry is checked before any is loaded, so a refused resume changes
    nothing).
    """

    def __init__(self) -> None:
        self._entries: Dict[str, Any] = {}

    def register(self, name: str, entry: Any) -> None:
        """Adds ``entry`` under ``name`` (names are the file's keys: unique)."""
        if name in self._entries:
            raise ValueError(f"the training state already has an entry {name!r}")
        if not (callable(getattr(entry, "state_dict", None))
                and callable(getattr(entry, "load_state_dict", None))):
            raise TypeError(f"training-state entry {name!r} needs state_dict() and "
                            f"load_state_dict(), got {type(entry).__name__}")
        self._entries[name] = entry

    def names(self) -> List[str]:
        return list(self._entries)

    def state_dict(self) -> Dict[str, Any]:
        return {name: entry.state_dict() for name, entry in self._entries.items()}

    def load_state_dict(self, saved: Dict[str, Any], path: str = "",
                        before_loading: Optional[Callable[[], None]] = None) -> None:
        """Checks every entry, then (after ``before_loading()``, when given) loads every
        entry, in registration order."""
        missing = [name for name in self._entries if name not in saved]
        if missing:
            raise CheckpointError(f"resume_from={path!r}: the checkpoint has no {missing} "
                                  f"(it holds {sorted(saved)})")
        for name, entry in self._entries.items():
            check = getattr(entry, "check", None)
            if callable(check):
                check(saved[name], path)
        if before_loading is not None:
            before_loading()
        for name, entry in self._entries.items():
            entry.load_state_dict(saved[name])


class ModulesEntry:
    """A list of modules (those trained with the student: projections, loss modules)."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = list(modules)

    def state_dict(self) -> List[Dict[str, Any]]:
        return [module.state_dict() for module in self.modules]

    def check(self, saved: List[Dict[str, Any]], path: str) -> None:
        if len(saved) != len(self.modules):
            raise CheckpointError(f"resume_from={path!r}: the checkpoint holds {len(saved)} "
                                  f"modules trained with the student (projections, "
                                  f"custom-match projections), this run has "
                                  f"{len(self.modules)}: intermediate_matches' proj entries or "
                                  f"custom_matches changed since it was written")
        for index, (module, state) in enumerate(zip(self.modules, saved)):
            check_fits(f"resume_from={path!r}: trained module {index} "
                       f"({type(module).__name__})", state, module.state_dict(),
                       "this run's module")

    def load_state_dict(self, saved: List[Dict[str, Any]]) -> None:
        for module, state in zip(self.modules, saved):
            module.load_state_dict(state)


class OptimizerEntry:
    """The student's optimizer, its state gathered whole under FSDP2 (a collective)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer
        self.path = ""

    def state_dict(self) -> Dict[str, Any]:
        return full_optimizer_state(self.model, self.optimizer)

    def check(self, saved: Dict[str, Any], path: str) -> None:
        self.path = path
        groups = len(saved["param_groups"])
        if groups != len(self.optimizer.param_groups):
            raise CheckpointError(f"resume_from={path!r}: the saved optimizer has {groups} "
                                  f"parameter groups, this run's has "
                                  f"{len(self.optimizer.param_groups)} (the optimizer's "
                                  f"construction or the projections changed)")

    def load_state_dict(self, saved: Dict[str, Any]) -> None:
        changed = changed_hyperparameters(saved["param_groups"], self.optimizer.param_groups)
        if changed:
            logger.warning("resume_from=%r: the optimizer's settings differ from the checkpoint's "
                           "(%s); training goes on with the checkpoint's, which the saved "
                           "optimizer state restores. To train with the new ones, start a new "
                           "run from its gs{N}.pkl weights", self.path, "; ".join(changed))
        try:
            load_full_optimizer_state(self.model, self.optimizer, saved)
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"resume_from={self.path!r}: the saved optimizer state does "
                                  f"not fit this optimizer ({error})") from None


class OptionalEntry:
    """An object that may be None or have no state (an LR scheduler, a grad scaler): saved
    as None then, and a None on either side loads nothing."""

    def __init__(self, target: Any):
        self.target = target

    def state_dict(self) -> Any:
        return self.target.state_dict() if hasattr(self.target, "state_dict") else None

    def load_state_dict(self, saved: Any) -> None:
        if self.target is not None and saved is not None:
            self.target.load_state_dict(saved)


class PhasesEntry:
    """A scheme's extra phases: each one's modules, optimizer, scheduler and scaler."""

    def __init__(self, phases: Sequence[Any]):
        self.phases = [phase for phase in phases if not phase.is_student]

    def state_dict(self) -> Dict[str, Any]:
        return {phase.name: {
            "modules": [module.state_dict() for module in phase.modules],
            "optimizer": phase.optimizer.state_dict(),
            "scheduler": OptionalEntry(phase.scheduler).state_dict(),
            "scaler": OptionalEntry(phase.scaler).state_dict(),
        } for phase in self.phases}

    def check(self, saved: Dict[str, Any], path: str) -> None:
        names = sorted(phase.name for phase in self.phases)
        if sorted(saved) != names:
            raise _phase_state_error(path, sorted(saved), names)
        for phase in self.phases:
            state = saved[phase.name]
            if len(state["modules"]) != len(phase.modules):
                raise _phase_state_error(path, [f"{phase.name}: {len(state['modules'])} modules"],
                                         [f"{phase.name}: {len(phase.modules)} modules"])
            for module, module_state in zip(phase.modules, state["modules"]):
                check_fits(f"resume_from={path!r}: phase {phase.name!r}'s "
                           f"{type(module).__name__}", module_state, module.state_dict(),
                           "this run's module")

    def load_state_dict(self, saved: Dict[str, Any]) -> None:
        for phase in self.phases:
            state = saved[phase.name]
            for module, module_state in zip(phase.modules, state["modules"]):
                module.load_state_dict(module_state)
            phase.optimizer.load_state_dict(state["optimizer"])
            OptionalEntry(phase.scheduler).load_state_dict(state["scheduler"])
            OptionalEntry(phase.scaler).load_state_dict(state["scaler"])


class FunctionsEntry:
    """An entry made of two functions (a distiller's ``extra_state`` /
    ``load_extra_state``)."""

    def __init__(self, get: Callable[[], Any], put: Callable[[Any], None]):
        self.get, self.put = get, put

    def state_dict(self) -> Any:
        return self.get()

    def load_state_dict(self, saved: Any) -> None:
        self.put(saved)


def on_main_then_together(runtime: Any, work: Callable[[], None], what: str) -> None:
    """Runs ``work`` on the main process; every process then learns whether it failed, so
    a full disk on the main process stops all of them instead of leaving the others
    waiting in the next collective."""
    error = None
    if runtime.is_main:
        try:
            work()
        except BaseException as caught:  # re-raised below, after telling the others
            error = caught
    if runtime.distributed:
        failed = runtime.all_reduce_sum(int(error is not None))
        if failed and error is None:
            raise RuntimeError(f"the main process failed while {what}; see its log")
    if error is not None:
        raise error


class Checkpointer:
    """Finds, checks, restores and writes the training states of one output folder.

    Args:
        runtime: the run's :class:`~textbrewer.training.runtime.Runtime`.
        train_config: its :class:`~textbrewer.TrainingConfig` (``output_dir``,
            ``resume_from``, ``keep_train_states``).
        distill_config: its :class:`~textbrewer.DistillationConfig`, or None.
    """

    def __init__(self, runtime: Any, train_config: Any, distill_config: Any = None):
        self.runtime = runtime
        self.t_config = train_config
        self.d_config = distill_config
        self.output_dir = train_config.output_dir

    # finding ---------------------------------------------------------------------------------
    def find(self, plan: TrainingPlan) -> Optional[Dict[str, Any]]:
        """The training state named by ``resume_from``, checked against this run's plan,
        process count and configuration, or None (nothing to resume)."""
        target = self.t_config.resume_from
        if target is None:
            return None
        if target == "latest":
            state = self._latest_complete()
            if state is None:
                return None
            path = state["path"]
        else:
            path = os.fspath(target)
            if os.path.isdir(path):
                raise ValueError(resume_folder_message(target, path))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"resume_from={target!r}: no such file")
            state = ckpt.load_state(path)
            state["path"] = path
        for key in ("mode", "num_epochs", "total_steps"):
            saved, current = state["plan"][key], getattr(plan, key)
            if saved != current:
                if key == "total_steps" and plan.mode == "steps":
                    raise ValueError(f"resume_from={path!r}: the checkpoint was written by a run "
                                     f"with num_steps={saved!r}, this run has num_steps="
                                     f"{current!r}; a run resumes with the plan it started with "
                                     f"(the schedules are sized by it): to train longer, start a "
                                     f"new run from its gs{{N}}.pkl weights")
                raise ValueError(f"resume_from={path!r}: the checkpoint was written by a run with "
                                 f"{key}={saved!r}, this run has {key}={current!r}")
        if len(state["per_rank"]) != self.runtime.world_size:
            raise ValueError(f"resume_from={path!r}: saved by {len(state['per_rank'])} processes, "
                             f"this run has {self.runtime.world_size}")
        if self.d_config is not None and state.get("distill_config") is not None:
            current = self.d_config.to_dict()
            changed = sorted(key for key in set(current) | set(state["distill_config"])
                             if current.get(key) != state["distill_config"].get(key))
            if changed:
                values = "; ".join(f"{key}: {short_repr(state['distill_config'].get(key))} in "
                                   f"the checkpoint, {short_repr(current.get(key))} now"
                                   for key in changed)
                logger.warning("resume_from=%r: the DistillationConfig differs from the one the "
                               "checkpoint was written with, in %s (%s); training goes on with "
                               "the new values", path, changed, values)
        return state

    def _latest_complete(self) -> Optional[Dict[str, Any]]:
        output_dir = self.output_dir
        candidates = ckpt.state_paths_newest_first(output_dir) if os.path.isdir(output_dir) \
            else []
        problems = []
        for path in candidates:
            try:
                state = ckpt.load_state(path)
            except CheckpointError as error:
                problems.append(str(error))
                logger.warning("resume_from='latest': skipping %s", error)
                continue
            state["path"] = path
            return state
        if problems:
            # Starting afresh would overwrite the gs{N}.pkl files of the broken run.
            raise CheckpointError(f"resume_from='latest': no usable training state in "
                                  f"{output_dir}: " + "; ".join(problems))
        logger.info("resume_from='latest': no training state in %s; starting fresh", output_dir)
        return None

    # restoring -------------------------------------------------------------------------------
    def restore(self, saved: Dict[str, Any], train_state: TrainState, model_S: nn.Module,
                source: Any) -> Dict[str, Any]:
        """Loads the student's weights (from the ``gs{N}.pkl`` beside the state), every
        entry of ``train_state`` and this process's data position; returns its RNG state,
        to restore once the data source is positioned."""
        path, global_step = saved["path"], saved["progress"]["global_step"]
        weights_path = ckpt.student_checkpoint_path(os.path.dirname(path), global_step)
        weights = ckpt.load_student_weights(weights_path, map_location=self.runtime.device)
        check_fits(f"resume_from={path!r}: the saved student {weights_path}", weights,
                   unsharded_shapes(model_S), "model_S")
        if "phases" not in saved:  # written before schemes had phases
            saved = {**saved, "phases": {}}
        train_state.load_state_dict(saved, path,
                                    before_loading=lambda: load_full_state_dict(model_S, weights))
        local = saved["per_rank"][self.runtime.rank]
        source.load_state_dict(local["source"])
        logger.info("Resumed from %s at global step %d", path, global_step)
        return local["rng"]

    # writing ---------------------------------------------------------------------------------
    def write(self, progress: Progress, plan: TrainingPlan, train_state: TrainState,
              source: Any) -> None:
        """Writes ``gs{step}.train_state.pt`` (after the ``gs{step}.pkl`` it pairs with),
        atomically, on the main process; every process takes part (collectives: the
        per-process RNG and data positions, FSDP2's optimizer state)."""
        local = {"rng": get_rng_state(), "source": source.state_dict()}
        entries = train_state.state_dict()  # FSDP2: the optimizer's is a collective
        if self.runtime.distributed:
            gathered: List[Any] = [None] * self.runtime.world_size
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        on_main_then_together(self.runtime,
                              lambda: self._write(progress, plan, entries, gathered),
                              f"writing gs{progress.global_step}.train_state.pt")

    def _write(self, progress: Progress, plan: TrainingPlan, entries: Dict[str, Any],
               gathered: List[Any]) -> None:
        output_dir = self.output_dir
        student_file = ckpt.student_checkpoint_path(output_dir, progress.global_step)
        state = {
            "format": FORMAT,
            "plan": {"mode": plan.mode, "total_steps": plan.total_steps,
                     "num_epochs": plan.num_epochs},
            "student_file_bytes": os.path.getsize(student_file),
            "student_file_fingerprint": ckpt.file_fingerprint(student_file),
            "per_rank": gathered,
            **entries,
            "train_config": self.t_config.to_dict(),
            "distill_config": self.d_config.to_dict() if self.d_config is not None else None,
        }
        ckpt.atomic_save(state, ckpt.state_path(output_dir, progress.global_step))
        for path in ckpt.prune_train_states(output_dir, self.t_config.keep_train_states):
            logger.debug("Removed the older training state %s (keep_train_states=%s)", path,
                         self.t_config.keep_train_states)

    # the folder ------------------------------------------------------------------------------
    def remove_stale_temporaries(self) -> None:
        """Removes the temporary files an interrupted run left (main process)."""
        if self.runtime.is_main and os.path.isdir(self.output_dir):
            for path in ckpt.remove_stale_temporaries(self.output_dir):
                logger.warning("Removed %s, a temporary file left by an interrupted run", path)

    def set_aside_later_states(self, start: int) -> None:
        """Before a run's first checkpoint: moves another run's training states of steps
        after ``start`` out of the folder, so that ``resume_from='latest'`` finds this
        run's (not earlier: a run that fails before then leaves the folder as it was)."""
        if not self.runtime.is_main:
            return
        moved = ckpt.set_aside_states(self.output_dir, start)
        if moved:
            logger.warning("This run starts at step %d in %s, which holds training states of "
                           "later steps from another run: moved %d of them to %s, so that "
                           "resume_from='latest' finds this run's", start, self.output_dir,
                           len(moved), os.path.dirname(moved[0]))


def short_repr(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + " ..."


def changed_hyperparameters(saved_groups: Sequence[Dict[str, Any]],
                             current_groups: Sequence[Dict[str, Any]]) -> List[str]:
    """``'param group 0: lr 0.01 in the checkpoint, 0.001 in this run'`` for each setting of
    this run's optimizer that loading the saved state would replace. With an LR scheduler
    the learning rate compared is the one it started from (``initial_lr``)."""
    def plain(value):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return value.item()
        return list(value) if isinstance(value, tuple) else value

    changes = []
    for index, (saved, current) in enumerate(zip(saved_groups, current_groups)):
        scheduled = "initial_lr" in saved and "initial_lr" in current
        for key in current:
            if key in ("params", "param_names", "initial_lr") or key not in saved:
                continue
            name = key
            if key == "lr" and scheduled:
                key, name = "initial_lr", "lr (before the LR scheduler)"
            try:
                differs = bool(plain(saved[key]) != plain(current[key]))
            except (RuntimeError, TypeError, ValueError):
                continue
            if differs:
                changes.append(f"param group {index}: {name} {plain(saved[key])!r} in the "
                               f"checkpoint, {plain(current[key])!r} in this run")
    return changes


def resume_folder_message(target: Any, folder: str) -> str:
    """What to say when ``resume_from`` names a folder instead of a training-state file."""
    states = ckpt.state_paths_newest_first(folder)
    message = (f"resume_from={target!r} is a folder; resume_from takes one of the training-state "
               f"files (gs{{N}}.train_state.pt) a run writes beside its gs{{N}}.pkl weights, or "
               f"'latest' for the newest complete one in output_dir")
    if states:
        shown = ", ".join(repr(path) for path in states[:5]) + (" ..." if len(states) > 5 else "")
        return (f"{message}. It holds {len(states)} training state(s): {shown}; e.g. "
                f"resume_from={states[0]!r} (the newest), or TrainingConfig(output_dir="
                f"{folder!r}, resume_from='latest')")
    weights = sorted(name for name in os.listdir(folder)
                     if name.startswith("gs") and name.endswith(".pkl"))
    if weights:
        return (f"{message}. It holds no training state, only student weights {weights[:5]}, "
                f"which do not resume a run: load them into the student "
                f"(model_S.load_state_dict(torch.load(...))) and start a new run")
    return f"{message}. It holds no training state (no gs{{N}}.train_state.pt file)"


def _phase_state_error(path: str, saved: List[str], current: List[str]) -> CheckpointError:
    return CheckpointError(f"resume_from={path!r}: the checkpoint was written with the extra "
                           f"phases {saved}, this run has {current}")


def check_fits(what: str, saved: Dict[str, Any], current: Dict[str, Any], target: str) -> None:
    """A clear error when a saved state dict does not fit a module's (keys, shapes)."""
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    # an empty current tensor is a buffer its module sizes on first use (a quantisation
    # observer's min/max): its own load_state_dict takes the saved size
    mismatched = [f"{key}: saved {tuple(saved[key].shape)}, {target} {tuple(current[key].shape)}"
                  for key in current if key in saved and isinstance(saved[key], torch.Tensor)
                  and saved[key].shape != current[key].shape and current[key].numel() > 0]
    if missing or unexpected or mismatched:
        details = []
        if mismatched:
            details.append(f"shapes differ for {len(mismatched)} entries "
                           f"({'; '.join(mismatched[:3])})")
        if missing:
            details.append(f"missing {missing[:5]}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}")
        raise CheckpointError(f"{what} does not fit {target}: " + ", ".join(details))


def unsharded_shapes(module: nn.Module) -> Dict[str, Any]:
    """The module's state-dict entries with their full shapes (a DTensor's global shape)."""
    return {key: torch.empty(tuple(value.shape), device="meta")
            if isinstance(value, torch.Tensor) else value
            for key, value in module.state_dict().items()}
