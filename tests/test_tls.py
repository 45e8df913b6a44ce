"""TLS on TCP links: real certificates made with the ``openssl`` command (an
authority, a hub's certificate for 127.0.0.1, a client's, and a second
authority with a client of its own). Everything goes over TCP on 127.0.0.1:
``GIBBS_LOCAL_SOCKET=0`` keeps workers and observers off the hub's local
socket. A relay in the test sees every byte of a link, as a capture would."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from conftest import run, wait_until

from gibbs import Hub
from gibbs.tls import CA_ENV, CERT_ENV, KEY_ENV, TLSFiles
from gibbs.transport import LOCAL_SOCKET_ENV

KEY = "tls-test-key"
SECRET = "payload-that-must-not-travel-in-clear-7f3a"
TESTS = Path(__file__).resolve().parent


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def _authority(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "3", "-subj", f"/CN=gibbs test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )


def _leaf(d: Path, name: str, ca: str, extensions: str) -> None:
    (d / f"{name}.ext").write_text(
        extensions + "\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
        "basicConstraints=critical,CA:FALSE\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=gibbs test {name}", cwd=d,
    )
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-out", f"{name}.pem", "-days", "3", "-extfile", f"{name}.ext", cwd=d,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert shutil.which("openssl"), "the openssl command is needed (apt-get install openssl)"
    d = tmp_path_factory.mktemp("pki")
    _authority(d, "ca")
    _authority(d, "other-ca")
    _leaf(d, "hub", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
    _leaf(d, "client", "ca", "extendedKeyUsage=clientAuth")
    _leaf(d, "stranger", "other-ca", "extendedKeyUsage=clientAuth")
    return d


def hub_context(pki: Path) -> ssl.SSLContext:
    return TLSFiles(str(pki / "hub.pem"), str(pki / "hub.key"), str(pki / "ca.pem")).server_context()


@pytest.fixture
def over_tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers and observers go by TCP even to this machine's hub."""
    monkeypatch.setenv(LOCAL_SOCKET_ENV, "0")
    for name in (CERT_ENV, KEY_ENV, CA_ENV):
        monkeypatch.delenv(name, raising=False)


def client_env(monkeypatch: pytest.MonkeyPatch, pki: Path, cert: str | None = "client", ca: str = "ca") -> None:
    """The files a Worker made now (and the processes it starts) read."""
    if cert is None:
        monkeypatch.delenv(CERT_ENV, raising=False)
        monkeypatch.delenv(KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(CERT_ENV, str(pki / f"{cert}.pem"))
        monkeypatch.setenv(KEY_ENV, str(pki / f"{cert}.key"))
    monkeypatch.setenv(CA_ENV, str(pki / f"{ca}.pem"))


def failures(hub: Hub) -> int:
    return int(hub.statistics()["handshake_failures"])


class Relay:
    """A TCP relay to the hub that keeps every byte it carries, both ways."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        self.lock = threading.Lock()
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.target))
            self.socks += [a, b]
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._copy, args=(src, dst), daemon=True).start()

    def _copy(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self.lock:
                    self.seen += data
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        for s in self.socks:
            s.close()


@pytest.fixture
def relay() -> Iterator[Callable[[int], Relay]]:
    made: list[Relay] = []

    def factory(port: int) -> Relay:
        r = Relay(port)
        made.append(r)
        return r

    yield factory
    for r in made:
        r.close()


# ---------------------------------------------------------------- tests


def test_requests_answered_through_tls(pki, over_tcp, monkeypatch, make_hub, make_workers, relay) -> None:
    from gibbs_test_models import Echo

    hub = make_hub(authkey=KEY, ssl_context=hub_context(pki))
    link = relay(hub.port)
    client_env(monkeypatch, pki)
    make_workers(hub, Echo, 2, gibbs_port=link.port, gibbs_authkey=KEY)

    async def main() -> None:
        await hub.wait_for_workers(2, timeout=30)
        answers = [await hub.request(SECRET, i, big=b"x" * 300_000) for i in range(20)]
        for i, answer in enumerate(answers):
            assert answer["args"] == (SECRET, i) and answer["kwargs"] == {"big": b"x" * 300_000}

    run(main(), timeout=60)
    assert {w["name"] for w in hub.workers()} == {"Echo"}
    assert all(w["address"] != "local socket" for w in hub.workers()), hub.workers()
    with link.lock:
        seen = bytes(link.seen)
    assert len(seen) > 20 * 300_000  # the requests went through the relay
    assert SECRET.encode() not in seen and b"x" * 1000 not in seen
    # Only markers long enough that ciphertext cannot hold them by chance:
    # over 12 MB of it holds a given 4-byte string (such as the class name
    # alone) about once in 350 runs; a 17-byte one, never.
    assert b"gibbs_test_models" not in seen


def test_without_tls_the_relay_sees_the_payload(over_tcp, make_hub, make_workers, relay) -> None:
    """The control: the same relay on a plaintext link sees the payload, so
    the assertion above is about the encryption, not about the relay."""
    from gibbs_test_models import Echo

    hub = make_hub(authkey=KEY)
    link = relay(hub.port)
    make_workers(hub, Echo, 1, gibbs_port=link.port, gibbs_authkey=KEY)

    async def main() -> None:
        await hub.wait_for_workers(1, timeout=30)
        assert (await hub.request(SECRET))["args"] == (SECRET,)

    run(main(), timeout=60)
    with link.lock:
        seen = bytes(link.seen)
    assert SECRET.encode() in seen and b"gibbs_test_models" in seen


def _refused(hub: Hub, timeout: float = 20.0) -> None:
    """Wait for handshake failures to be counted and check nobody joined."""
    assert wait_until(lambda: failures(hub) >= 2, timeout=timeout), hub.statistics()
    assert hub.workers() == []


def test_a_plaintext_peer_is_refused(pki, over_tcp, make_hub, make_workers, caplog) -> None:
    from gibbs_test_models import Echo

    hub = make_hub(authkey=KEY, ssl_context=hub_context(pki))
    make_workers(hub, Echo, 1, gibbs_authkey=KEY)  # right key, no TLS
    _refused(hub)
    assert "TLS handshake failed" in caplog.text
    # And a raw plaintext peer never sees a gibbs challenge in clear.
    with socket.create_connection(("127.0.0.1", hub.port), timeout=10) as s:
        s.sendall(b"\x00\x10hello, plaintext")
        s.settimeout(10)
        try:
            data = s.recv(1024)
        except (ConnectionResetError, TimeoutError):
            data = b""
        assert b"GIBBS" not in data


def test_a_client_certificate_of_another_authority_is_refused(pki, over_tcp, monkeypatch, make_hub, make_workers) -> None:
    from gibbs_test_models import Echo

    hub = make_hub(authkey=KEY, ssl_context=hub_context(pki))
    client_env(monkeypatch, pki, cert="stranger")
    make_workers(hub, Echo, 1, gibbs_authkey=KEY)
    _refused(hub)


def test_a_worker_without_a_client_certificate_is_refused(pki, over_tcp, monkeypatch, make_hub, make_workers) -> None:
    from gibbs_test_models import Echo

    hub = make_hub(authkey=KEY, ssl_context=hub_context(pki))
    client_env(monkeypatch, pki, cert=None)
    make_workers(hub, Echo, 1, gibbs_authkey=KEY)
    _refused(hub)


def test_a_worker_refuses_a_hub_its_authority_did_not_sign(pki, over_tcp, monkeypatch, make_hub, make_workers) -> None:
    from gibbs_test_models import Echo

    hub = make_hub(authkey=KEY, ssl_context=hub_context(pki))
    client_env(monkeypatch, pki, ca="other-ca")  # trusts only the other authority
    make_workers(hub, Echo, 1, gibbs_authkey=KEY)
    _refused(hub)


def _tls_client(pki: Path, port: int) -> ssl.SSLSocket:
    ctx = TLSFiles(str(pki / "client.pem"), str(pki / "client.key"), str(pki / "ca.pem")).client_context()
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def test_a_tunnelled_peer_is_a_tcp_stranger_even_to_a_keyless_hub(pki, over_tcp, make_hub) -> None:
    """The tunnel is a unix socketpair whose kernel credentials name the hub
    itself: they must not count, so even a keyless hub challenges a TLS peer
    (it never offers the keyless same-user path)."""
    hub = make_hub(ssl_context=hub_context(pki))  # no explicit key
    with _tls_client(pki, hub.port) as s:
        data = s.recv(256)
    assert b"#GIBBS-CHALLENGE#" in data
    assert b"SAME-USER" not in data


def test_the_key_is_still_required_with_tls(pki, over_tcp, monkeypatch, make_hub, make_workers) -> None:
    from gibbs_test_models import Echo

    hub = make_hub(authkey=KEY, ssl_context=hub_context(pki))
    client_env(monkeypatch, pki)
    make_workers(hub, Echo, 1, gibbs_authkey="not-the-key")
    _refused(hub)


def _env(pki: Path, **extra: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIBBS_")}
    env.update(GIBBS_AUTHKEY=KEY, GIBBS_LOCAL_SOCKET="0", PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]))
    env.update(extra)
    return env


def test_status_over_tls(pki, over_tcp, monkeypatch, make_hub, make_workers) -> None:
    from gibbs_test_models import Square

    hub = make_hub(authkey=KEY, ssl_context=hub_context(pki))
    client_env(monkeypatch, pki)
    make_workers(hub, Square, 1, gibbs_authkey=KEY, gibbs_model="squares")
    hub.wait_for_workers_sync(1, timeout=30)
    files = ["--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key"), "--tls-ca", str(pki / "ca.pem")]
    command = [sys.executable, "-m", "gibbs", "status", "--hub", f"127.0.0.1:{hub.port}", "--once"]
    proc = subprocess.run(command + files, env=_env(pki), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "squares" in proc.stdout and "gibbs_test_models:Square" in proc.stdout
    plain = subprocess.run(command, env=_env(pki), capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0 and "squares" not in plain.stdout


def test_worker_and_hub_commands_with_tls_files(pki, tmp_path) -> None:
    """``python -m gibbs hub`` and ``worker`` with --tls-*: the files travel
    to the workers the command starts (by the environment)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hub_files = ["--tls-cert", str(pki / "hub.pem"), "--tls-key", str(pki / "hub.key"), "--tls-ca", str(pki / "ca.pem")]
    client_files = ["--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key"), "--tls-ca", str(pki / "ca.pem")]
    procs = []
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "gibbs", "hub", "--bind", f"127.0.0.1:{port}", *hub_files],
            env=_env(pki), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        ))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "gibbs", "worker", "gibbs_test_models:Square", "--hub", f"127.0.0.1:{port}",
             "-n", "2", "--model", "squares", *client_files],
            env=_env(pki), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        ))
        command = [sys.executable, "-m", "gibbs", "status", "--hub", f"127.0.0.1:{port}", "--once", "--json"]
        deadline = time.monotonic() + 60
        while True:
            proc = subprocess.run(command + client_files, env=_env(pki), capture_output=True, text=True, timeout=60)
            if proc.returncode == 0 and proc.stdout.count("gibbs_test_models:Square") >= 2:
                break
            assert time.monotonic() < deadline, (proc.stdout, proc.stderr)
            time.sleep(0.3)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.communicate(timeout=20)


def test_the_tls_example_runs() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = TESTS.parent / "examples" / "tls.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIBBS_")}
    env["HUB_PORT"] = str(port)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "7 squared over TLS: 49" in out.stdout
    assert 'gibbs status over TLS: {"statistics"' in out.stdout
    assert "a worker without TLS is refused: True" in out.stdout


def test_a_client_hub_joins_its_router_over_tls(pki, over_tcp, monkeypatch, make_hub, make_workers) -> None:
    """A web process's hub (address=) reaches the router over TCP with TLS;
    with no client certificate, the router refuses it."""
    from gibbs_test_models import Square

    router = make_hub(authkey=KEY, ssl_context=hub_context(pki))
    client_env(monkeypatch, pki)
    make_workers(router, Square, 1, gibbs_authkey=KEY)
    router.wait_for_workers_sync(1, timeout=30)
    client = make_hub(address=f"127.0.0.1:{router.port}", authkey=KEY)  # its client context from GIBBS_TLS_*
    assert run(client.request(7), timeout=60) == 49
    assert router.statistics()["clients"] >= 1
    before = failures(router)
    client_env(monkeypatch, pki, cert=None)
    lone = make_hub(address=f"127.0.0.1:{router.port}", authkey=KEY, no_worker_timeout=3)
    with pytest.raises(Exception):  # noqa: B017 - whichever GibbsError: it never reaches the router
        run(lone.request(7), timeout=60)
    assert failures(router) > before
