"""The stand-in GPU model (benchmarks.models.FakeGPU) served by LitServe, for
the information rows of the adaptive-batching benchmark. Optional: needs
``pip install litserve``; imported only by the server process, which the
benchmark starts as::

    python -m benchmarks.litserve_app --port P [--batch-size 32] [--batch-timeout S] [--workers 2] [--trivial]

One server, two endpoints: ``POST /batched`` (``max_batch_size``,
``batch_timeout``) and ``POST /unbatched`` (``max_batch_size=1``), each with
``--workers`` inference processes (``--trivial`` adds ``POST /trivial``, the
identity model, for the HTTP benchmark; ``--sleep S`` adds ``POST /sleep``, a
model that sleeps S seconds, for the overload benchmark, which counts its
calls in ``--count-file``; ``--timeout``: LitServer's own request timeout);
a request is ``{"x": <int>}`` and the answer ``{"y": <int>}``.
"""

from __future__ import annotations

import argparse
import logging
import sys

import litserve as ls

from .models import Echo, FakeGPU


class GpuAPI(ls.LitAPI):
    """``model(x)``, one request at a time (``max_batch_size=1``)."""

    batched = False

    def setup(self, device):  # noqa: ANN001 - LitServe reads the signatures
        self.model = FakeGPU(self.batched)

    def decode_request(self, request):  # noqa: ANN001 - no annotation: the JSON body
        return request["x"]

    def predict(self, x):  # noqa: ANN001
        return self.model(x)

    def encode_response(self, output):  # noqa: ANN001
        return {"y": output}


class TrivialAPI(GpuAPI):
    """The trivial model: gives back its input."""

    def setup(self, device):  # noqa: ANN001
        self.model = Echo()


class SleepAPI(GpuAPI):
    """The overload benchmark's model: sleeps, appends a byte to a count file."""

    seconds = 0.01
    count_file = ""

    def setup(self, device):  # noqa: ANN001
        import os

        self.model = Echo()
        self.fd = os.open(self.count_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT) if self.count_file else None

    def predict(self, x):  # noqa: ANN001
        import os
        import time

        time.sleep(self.seconds)
        if self.fd is not None:
            os.write(self.fd, b".")
        return x


class BatchedGpuAPI(GpuAPI):
    """``model(xs)`` on a list of up to ``max_batch_size`` requests' inputs."""

    batched = True

    def batch(self, inputs):  # noqa: ANN001
        return list(inputs)

    def unbatch(self, output):  # noqa: ANN001
        return list(output)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.litserve_app")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batch-timeout", type=float, default=0.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--api-servers", type=int, default=None)
    p.add_argument("--fast-queue", action=argparse.BooleanOptionalAction, default=True,
                   help="LitServer(fast_queue=...): answers through ZeroMQ (default on)")
    p.add_argument("--trivial", action="store_true", help="also POST /trivial: the identity model")
    p.add_argument("--sleep", type=float, default=None, help="also POST /sleep: a model that sleeps this long")
    p.add_argument("--count-file", default="", help="/sleep appends a byte here per call")
    p.add_argument("--timeout", type=float, default=60.0, help="LitServer(timeout=...)")
    args = p.parse_args(argv)
    logging.getLogger("litserve").setLevel(logging.WARNING)
    apis = [
        BatchedGpuAPI(max_batch_size=args.batch_size, batch_timeout=args.batch_timeout, api_path="/batched"),
        GpuAPI(api_path="/unbatched"),
    ]
    if args.trivial:
        apis.append(TrivialAPI(api_path="/trivial"))
    if args.sleep is not None:
        sleeper = SleepAPI(api_path="/sleep")
        sleeper.seconds, sleeper.count_file = args.sleep, args.count_file  # pickled with it to the workers
        apis.append(sleeper)
    server = ls.LitServer(
        apis, accelerator="cpu", devices=1, workers_per_device=args.workers, timeout=args.timeout,
        enable_shutdown_api=False, disable_openapi_url=True, fast_queue=args.fast_queue,
    )
    server.run(
        host="127.0.0.1", port=args.port, num_api_servers=args.api_servers, log_level="warning",
        generate_client_file=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
