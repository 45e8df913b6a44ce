"""``examples/deadlines.py`` runs as written: a burst at a pool that cannot
serve it in time is answered in part and shed at once for the rest, and no
caller waits past its deadline."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(120)
def test_deadlines_example_runs() -> None:
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "examples", "deadlines.py")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=100)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    outcomes = ast.literal_eval(out.splitlines()[0])
    assert outcomes.get("answered", 0) >= 5, out
    assert outcomes.get("shed", 0) >= 100, out  # refused at once, not left to expire
    assert sum(outcomes.values()) == 300, out


@pytest.mark.timeout(120)
def test_priorities_example_runs() -> None:
    """``examples/priorities.py``: the interactive calls, submitted behind a
    backlog, are answered before it."""
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "examples", "priorities.py")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=100)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    order = ast.literal_eval(out.splitlines()[0])
    assert len(order) == 24
    last_web = max(order.index(f"web{i}") for i in range(4))
    assert last_web < 10, order  # not behind the 20 of the backlog
    assert ast.literal_eval(out.splitlines()[1]) == {"0": 20, "5": 4}
