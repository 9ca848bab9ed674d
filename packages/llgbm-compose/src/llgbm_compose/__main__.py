"""Entry point of ``python -m llgbm_compose`` (see :mod:`llgbm_compose.cli`)."""

import sys

from llgbm_compose.cli import main

sys.exit(main())
