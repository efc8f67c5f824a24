"""The training loop and its parts, read top to bottom from :mod:`.loop`.

:mod:`.loop` (``run`` and the ``Task`` protocol a distiller implements), :mod:`.plan`
(how long, when to save), :mod:`.phase` (the updates of a step), :mod:`.state` (the
resumable state and its checkpointer), :mod:`.batches`, :mod:`.runtime` (device,
precision, DDP / FSDP2, compile) and :mod:`.sources` (data that resumes exactly). See
``docs/architecture.md``. Nothing here imports :mod:`textbrewer.distillers`.
"""
from .phase import Phase
from .plan import Progress, TrainingPlan
from .state import Checkpointer, TrainState

__all__ = ["Phase", "TrainingPlan", "Progress", "TrainState", "Checkpointer"]
