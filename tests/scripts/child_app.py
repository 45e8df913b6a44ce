"""The layout where the parent creates the hub and starts the workers, and the
application runs in a child process: the hub is first used in the child.

    python child_app.py START_METHOD PORT

The parent creates ``hub = Hub(port=PORT)`` at import (binding nothing),
starts two workers, then a child process (with START_METHOD) that sends
requests through ``hub`` with asyncio and puts what it got on a queue. Exit
status 0 and a last line "OK ..." when every answer is right; the parent
never uses the hub itself.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gibbs_test_models import Square  # noqa: E402

from gibbs import Hub, Worker  # noqa: E402

PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 5019

# At import, in the parent, outside any event loop: binds nothing, starts no thread.
# (With spawn/forkserver the child re-imports this module and gets its own Hub.)
hub = Hub(port=PORT, heartbeat_interval=0.2)


def app(queue: "multiprocessing.Queue[object]") -> None:
    async def main() -> dict[str, object]:
        await hub.wait_for_workers(2, timeout=60)
        t0 = time.perf_counter()
        squares = await asyncio.gather(*(hub.request(i) for i in range(8)))
        elapsed = time.perf_counter() - t0
        return {"squares": squares, "elapsed": elapsed, "pid": os.getpid(), "stats": hub.statistics()}

    try:
        result = asyncio.run(main())
        hub.close()
        queue.put(result)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


def main() -> int:
    method = sys.argv[1]
    ctx = multiprocessing.get_context(method)
    workers = [Worker(Square, 0.2, gibbs_port=PORT, gibbs_heartbeat_interval=0.2, gibbs_start_method=method)
               for _ in range(2)]
    for w in workers:
        w.start()
    try:
        assert hub._bridge is None, "the parent must not have started the hub"
        queue = ctx.Queue()
        child = ctx.Process(target=app, args=(queue,), name="app")
        child.start()
        result = queue.get(timeout=90)
        child.join(30)
        if "error" in result:
            print(f"FAIL child: {result['error']}")
            return 1
        if result["squares"] != [i * i for i in range(8)]:
            print(f"FAIL wrong answers: {result['squares']}")
            return 1
        if result["pid"] == os.getpid():
            print("FAIL the app did not run in a child")
            return 1
        if child.exitcode != 0:
            print(f"FAIL child exit code {child.exitcode}")
            return 1
        if hub._bridge is not None:
            print("FAIL the parent's hub was started")
            return 1
        print(f"OK {method} elapsed={result['elapsed']:.3f}")
        return 0
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.kill()
                w.join(5)


if __name__ == "__main__":
    sys.exit(main())
