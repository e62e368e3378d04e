"""Benchmarks of the Supernet on one machine; `python -m bench` writes BENCHMARKS.md.

- `bench.overhead`: what the network (client -> coordinator -> node -> back, real libp2p on
  127.0.0.1) adds per image to a tiny-model render, against calling the backend directly.
- `bench.dispatch`: jobs per second and per-job latency of one coordinator feeding 50 nodes
  whose backend answers at once, against the coordinator's own per-job work without a network;
  free and paid (billing on).
- `bench.chaos`: 1,000 paid jobs on 10 node processes while nodes are SIGKILLed at random and
  the coordinator twice: delivered exactly once, paid once, ledger balanced.
- `bench.fuzz`: malformed streams on every protocol of live daemons, from py-libp2p and
  js-libp2p (`interop/`).
- `bench.cpu_variation` (`cpuvar`, slow): render outputs across emulated CPU code paths, the
  figures behind the portable test thresholds.

Everything binds to 127.0.0.1 only. `bench.settlement` and `bench.pricing_scaling` are
standalone tools with outputs of their own (run each with `python -m bench.<name>`);
`python -m bench` does not run them.
"""
