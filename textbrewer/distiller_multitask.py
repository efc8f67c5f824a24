"""TextBrewer 0.2.1's `textbrewer.distiller_multitask` module path: :class:`~textbrewer.MultiTaskDistiller` and, as in
0.2.1, everything ``textbrewer.distiller_utils`` exports (published subclasses start
with ``from textbrewer.distiller_multitask import MultiTaskDistiller``)."""
from .distiller_utils import *  # noqa: F401,F403
from .distillers import MultiTaskDistiller  # noqa: F401
