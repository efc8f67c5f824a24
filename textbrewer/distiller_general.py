"""TextBrewer 0.2.1's `textbrewer.distiller_general` module path: :class:`~textbrewer.GeneralDistiller` and, as in
0.2.1, everything ``textbrewer.distiller_utils`` exports (published subclasses start
with ``from textbrewer.distiller_general import GeneralDistiller``)."""
from .distiller_utils import *  # noqa: F401,F403
from .distillers import GeneralDistiller  # noqa: F401
