"""GPU benchmarks, run on a lent GPU machine as standalone scripts (see README.md here)."""
