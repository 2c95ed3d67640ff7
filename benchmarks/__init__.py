"""dicompipe benchmark suite (not part of the package): ``python -m benchmarks``, see README.md."""
