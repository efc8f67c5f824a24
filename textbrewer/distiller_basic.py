"""TextBrewer 0.2.1's `textbrewer.distiller_basic` module path: :class:`~textbrewer.BasicDistiller` and, as in
0.2.1, everything ``textbrewer.distiller_utils`` exports (published subclasses start
with ``from textbrewer.distiller_basic import BasicDistiller``)."""
from .distiller_utils import *  # noqa: F401,F403
from .distillers import BasicDistiller  # noqa: F401
