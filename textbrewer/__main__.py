"""``python -m textbrewer ...``: the same as the ``textbrewer`` command."""
import sys

from .cli import main

sys.exit(main())
