"""The documentation site (docs/) cannot rot: every Python block in it
compiles, the blocks marked ``<!-- test: run -->`` run as written (each in its
own process, on a free port), the getting-started page is the walkthrough
the end-to-end tests run, every public name has a reference entry with a
docstring, every exception has its section on the errors page, and the
Grafana dashboard queries only metrics a live hub exposes.

A block is marked to run by an HTML comment on the line before its fence::

    <!-- test: run -->
    ```python
    ...
    ```

Such a block is a script: it runs with ``GIBBS_PORT`` set to a free port, in
its own process group, which is killed at the end whatever happens.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest

import gibbs
import gibbs.errors
from gibbs import Hub

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")
WALKTHROUGH = os.path.join(REPO, "tests", "walkthrough", "usage-walkthrough.md")
DASHBOARD = os.path.join(REPO, "examples", "grafana", "gibbs.json")

RUN_MARKER = "<!-- test: run -->"
FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)(.*)$")
SNIPPET = re.compile(r'^\s*--8<--\s+"([^"]+)"\s*$')


@dataclass
class Block:
    page: str  # relative to docs/
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    run: bool

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[str]:
    found = []
    for root, _, files in os.walk(DOCS):
        for f in files:
            if f.endswith(".md"):
                found.append(os.path.relpath(os.path.join(root, f), DOCS))
    return sorted(found)


def expand_snippet(spec: str) -> str:
    """The text a ``--8<-- "path[:start[:end]]"`` line includes (paths from the repository)."""
    path, _, lines = spec.partition(":")
    with open(os.path.join(REPO, path)) as f:
        text = f.read().splitlines(keepends=True)
    if lines:
        start, _, end = lines.partition(":")
        text = text[int(start or 1) - 1 : int(end) if end else None]
    return "".join(text)


def blocks_of(page: str) -> list[Block]:
    with open(os.path.join(DOCS, page)) as f:
        lines = f.read().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2), i
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].startswith(fence):
            s = SNIPPET.match(lines[i])
            body.append(expand_snippet(s.group(1)) if s else lines[i] + "\n")
            i += 1
        assert i < len(lines), f"{page}:{start + 1}: unclosed code fence"
        out.append(Block(page, start + 1, lang, "".join(body), previous.strip() == RUN_MARKER))
        i += 1
    return out


ALL_BLOCKS = [b for p in pages() for b in blocks_of(p)]
PYTHON = [b for b in ALL_BLOCKS if b.lang in ("python", "py", "pycon")]
RUNNABLE = [b for b in PYTHON if b.run]


# ---------------------------------------------------------------- every block


def test_the_pages_have_code_to_test() -> None:
    # A marker typo, or a parser that finds nothing, must not pass silently.
    assert len(PYTHON) >= 25, [b.name for b in PYTHON]
    assert len(RUNNABLE) >= 6, [b.name for b in RUNNABLE]


def test_every_marker_precedes_a_python_block() -> None:
    markers = 0
    for page in pages():
        with open(os.path.join(DOCS, page)) as f:
            lines = f.read().splitlines()
        for n, line in enumerate(lines):
            if "<!-- test" in line:
                assert line.strip() == RUN_MARKER, f"{page}:{n + 1}: unknown marker {line!r}"
                markers += 1
                following = next((x for x in lines[n + 1 :] if x.strip()), "")
                assert FENCE.match(following) and "python" in following, f"{page}:{n + 1}: {RUN_MARKER} before {following!r}"
    assert markers == len(RUNNABLE)


@pytest.mark.parametrize("block", PYTHON, ids=[b.name for b in PYTHON])
def test_python_block_compiles(block: Block) -> None:
    # Snippets may use top-level ``await`` (as in an async function's body).
    compile(block.code, block.name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.name for b in RUNNABLE])
def test_runnable_block_runs(block: Block, tmp_path) -> None:
    script = tmp_path / "block.py"
    script.write_text(block.code)
    env = dict(os.environ, GIBBS_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    src = os.path.join(REPO, "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    env.pop("GIBBS_HUB", None)
    env.pop("GIBBS_AUTHKEY", None)
    proc = subprocess.Popen(
        [sys.executable, str(script)], cwd=tmp_path, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        # The block's workers are in its process group: none outlives the test.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, f"{block.name} exited {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"


# ---------------------------------------------------------------- the pages


def python_blocks_of(markdown_path: str) -> list[str]:
    with open(markdown_path) as f:
        return re.findall(r"```python[^\n]*\n(.*?)```", f.read(), re.S)


def test_getting_started_is_the_walkthrough() -> None:
    # tests/test_e2e_fastapi.py runs the walkthrough's code as written (the
    # examples are that code); this page must show exactly that code.
    ours = python_blocks_of(os.path.join(DOCS, "getting-started.md"))
    theirs = python_blocks_of(WALKTHROUGH)
    assert len(theirs) == 4
    assert ours == theirs


def test_every_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    with open(os.path.join(REPO, "mkdocs.yml")) as f:
        nav = set(re.findall(r"([\w./-]+\.md)\s*$", f.read(), re.M))
    assert nav == set(pages())


def test_every_how_to_guide_is_listed_on_the_guides_page() -> None:
    with open(os.path.join(DOCS, "how-to", "index.md")) as f:
        listed = set(re.findall(r"\]\(([\w.-]+\.md)\)", f.read()))
    guides = {p.split("/", 1)[1] for p in pages() if p.startswith("how-to/") and p != "how-to/index.md"}
    assert guides and guides == listed


def reference_text() -> str:
    ref = os.path.join(DOCS, "reference")
    return "".join(open(os.path.join(ref, f)).read() for f in sorted(os.listdir(ref)) if f.endswith(".md"))


def test_every_public_name_has_a_reference_entry_and_a_docstring() -> None:
    text = reference_text()
    # The members listed under ``::: gibbs.errors`` in the errors page.
    errors_page = open(os.path.join(DOCS, "reference", "errors.md")).read()
    listed = set(re.findall(r"^\s+- (\w+)\s*$", errors_page.split("::: gibbs.errors", 1)[1], re.M))
    missing = []
    for name in gibbs.__all__:
        if name == "__version__":
            assert "`__version__`" in text
            continue
        obj = getattr(gibbs, name)
        entry = f"::: gibbs.{name}" in text or (name in listed and getattr(gibbs.errors, name) is obj)
        if not entry:
            missing.append(name)
        assert (obj.__doc__ or "").strip(), f"gibbs.{name} has no docstring"
    assert not missing, f"no API reference entry for {missing}"
    # The public methods and properties of the two classes are documented too.
    for cls in (gibbs.Hub, gibbs.Worker):
        for attr, value in vars(cls).items():
            if attr.startswith("_"):
                continue
            func = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
            if callable(func):
                assert (inspect.getdoc(func) or "").strip(), f"{cls.__name__}.{attr} has no docstring"


def test_every_exception_has_its_section_on_the_errors_page() -> None:
    with open(os.path.join(DOCS, "errors.md")) as f:
        headings = set(re.findall(r"^## (\w+)\s*$", f.read(), re.M))
    missing = [name for name in gibbs.errors.__all__ if name not in headings]
    assert not missing, f"docs/errors.md has no '## Name' section for {missing}"


def test_every_command_line_option_is_on_the_cli_page() -> None:
    from gibbs.cli import _build_parser

    with open(os.path.join(DOCS, "reference", "cli.md")) as f:
        page = f.read()
    parser = _build_parser()
    sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    assert sub.choices
    for command, subparser in sub.choices.items():
        assert f"python -m gibbs {command}" in page
        for action in subparser._actions:
            for option in action.option_strings:
                assert option in page, f"python -m gibbs {command} {option} is not on docs/reference/cli.md"


# ---------------------------------------------------------------- the dashboard


def dashboard_queries() -> list[str]:
    with open(DASHBOARD) as f:
        dash = json.load(f)
    exprs: list[str] = []

    def walk(panels: list) -> Iterator[dict]:
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    for panel in walk(dash["panels"]):
        exprs.extend(t["expr"] for t in panel.get("targets", []))
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def test_the_dashboard_has_the_panels_asked_for() -> None:
    joined = "\n".join(dashboard_queries())
    for metric in (
        "gibbs_requests_total",
        "gibbs_request_errors_total",
        "gibbs_request_latency_seconds_bucket",
        "gibbs_queue_wait_seconds_bucket",
        "gibbs_batches_total",
        "gibbs_workers",
    ):
        assert re.search(rf"\b{metric}\b", joined), metric
    assert "histogram_quantile(0.99" in joined


def test_dashboard_queries_use_only_metrics_a_live_hub_exposes(
    make_hub: Callable[..., Hub],
) -> None:
    from gibbs_test_models import BatchModel, Square
    from prometheus_client.parser import text_string_to_metric_families

    hub = make_hub()
    hub.serve(Square, gibbs_workers=1)
    hub.serve(BatchModel, gibbs_workers=1, gibbs_model="batched", gibbs_batch_size=4)
    hub.wait_for_workers_sync(2, timeout=30)

    async def traffic() -> None:
        await asyncio.gather(*(hub.request(i) for i in range(5)))
        await asyncio.gather(*(hub.request(i, gibbs_model="batched") for i in range(8)))

    asyncio.run(asyncio.wait_for(traffic(), 60))
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(hub.prometheus()):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    exposed = set(labels)
    assert "gibbs_requests_total" in exposed and "gibbs_batches_total" in exposed

    queries = dashboard_queries()
    assert queries
    for expr in queries:
        used = set(re.findall(r"\b(gibbs_[a-z_]+)\b", expr))
        assert used, expr
        unknown = used - exposed
        assert not unknown, f"{expr}: {sorted(unknown)} not exposed by hub.prometheus() ({sorted(exposed)})"
        # Labels grouped by or matched on belong to a metric of the query.
        have = set().union(*(labels[m] for m in used))
        grouped = {x.strip() for g in re.findall(r"\bby \(([^)]*)\)", expr) for x in g.split(",")}
        matched = set(re.findall(r"[{,]\s*(\w+)\s*=~?", expr))
        stray = (grouped | matched) - have
        assert not stray, f"{expr}: labels {sorted(stray)} are on none of {sorted(used)}"
