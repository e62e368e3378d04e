"""A whole Supernet on one machine: the local-network launcher (`make demo`, tests, benchmarks)
and the in-process settlement demo. The top layer: it may use every other package."""
