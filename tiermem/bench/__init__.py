"""``tiermem bench``: bandwidth and latency of every path that matters to offloading, measured one way.

| module       | role                                                                            |
|--------------|---------------------------------------------------------------------------------|
| method       | warm-up, calibrated trials (>= 3 x 100 ms unless quick), median/min/max, clocks |
| memory       | memory names (pageable, pinned, node:N, tiers, cuda:N), pools, pattern, checksum |
| kernels      | Triton kernels: SM copy, UVA row gather, GPU pointer chase                      |
| copy         | copy suite: direction x memory x size x engine (x chunk x streams)              |
| gather       | gather suite: UVA kernel, CPU gather into pinned staging, naive, host           |
| latency      | latency suite: pointer chase from CPUs (numba) and from the GPU                 |
| matrix       | matrix suite: source x destination at one size                                 |
| fingerprint  | the environment of a result (GPU, link, CPU, NUMA, kernel, VM, software, tiers) |
| results      | JSON lines, schema ``tiermem.bench/1``                                          |
| compare      | regressions between two runs (> 5% worse)                                       |
| report, plot | rich tables, PNG                                                               |
| acceptance   | the checks of issues 2 and 3 over one run's cells                               |
| session      | one run: binding, memory, fingerprint, progress, output; how to add a suite     |
| suites       | run a sweep in a session; the quick default sweep                              |
"""
