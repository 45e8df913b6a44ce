"""TLS between the hub and its workers: certificates from one authority of
your own, made here with the ``openssl`` command, and every TCP link
encrypted and checked both ways (see "Encryption: TLS" in the README).

    python examples/tls.py

The same with no code: GIBBS_TLS_CERT, GIBBS_TLS_KEY and GIBBS_TLS_CA for a
plain ``Hub()`` and ``Worker()``, or ``--tls-cert``, ``--tls-key`` and
``--tls-ca`` on ``python -m gibbs hub|worker|status``. The key is still
required: the certificate says which machine, the key which application.
"""

import os
import secrets
import subprocess
import sys
import tempfile

from gibbs import Hub, Worker
from gibbs.tls import TLSFiles


class Square:
    def __call__(self, x):
        return x * x


def openssl(where: str, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True)


def make_certificates(where: str) -> None:
    """An authority, a certificate for the hub's address, one for a worker."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(where, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=example CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    for name, ext in (("hub", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("worker", "extendedKeyUsage=clientAuth")):
        with open(os.path.join(where, f"{name}.ext"), "w") as f:
            f.write(f"{ext}\nauthorityKeyIdentifier=keyid,issuer\n")
        openssl(where, "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl(where, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")


def main() -> None:
    key = secrets.token_hex(16)
    port = int(os.environ.get("HUB_PORT", 5019))
    os.environ["GIBBS_LOCAL_SOCKET"] = "0"  # one machine here: go by TCP anyway, to show TLS
    with tempfile.TemporaryDirectory() as d:
        make_certificates(d)
        pem = {name: os.path.join(d, name) for name in ("ca.pem", "hub.pem", "hub.key", "worker.pem", "worker.key")}
        hub_tls = TLSFiles(pem["hub.pem"], pem["hub.key"], pem["ca.pem"])  # with a CA: client certificates required
        hub = Hub(port=port, authkey=key, ssl_context=hub_tls.server_context()).start()
        try:
            # A worker takes its files from the environment (a spawned process
            # cannot be handed an ssl.SSLContext): what --tls-* set, too.
            os.environ.update(GIBBS_TLS_CERT=pem["worker.pem"], GIBBS_TLS_KEY=pem["worker.key"], GIBBS_TLS_CA=pem["ca.pem"])
            worker = Worker(Square, gibbs_host="127.0.0.1", gibbs_port=port, gibbs_authkey=key)
            worker.start()
            hub.wait_for_workers_sync(1, timeout=60)
            print("7 squared over TLS:", hub.submit(7).result(timeout=60))
            out = subprocess.run(
                [sys.executable, "-m", "gibbs", "status", "--hub", f"127.0.0.1:{port}", "--once", "--json"],
                env=dict(os.environ, GIBBS_AUTHKEY=key), capture_output=True, text=True, timeout=60, check=True,
            ).stdout
            print("gibbs status over TLS:", out.strip()[:60], "...")
            for name in ("GIBBS_TLS_CERT", "GIBBS_TLS_KEY", "GIBBS_TLS_CA"):
                os.environ.pop(name)
            plain = Worker(Square, gibbs_host="127.0.0.1", gibbs_port=port, gibbs_authkey=key)  # right key, no TLS
            before = hub.statistics()["handshake_failures"]
            plain.start()
            for _ in range(600):  # a minute at most
                if hub.statistics()["handshake_failures"] > before:
                    break
                plain.join(0.1)
            print("a worker without TLS is refused:", hub.statistics()["handshake_failures"] > before)
            for w in (worker, plain):
                w.terminate()
                w.join(30)
        finally:
            hub.close()


if __name__ == "__main__":
    main()
