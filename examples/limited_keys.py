"""Keys with one right each: the hub's key gives every role; a worker key
lets a machine serve and nothing else; an observer key lets ``gibbs status``
read statistics and nothing else (see "Security" in the README).

    python examples/limited_keys.py

The same three keys from the environment, with no code: GIBBS_AUTHKEY on the
hub (plus GIBBS_WORKER_KEY and GIBBS_OBSERVER_KEY), GIBBS_AUTHKEY=<worker key>
for ``python -m gibbs worker``, GIBBS_AUTHKEY=<observer key> for
``python -m gibbs status``.
"""

import os
import secrets
import subprocess
import sys

from gibbs import Hub, Worker


class Square:
    def __call__(self, x):
        return x * x


def main() -> None:
    hub_key, worker_key, observer_key = (secrets.token_hex(16) for _ in range(3))
    port = int(os.environ.get("HUB_PORT", 5019))
    hub = Hub(port=port, authkey=hub_key, worker_key=worker_key, observer_key=observer_key).start()
    try:
        worker = Worker(Square, gibbs_port=port, gibbs_authkey=worker_key)  # serves with the worker key
        worker.start()
        hub.wait_for_workers_sync(1, timeout=60)
        print("7 squared by a worker holding the worker key:", hub.submit(7).result(timeout=60))
        # gibbs status with the observer key: it may read, it may not submit or serve.
        env = dict(os.environ, GIBBS_AUTHKEY=observer_key)
        out = subprocess.run(
            [sys.executable, "-m", "gibbs", "status", "--hub", f"127.0.0.1:{port}", "--once", "--json"],
            env=env, capture_output=True, text=True, timeout=60, check=True,
        ).stdout
        print("gibbs status with the observer key:", out.strip()[:80], "...")
        worker.terminate()
        worker.join(30)
    finally:
        hub.close()


if __name__ == "__main__":
    main()
