"""``python -m aiovirtstream``: the command line (see :mod:`aiovirtstream._cli`)."""

import sys

from ._cli import main

sys.exit(main())
