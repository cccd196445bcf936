"""``python -m benchmarks.events``: the benchmark."""

import sys

from benchmarks.events import main

sys.exit(main(sys.argv[1:]))
