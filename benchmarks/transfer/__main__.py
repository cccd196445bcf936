"""``python -m benchmarks.transfer``: the benchmark, or one of its child processes."""

import sys

from benchmarks.transfer import main

sys.exit(main(sys.argv[1:], direct=True))
