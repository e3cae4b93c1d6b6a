"""``python -m bench`` (from the repository root): diffcore's throughput comparisons.

One module per op family, ``bench/<family>.py``, declares what to measure: its workloads, the
providers of each row (diffcore's registered implementations and the outside baselines people run)
and the speed targets the issues name. The harness is written once:

- ``bench.core``     the declarations a family module builds (Config, Workload, Case, Provider,
                     Target) and helpers for registry, torch.compile and correctness providers;
- ``bench.harness``  correctness first, then interleaved timing with a same-run copy roofline;
- ``bench.timing``   the timing loop (warm-up, calibrated samples, p20/p50/p80, page faults);
- ``bench.report``   the markdown table, JSON, CSV, ``--compare`` and ``--plot``;
- ``bench.machine``  the machine line at the top of every report;
- ``bench.cli``      the command line.

A family joins the bench by adding its module and its name to :data:`FAMILIES`.
"""

FAMILIES: tuple[str, ...] = ("diffusion", "e2e", "linalg", "random", "sde", "sparse", "sphere", "training")
