"""Moved to :mod:`textbrewer.training.runtime`; this path is kept for scripts that import
it (its names are the same objects)."""
from ..training.runtime import *  # noqa: F401,F403
from ..training.runtime import __all__  # noqa: F401
