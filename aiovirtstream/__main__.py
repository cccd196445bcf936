"""``python -m aiovirtstream``: the command line (see :mod:`aiovirtstream.cli`)."""

import sys

from .cli import main

sys.exit(main())
