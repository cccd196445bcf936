"""aiovirtstream's benchmarks: run them with ``python -m benchmarks`` (``make bench``).

Every public module here is one benchmark with a ``main(argv) -> int``
(0: every target met); ``python -m benchmarks NAME`` runs one of them.
"""
