"""``python -m benchmarks.scale``: the benchmark, or one of its child processes."""

import sys

from benchmarks.scale import main

sys.exit(main(sys.argv[1:], direct=True))
