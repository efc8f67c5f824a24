"""Moved to :mod:`textbrewer.training.sources`; this path is kept for scripts that import
it (its names are the same objects)."""
from ..training.sources import *  # noqa: F401,F403
from ..training.sources import __all__  # noqa: F401
