"""gibbs benchmark suite: gibbs side by side with a raw multiprocessing Pipe
(the limit) and ProcessPoolExecutor behind ``loop.run_in_executor`` (the
stdlib alternative), in one run on one machine.

Run from the repository root::

    python -m benchmarks              # full run (~5 min), writes benchmarks/RESULTS.md
    python -m benchmarks --quick      # smoke run (< 60 s), smaller sizes
    python -m benchmarks --repeat 7   # more repetitions (medians are reported)
    python -m benchmarks --no-write   # print the table only

Modules:

* ``models``     - the models and the Pipe echo child (importable by workers)
* ``common``     - timing/statistics helpers, machine description, process reaping
* ``baselines``  - raw Pipe, ProcessPoolExecutor, shared-memory copies
* ``gibbs_bench``- the same workloads through a gibbs Hub
* ``queue_bench``- memory per queued request and drain throughput (run in
                   fresh subprocesses so that each measurement starts clean)
* ``batching_bench`` - adaptive batching (rows 7): a stand-in GPU model
                   batched vs unbatched; LitServe and Ray Serve where installed
* ``serving``    - LitServe server process and HTTP client, Ray Serve child
* ``litserve_app``, ``ray_app`` - the same model under LitServe / Ray Serve
                   (optional: ``pip install litserve 'ray[serve]'``)
* ``report``     - the markdown table and RESULTS.md
* ``runner``     - command line, orchestration, targets

``two_hosts.py`` (veth vs loopback throughput, run as root) is a separate
script and not part of ``python -m benchmarks``.
"""
