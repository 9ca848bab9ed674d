"""Entry point of ``python -m llgbm_worlds`` (see :mod:`llgbm_worlds.cli`)."""

import sys

from llgbm_worlds.cli import main

sys.exit(main())
