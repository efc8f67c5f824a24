"""TextBrewer 0.2.1's `textbrewer.distiller_multiteacher` module path: :class:`~textbrewer.MultiTeacherDistiller` and, as in
0.2.1, everything ``textbrewer.distiller_utils`` exports (published subclasses start
with ``from textbrewer.distiller_multiteacher import MultiTeacherDistiller``)."""
from .distiller_utils import *  # noqa: F401,F403
from .distillers import MultiTeacherDistiller  # noqa: F401
