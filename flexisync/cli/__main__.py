"""``python -m flexisync.cli``: the ``flexisync`` command (see :mod:`flexisync.cli`)."""

import sys

from flexisync.cli import main

sys.exit(main())
