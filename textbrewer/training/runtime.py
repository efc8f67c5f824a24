"""The one object that owns device, precision and the process group.

The training loop asks it instead of scattering ``if fp16`` / ``if distributed`` checks.
"""
from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Mapping
from typing import Any, Dict, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..configurations import TrainingConfig
from ..logs import logger

__all__ = ["Runtime", "move_to_device", "cpu_has_native_bf16", "is_fsdp_sharded",
           "full_state_dict", "load_full_state_dict", "full_optimizer_state",
           "load_full_optimizer_state"]

_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

if dist.is_available():
    # torch.distributed.nn.functional's functions default to ``group=group.WORLD``, evaluated
    # on import. Imported once a group exists (DistributedDataParallel imports it, through
    # torch._dynamo), they hold that group for good: destroy_process_group() then leaves it,
    # and its gloo worker threads, alive into interpreter shutdown. A worker thread that frees
    # a finished collective's tensor there needs the GIL, Python ends the thread, and the
    # process aborts ("terminate called without an active exception"). Imported now, before
    # any group exists, the defaults are None.
    try:
        import torch.distributed.nn.functional  # noqa: F401
    except ImportError:  # a build without parts of torch.distributed
        pass


def move_to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Moves every tensor inside nested dicts, lists and tuples to ``device``.

    Lists and tuples come back as tuples (as TextBrewer 0.2.1 did). A mapping keeps its
    type where the type can be built from a dict (a ``transformers.BatchEncoding``, an
    ``OrderedDict``), so the adaptor sees what the dataloader gave; otherwise a dict.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (list, tuple)):
        return tuple(move_to_device(item, device, non_blocking) for item in batch)
    if isinstance(batch, Mapping):
        moved = {key: move_to_device(value, device, non_blocking) for key, value in batch.items()}
        if type(batch) is dict:
            return moved
        try:
            return type(batch)(moved)
        except Exception:  # a Mapping type that cannot be built from a dict
            return moved
    return batch


def is_fsdp_sharded(module: nn.Module) -> bool:
    """Whether ``module`` or one of its submodules was sharded with FSDP2 (``fully_shard``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(child, FSDPModule) for child in module.modules())


def full_state_dict(module: nn.Module) -> Dict[str, Any]:
    """``module.state_dict()``; for an FSDP2-sharded module the gathered, unsharded tensors on
    the CPU (a collective: every process must call it)."""
    if not is_fsdp_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))


def load_full_state_dict(module: nn.Module, state: Dict[str, Any]) -> None:
    """Loads an unsharded state dict into ``module``, sharding it again under FSDP2."""
    if not is_fsdp_sharded(module):
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """``optimizer.state_dict()``; gathered (a collective) when ``module`` is FSDP2-sharded."""
    if not is_fsdp_sharded(module):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict)
    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer,
                              state: Dict[str, Any]) -> None:
    """Loads what :func:`full_optimizer_state` returned."""
    if not is_fsdp_sharded(module):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_optimizer_state_dict)
    set_optimizer_state_dict(module, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))


def cpu_has_native_bf16() -> Optional[bool]:
    """Whether this CPU computes bf16 natively (AVX512-BF16, AMX or Arm's BF16); None if unknown.

    Read from ``/proc/cpuinfo`` (Linux); without native support, bf16 matrix products are
    emulated and run several times slower than fp32.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


class Runtime:
    """Device, autocast, grad scaler and process group for one training run.

    Distributed training is on when ``TrainingConfig.local_rank >= 0`` or torchrun's
    ``WORLD_SIZE > 1`` is in the environment; the process group is initialised here if
    the script has not done it (NCCL on CUDA, gloo on CPU). A group initialised here lasts
    for the training: :meth:`close` destroys it when ``train()`` ends, also on error, and the
    next ``train()`` initialises it again. A group the script initialised is left to the
    script (to use after training, and to destroy).

    Args:
        config: the training configuration.

    Raises:
        ValueError: ``device`` names CUDA but CUDA is not available, or the device index
            does not exist.
    """

    def __init__(self, config: TrainingConfig):
        self.config = config
        world_size = _env_int("WORLD_SIZE", 1)
        self.local_rank = config.local_rank
        if self.local_rank == -1 and world_size > 1:
            self.local_rank = _env_int("LOCAL_RANK", 0)
        self.distributed = self.local_rank != -1
        self.device = self._resolve_device(torch.device(config.device))
        # the default group this runtime initialised (a weak reference: holding the group
        # would keep it, and its threads, alive after it is destroyed)
        self._own_group: Optional[weakref.ref] = None
        self.ensure_process_group()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.precision = config.mixed_precision
        if self.precision == "bf16" and self.device.type == "cpu" and \
                cpu_has_native_bf16() is False:
            logger.warning("mixed_precision='bf16' on a CPU without native bf16 (no AVX512-BF16 "
                           "or AMX in /proc/cpuinfo): bf16 is emulated there and a step is "
                           "typically several times slower than in fp32; "
                           "mixed_precision='no' will be faster on this machine")
        self.autocast_dtype = _AUTOCAST_DTYPES.get(self.precision)
        self.scaler = (torch.amp.GradScaler(self.device.type)
                       if self.precision == "fp16" else None)
        # Optimizer steps the grad scaler skipped (inf/nan gradients), kept on the device
        # and read only when logged.
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=self.device)

    def _resolve_device(self, device: torch.device) -> torch.device:
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"TrainingConfig.device={self.config.device!r} but CUDA is not "
                                 f"available (torch.cuda.is_available() is False); use "
                                 f"device='cpu'")
            if self.distributed and device.index is None:
                device = torch.device("cuda", self.local_rank)
            index = device.index if device.index is not None else torch.cuda.current_device()
            if index >= torch.cuda.device_count():
                raise ValueError(f"TrainingConfig.device={self.config.device!r}: only "
                                 f"{torch.cuda.device_count()} CUDA device(s) are visible")
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
        return device

    # precision ---------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for the forward passes and losses; a no-op in full precision."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def new_scaler(self) -> Optional[torch.amp.GradScaler]:
        """A grad scaler for another optimizer (fp16 only; None otherwise)."""
        return torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def backward(self, loss: torch.Tensor, scaler: Any = "default") -> None:
        """``loss.backward()``, through the grad scaler under fp16 (``scaler``: another
        phase's scaler; default: the student's)."""
        scaler = self.scaler if scaler == "default" else scaler
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer,
                       clip_parameters: Iterable[nn.Parameter], max_grad_norm: float,
                       scaler: Any = "default") -> None:
        """Unscales (fp16), clips ``clip_parameters`` if ``max_grad_norm > 0``, steps."""
        scaler = self.scaler if scaler == "default" else scaler
        if max_grad_norm is not None and max_grad_norm > 0:
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(list(clip_parameters), max_grad_norm)
        if scaler is not None:
            scale_before = scaler.get_scale() if not hasattr(scaler, "_scale") \
                else scaler._scale.clone()
            scaler.step(optimizer)
            scaler.update()
            scale_after = scaler._scale if hasattr(scaler, "_scale") \
                else scaler.get_scale()
            # update() lowers the scale exactly when the step was skipped
            self.skipped_steps += torch.as_tensor(scale_after < scale_before,
                                                  device=self.device).to(torch.int64)
        else:
            optimizer.step()

    # data ----------------------------------------------------------------------------------
    def to_device(self, batch: Any) -> Any:
        """Moves a batch to the training device (asynchronously from pinned memory on CUDA)."""
        return move_to_device(batch, self.device, non_blocking=self.device.type == "cuda")

    # processes -----------------------------------------------------------------------------
    @property
    def owns_process_group(self) -> bool:
        """Whether the default process group is the one this runtime initialised."""
        return (self._own_group is not None and dist.is_initialized()
                and self._own_group() is dist.group.WORLD)

    def ensure_process_group(self) -> None:
        """Initialises the default process group under distributed training if none exists
        (NCCL on CUDA, gloo on CPU); :meth:`close` destroys a group made here."""
        if not self.distributed or dist.is_initialized():
            return
        dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        self._own_group = weakref.ref(dist.group.WORLD)

    def close(self) -> None:
        """Destroys the default process group if this runtime initialised it (a group the
        script initialised is left to the script); does nothing otherwise, or twice.

        Destroying the group joins its threads (gloo's worker and transport threads), provided
        nothing else holds it: the training loop drops its DDP wrappers first. Threads left
        running into interpreter shutdown can abort the process as it exits.
        """
        owned = self.owns_process_group
        self._own_group = None
        if owned:
            dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        """Whether this process logs, saves checkpoints and runs callbacks."""
        return self.rank == 0

    def barrier(self) -> None:
        """Waits for every process (a no-op in a single process)."""
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def all_reduce_sum(self, value: int) -> int:
        """The sum of an integer over all processes (itself in a single process)."""
        if not self.distributed:
            return value
        total = torch.tensor([value], dtype=torch.int64,
                             device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(total)
        return int(total.item())

    def wrap_trainable(self, module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """DistributedDataParallel (or DataParallel) around the trainable module, if asked.

        A module sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) already
        synchronises its gradients and is returned as it is.
        """
        if is_fsdp_sharded(module):
            return module
        if self.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(
                module, device_ids=device_ids,
                find_unused_parameters=find_unused_parameters)
        if self.config.data_parallel and self.device.type == "cuda" \
                and torch.cuda.device_count() > 1:
            return nn.DataParallel(module)
        return module

    def no_sync(self, modules: Any, skip: bool) -> contextlib.AbstractContextManager:
        """DDP's ``no_sync()`` (of a module or a list of them) on micro-batches that do not
        end an accumulation window."""
        stack = contextlib.ExitStack()
        if skip:
            for module in modules if isinstance(modules, (list, tuple)) else [modules]:
                if isinstance(module, nn.parallel.DistributedDataParallel):
                    stack.enter_context(module.no_sync())
        return stack

    def maybe_compile(self, module: nn.Module) -> nn.Module:
        """``torch.compile(module, **options)`` when ``TrainingConfig.compile`` asks for it."""
        options = self.config.compile
        if options is False:
            return module
        return torch.compile(module, **(options if isinstance(options, dict) else {}))
