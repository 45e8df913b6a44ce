"""The results table (markdown) and benchmarks/RESULTS.md."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


@dataclass
class Row:
    key: str  # "1", "2", "3i", ...
    measure: str
    gibbs: str
    baseline: str
    ratio: str = ""
    target: str = ""
    ok: Optional[bool] = None  # None: reported only
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.ok is None:
            return "reported"
        return "PASS" if self.ok else "MISS"


HEADER = "| # | Measure | gibbs | Baseline | Ratio | Target | Result |"
RULE = "|---|---|---:|---:|---:|---|:---:|"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(rows: list[Row]) -> str:
    lines = [HEADER, RULE]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                _cell(x)
                for x in (r.key, r.measure, r.gibbs, r.baseline, r.ratio, r.target, r.status)
            )
            + " |"
        )
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    judged = [r for r in rows if r.ok is not None]
    passed = sum(1 for r in judged if r.ok)
    misses = ", ".join(r.key for r in judged if not r.ok)
    return f"{passed} of {len(judged)} targets met" + (f" (missed: {misses})" if misses else "")


def machine_block(info: dict[str, Any]) -> str:
    keys = [
        ("cpu", "CPU"),
        ("cores", "Logical CPUs"),
        ("affinity", "CPUs usable by this process"),
        ("memory", "Memory"),
        ("python", "Python"),
        ("platform", "Platform"),
        ("numpy", "NumPy"),
        ("gibbs", "gibbs"),
        ("date", "Date"),
        ("load", "Load average (1/5/15 min) before / after"),
        ("elapsed", "Benchmark wall time"),
        ("mode", "Mode"),
    ]
    lines = ["| | |", "|---|---|"]
    for k, label in keys:
        if k in info and info[k] not in (None, ""):
            lines.append(f"| {label} | {_cell(str(info[k]))} |")
    return "\n".join(lines)


def notes(rows: list[Row]) -> str:
    out = []
    for r in rows:
        if r.note:
            out.append(f"* **{r.key}** {r.note}")
    return "\n".join(out)


METHOD = """\
How each figure is measured (all in one run of `python -m benchmarks`, on the
machine above; every figure is the median over the repetitions, and the gibbs
and baseline measurements of one repetition run back to back, interleaved, so
that a change of machine load affects both alike):

* **Raw Pipe**: one echo child process behind a duplex
  `multiprocessing.Pipe`; `conn.send(i)` / `conn.recv()` of a small int (the
  same pickling a gibbs request does). Latency: median of sequential round
  trips. Throughput: 64 messages kept in flight from one thread.
* **ProcessPoolExecutor (PPE)**: `ProcessPoolExecutor(2)` (fork), calls made
  with `loop.run_in_executor(pool, identity, x)` from asyncio tasks, its
  processes started before timing.
* **gibbs**: `Hub(port=0)` with default options ({hub_defaults}), `Worker(Echo, gibbs_host="127.0.0.1")` processes
  (fork) on this machine (gibbs decides how a local worker connects), calls
  made with `await hub.request(x)`. The trivial-model rows share one hub with
  two workers (one of them busy at a time for the sequential latency).
* **64 concurrent callers**: 64 asyncio tasks share a fixed number of calls,
  each awaiting its answer before its next call; throughput = calls / wall
  time; p50/p99 over every call's latency.
* **16 MiB array**: float64 NumPy array, identity model, one call at a time.
  The baseline is the two copies a transport that reads in place on both
  sides cannot avoid: the array written into a `multiprocessing.shared_memory`
  segment (the request) and copied out of it once (the answer), with a
  segment created before timing (pages already faulted in). For
  information: four copies (written in and read out, there and back), and
  the same with a fresh segment per direction (create, fault in, copy in,
  copy out, unlink).
* **Memory**: a fresh interpreter, a started hub with no worker connected,
  N requests queued with `hub.submit(i)` (the futures kept in a list made
  before the baseline); growth of tracemalloc's traced memory (every Python
  and raw allocation, the bridge thread's included) divided by N. The
  `concurrent.futures.Future` that `submit` returns is counted (the hub makes
  it); a bare Future is measured alone for the
  breakdown. RSS growth (another fresh interpreter, no tracemalloc) and the
  asyncio path (N tasks awaiting `hub.request(i)` minus N tasks awaiting a
  bare future, i.e. without the cost of the Task itself) are shown for
  information.
* **Drain**: a fresh interpreter queues N requests with `hub.submit` while no
  worker is connected; then two workers connect; each takes one request and
  holds it at a gate (a `multiprocessing.Event`) so that process start-up and
  connection are not timed; the clock runs from opening the gate to the last
  future resolved. Throughput = N / that time.
* **Adaptive batching**: a stand-in for a GPU model, `time.sleep(2 ms +
  0.05 ms × items)` (benchmarks/models.py `FakeGPU`). One hub, two models:
  `batched`, two `Worker(FakeGPU, True, gibbs_model="batched",
  gibbs_batch_size=32)` (called as `model(xs)`), and `unbatched`, two workers
  of the same model called as `model(x)` (2.05 ms). Throughput: the 64
  concurrent callers as above, on each model in turn; the mean batch size is
  counted by the batched workers. Latency: one sequential caller alternating,
  call by call, between the two models; the median of each.
* **LitServe, Ray Serve** (information rows, only where they are installed:
  `pip install litserve 'ray[serve]'`; run after everything else, so that
  their processes do not load the machine while gibbs is measured): the same
  model and workloads. LitServe: one server (its own process group) with
  `/batched` (`max_batch_size=32`, `batch_timeout=1 ms`) and `/unbatched`,
  two inference workers each, two API servers, `fast_queue=True`; the callers
  are asyncio tasks of this process, each on its own keep-alive HTTP/1.1
  connection (a minimal client, benchmarks/serving.py), JSON `{"x": i}`.
  Ray Serve (full runs only: its start-up takes ~15 s here): a fresh
  interpreter starts a local Ray and Serve (throughput mode,
  `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`, no HTTP proxy), two applications of two
  replicas: `@serve.batch(max_batch_size=32, batch_wait_timeout_s=0)` with
  `max_ongoing_requests=64`, and unbatched; each replica calls the model
  directly (one call at a time); the callers are asyncio tasks of that
  interpreter awaiting `handle.remote(i)` (benchmarks/ray_app.py).
"""


def _hub_defaults() -> str:
    import inspect

    from gibbs import Hub

    params = inspect.signature(Hub.__init__).parameters
    out = []
    for name in ("pipeline_depth", "shm_threshold"):
        if name in params:
            out.append(f"{name}={params[name].default!r}")
    return ", ".join(out) or "as shipped"


def results_markdown(rows: list[Row], info: dict[str, Any], command: str) -> str:
    parts = [
        "# gibbs benchmark results",
        "",
        f"Generated by `{command}` (benchmarks/runner.py); do not edit by hand.",
        "",
        "## Machine",
        "",
        machine_block(info),
        "",
        "## Results",
        "",
        summary(rows) + ".",
        "",
        table(rows),
        "",
    ]
    n = notes(rows)
    if n:
        parts += ["Notes:", "", n, ""]
    parts += ["## Method", "", METHOD.replace("{hub_defaults}", _hub_defaults())]
    return "\n".join(parts)


#: Sections other benchmarks keep in RESULTS.md (``python -m benchmarks.http``):
#: from a ``<!-- begin NAME -->`` line to its ``<!-- end NAME -->`` line.
_SECTION = re.compile(r"^<!-- begin (?P<name>[\w-]+) -->\n.*?^<!-- end (?P=name) -->\n", re.M | re.S)


def write_results(text: str, path: str = RESULTS_PATH) -> str:
    """Write the main results, keeping the sections other benchmarks put there."""
    kept = ""
    if os.path.exists(path):
        with open(path) as f:
            kept = "".join(m.group(0) for m in _SECTION.finditer(f.read()))
    with open(path, "w") as f:
        f.write(text.rstrip("\n") + "\n" + ("\n" + kept if kept else ""))
    return path


def write_section(name: str, text: str, path: str = RESULTS_PATH) -> str:
    """Put (or replace) the section ``name`` at the end of RESULTS.md."""
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    block = f"<!-- begin {name} -->\n{text.rstrip()}\n<!-- end {name} -->\n"
    pattern = re.compile(rf"^<!-- begin {re.escape(name)} -->\n.*?^<!-- end {re.escape(name)} -->\n", re.M | re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: block, old)
    else:
        new = old.rstrip("\n") + "\n\n" + block
    with open(path, "w") as f:
        f.write(new)
    return path
