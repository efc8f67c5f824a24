"""TextBrewer 0.2.1's `textbrewer.distiller_train` module path: :class:`~textbrewer.BasicTrainer` and, as in
0.2.1, everything ``textbrewer.distiller_utils`` exports (published subclasses start
with ``from textbrewer.distiller_train import BasicTrainer``)."""
from .distiller_utils import *  # noqa: F401,F403
from .distillers import BasicTrainer  # noqa: F401
