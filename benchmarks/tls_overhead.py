"""What TLS costs a round trip: one worker over TCP on 127.0.0.1, with and
without TLS, in one run (certificates made with the ``openssl`` command).

    python -m benchmarks.tls_overhead            # 2,000 small and 200 1 MiB calls each way

Prints the median and 99th percentile of a sequential call's round trip,
and the throughput of 1 MiB arguments. Run it in a private network
namespace on a shared machine (``unshare -n``, then ``ip link set lo up``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from gibbs import Hub, Worker
from gibbs.tls import CA_ENV, CERT_ENV, KEY_ENV, TLSFiles
from gibbs.transport import LOCAL_SOCKET_ENV

from .models import Echo

KEY = "tls-bench-key"


def _openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)


def make_certificates(d: Path) -> None:
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(d, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=bench ca",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    for name, ext in (("hub", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(f"{ext}\nauthorityKeyIdentifier=keyid,issuer\n")
        _openssl(d, "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")


async def measure(hub: Hub, small: int, large: int) -> tuple[float, float, float]:
    await hub.wait_for_workers(1, timeout=60)
    for _ in range(50):
        await hub.request(b"warm")
    times = []
    for _ in range(small):
        t = time.perf_counter()
        await hub.request(b"x" * 64)
        times.append(time.perf_counter() - t)
    blob = os.urandom(1 << 20)
    t = time.perf_counter()
    for _ in range(large):
        await hub.request(blob)
    mib_s = large * 2 / (time.perf_counter() - t)  # each call carries 1 MiB there and back
    times.sort()
    return statistics.median(times) * 1e6, times[int(len(times) * 0.99)] * 1e6, mib_s


def run_one(tls: Optional[Path], small: int, large: int) -> tuple[float, float, float]:
    os.environ[LOCAL_SOCKET_ENV] = "0"
    for name in (CERT_ENV, KEY_ENV, CA_ENV):
        os.environ.pop(name, None)
    context = None
    if tls is not None:
        context = TLSFiles(str(tls / "hub.pem"), str(tls / "hub.key"), str(tls / "ca.pem")).server_context()
        os.environ.update({CERT_ENV: str(tls / "client.pem"), KEY_ENV: str(tls / "client.key"), CA_ENV: str(tls / "ca.pem")})
    # No shared memory for large arguments: every byte crosses the link.
    hub = Hub(port=0, authkey=KEY, ssl_context=context, shm_threshold=None)
    hub.start()
    worker = Worker(Echo, gibbs_host="127.0.0.1", gibbs_port=hub.port, gibbs_authkey=KEY)
    worker.start()
    try:
        return asyncio.run(measure(hub, small, large))
    finally:
        worker.kill()
        worker.join(10)
        hub.close(grace=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=200)
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        make_certificates(Path(d))
        for label, tls in (("TCP", None), ("TCP + TLS", Path(d))):
            median, p99, mib_s = run_one(tls, ns.small, ns.large)
            print(f"{label:10s} round trip median {median:7.0f} us, p99 {p99:7.0f} us; 1 MiB calls {mib_s:6.0f} MiB/s")


if __name__ == "__main__":
    main()
