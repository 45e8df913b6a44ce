"""The command line: ``python -m gibbs`` (help, errors, demo, worker)."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from typing import Iterator, Optional

import pytest
from conftest import run

from gibbs import Hub, cli
from gibbs.transport import AUTHKEY_ENV

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
KEY = "cli-test-key"


def gibbs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gibbs", *args]


def env_with(key: Optional[str] = KEY, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(AUTHKEY_ENV, None)
    if key is not None:
        env[AUTHKEY_ENV] = key
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def run_cli(*args: str, key: Optional[str] = KEY, cwd: Optional[str] = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        gibbs_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env_with(key), cwd=cwd
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith("gibbs: error:"), line
    for needle in needles:
        assert needle in line, line
    return line


# ------------------------------------------------------------------ help


def test_help() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert "demo" in proc.stdout and "worker" in proc.stdout


def test_no_command_is_a_usage_error() -> None:
    proc = run_cli()
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "usage" in proc.stderr.lower()


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli._build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("command", ["worker", "demo"])
def test_subcommand_help_mentions_every_option(command: str) -> None:
    proc = run_cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    options = [opt for action in _subparser(command)._actions for opt in action.option_strings]
    assert options, "no options found"
    for opt in options:
        assert re.search(rf"(^|[\s,\[]){re.escape(opt)}\b", out), f"{opt} missing from `{command} --help`"
    if command == "worker":
        expected = {"--hub", "-n", "--workers", "--authkey-file", "--heartbeat-interval",
                    "--reset-after-n-miss", "--start-method", "--name", "--verbose"}
        assert expected <= set(options)
        assert "TARGET" in out and "ARG" in out and AUTHKEY_ENV in out


# ------------------------------------------------------------------ errors


def test_no_such_module() -> None:
    proc = run_cli("worker", "no_such_module_for_gibbs:Model", "--hub", "127.0.0.1:5999")
    assert_one_line_error(proc, "no_such_module_for_gibbs")


def test_no_such_class() -> None:
    proc = run_cli("worker", "gibbs_test_models:NoSuchModel", "--hub", "127.0.0.1:5999")
    assert_one_line_error(proc, "NoSuchModel")


@pytest.mark.parametrize("target", ["gibbs_test_models", "gibbs_test_models:", ":Square", ""])
def test_malformed_target(target: str) -> None:
    proc = run_cli("worker", target, "--hub", "127.0.0.1:5999")
    assert_one_line_error(proc, "target")


def test_target_that_is_not_callable() -> None:
    proc = run_cli("worker", "os:sep", "--hub", "127.0.0.1:5999")
    assert_one_line_error(proc, "os:sep")


def test_module_that_raises_at_import(tmp_path) -> None:
    (tmp_path / "broken_model_mod.py").write_text("raise RuntimeError('no weights here')\n")
    proc = run_cli("worker", "broken_model_mod:Model", "--hub", "127.0.0.1:5999", cwd=str(tmp_path))
    assert_one_line_error(proc, "RuntimeError", "no weights here")


def test_module_found_in_the_current_directory(tmp_path) -> None:
    # load_target looks in the working directory: a missing attribute there is
    # reported as such (the module itself was found).
    (tmp_path / "cwd_model_mod.py").write_text("class Model:\n    def __call__(self, x):\n        return x\n")
    proc = run_cli("worker", "cwd_model_mod:Other", "--hub", "127.0.0.1:5999", cwd=str(tmp_path))
    assert_one_line_error(proc, "has no attribute", "Other")


@pytest.mark.parametrize(
    "address,needle",
    [
        ("127.0.0.1:notaport", "notaport"),
        ("127.0.0.1:0", "out of range"),
        ("127.0.0.1:70000", "out of range"),
        (":5019", "no host"),
        ("[::1", "]"),
        ("no-such-host.invalid:5019", "no-such-host.invalid"),
    ],
)
def test_bad_address(address: str, needle: str) -> None:
    proc = run_cli("worker", "gibbs_test_models:Square", "--hub", address)
    assert_one_line_error(proc, needle)


def test_missing_key_off_loopback() -> None:
    # On loopback no key is needed (the hub lets in its own user's processes);
    # a hub anywhere else needs one.
    proc = run_cli("worker", "gibbs_test_models:Square", "--hub", "192.0.2.1:5999", key=None)
    assert_one_line_error(proc, AUTHKEY_ENV)


def test_missing_and_empty_key_file(tmp_path) -> None:
    proc = run_cli("worker", "gibbs_test_models:Square", "--authkey-file", str(tmp_path / "nope"), key=None)
    assert_one_line_error(proc, "nope")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    proc = run_cli("worker", "gibbs_test_models:Square", "--authkey-file", str(empty), key=None)
    assert_one_line_error(proc, "empty")


@pytest.mark.parametrize(
    "args,needle",
    [(["-n", "0"], "-n"), (["--heartbeat-interval", "0"], "heartbeat"), (["1", "x=2", "3"], "positional")],
)
def test_bad_worker_options(args: list[str], needle: str) -> None:
    proc = run_cli("worker", "gibbs_test_models:Square", "--hub", "127.0.0.1:5999", *args)
    assert_one_line_error(proc, needle)


@pytest.mark.parametrize("args", [["--workers", "0"], ["--requests", "0"], ["--wait-time", "-1"]])
def test_bad_demo_options(args: list[str]) -> None:
    proc = run_cli("demo", *args)
    assert_one_line_error(proc)


# ------------------------------------------------------------------ parse_model_args


@pytest.mark.parametrize(
    "items,expected",
    [
        ([], ([], {})),
        (["1", "0.5", "name=foo", "size=3"], ([1, 0.5], {"name": "foo", "size": 3})),
        (["hello", "True", "None", "[1, 2]", "(3,)"], (["hello", True, None, [1, 2], (3,)], {})),
        (["'quoted'", "{'a': 1}"], (["quoted", {"a": 1}], {})),
        (["device=cuda:0"], ([], {"device": "cuda:0"})),
        (["expr=a=b"], ([], {"expr": "a=b"})),
        (["1=2"], (["1=2"], {})),  # not an identifier: a positional string
        (["x="], ([], {"x": ""})),
        (["w=-0.25", "n=1e3"], ([], {"w": -0.25, "n": 1000.0})),
    ],
)
def test_parse_model_args(items: list[str], expected: tuple) -> None:
    assert cli.parse_model_args(items) == expected


def test_parse_model_args_positional_after_keyword() -> None:
    with pytest.raises(cli.CliError):
        cli.parse_model_args(["a=1", "2"])


# ------------------------------------------------------------------ demo


def test_demo_runs_and_prints_three_figures() -> None:
    proc = run_cli("demo", "--workers", "2", "--requests", "4", "--wait-time", "0.1", timeout=90)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Traceback" not in proc.stderr
    figures = {}
    for label in ("one model in-process", "with gibbs", "ideal"):
        m = re.search(rf"{re.escape(label)}\s*:\s*([0-9.]+) s", out)
        assert m, f"{label!r} missing from:\n{out}"
        figures[label] = float(m.group(1))
    assert figures["ideal"] == pytest.approx(0.2)  # 4 requests on 2 workers: 2 rounds of 0.1 s
    assert figures["one model in-process"] >= 0.4
    assert figures["with gibbs"] < figures["one model in-process"]


# ------------------------------------------------------------------ worker command


def _group_alive(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
            pids.append(int(entry))
    return pids


@pytest.fixture
def worker_cli() -> Iterator:
    """Start ``python -m gibbs worker ...`` in its own process group; the whole
    group is killed at teardown, whatever happened."""
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            gibbs_cmd("worker", *args),
            env=env_with(KEY),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _group_alive(proc.pid), "processes of the worker command were left running"


def _busy(hub: Hub) -> bool:
    return hub.statistics()["busy"] >= 1


async def _wait_busy(hub: Hub, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not _busy(hub):
        assert time.monotonic() < deadline, "the request never reached the worker"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("how", ["sigterm-to-command", "sigint-to-group"])
def test_worker_command_serves_and_stops_gracefully(make_hub, worker_cli, how: str) -> None:
    hub = make_hub(authkey=KEY)
    proc = worker_cli("gibbs_test_models:Sleep", "--hub", f"127.0.0.1:{hub.port}", "-n", "2",
                      "--heartbeat-interval", "0.2", "--name", "cli-sleeper")

    async def main() -> None:
        await hub.wait_for_workers(2, timeout=60)
        assert {w["name"] for w in hub.workers()} == {"cli-sleeper"}
        assert await asyncio.gather(*(hub.request(0.01, i) for i in range(6))) == list(range(6))
        long = asyncio.ensure_future(hub.request(1.0, "finished"))
        await _wait_busy(hub)
        if how == "sigterm-to-command":
            proc.send_signal(signal.SIGTERM)
        else:  # Ctrl-C in a terminal: the whole foreground group gets SIGINT
            os.killpg(proc.pid, signal.SIGINT)
        assert await asyncio.wait_for(long, 30) == "finished"  # the request in hand is answered

    run(main(), timeout=90)
    code = proc.wait(timeout=60)
    err = proc.stderr.read() if proc.stderr else ""
    assert code == 0, err
    assert "Traceback" not in err, err
    deadline = time.monotonic() + 10
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _group_alive(proc.pid), "a worker process outlived the command"


def test_worker_command_with_model_arguments(make_hub, worker_cli, tmp_path) -> None:
    hub = make_hub(authkey=KEY)
    proc = worker_cli("gibbs_test_models:Square", "--hub", f"127.0.0.1:{hub.port}", "wait_time=0.01")

    async def main() -> None:
        await hub.wait_for_workers(1, timeout=60)
        assert await hub.request(12) == 144

    run(main(), timeout=90)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def test_worker_command_with_key_file_and_wrong_key(make_hub, worker_cli, tmp_path) -> None:
    hub = make_hub(authkey=KEY)
    good = tmp_path / "good.key"
    good.write_text(KEY + "\n")  # surrounding whitespace is ignored
    bad = tmp_path / "bad.key"
    bad.write_text("not-the-key")
    wrong = worker_cli("gibbs_test_models:Square", "--hub", f"127.0.0.1:{hub.port}", "--authkey-file", str(bad))
    right = worker_cli("gibbs_test_models:Square", "--hub", f"127.0.0.1:{hub.port}", "--authkey-file", str(good))

    async def main() -> None:
        await hub.wait_for_workers(1, timeout=60)
        assert await hub.request(3) == 9
        await asyncio.sleep(0.5)
        assert hub.statistics()["workers"] == 1  # the one with the wrong key never joins

    run(main(), timeout=90)
    for proc in (wrong, right):
        proc.send_signal(signal.SIGTERM)
    for proc in (wrong, right):
        assert proc.wait(timeout=60) == 0


def test_worker_command_waits_for_a_hub_that_starts_later(worker_cli) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = worker_cli("gibbs_test_models:Square", "--hub", f"127.0.0.1:{port}")
    time.sleep(0.5)
    assert proc.poll() is None  # no hub yet: it keeps trying
    hub = Hub(port=port, authkey=KEY)
    try:
        async def main() -> None:
            await hub.wait_for_workers(1, timeout=60)
            assert await hub.request(4) == 16

        run(main(), timeout=90)
    finally:
        hub.close(grace=0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
