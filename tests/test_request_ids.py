"""Request ids: every call has one (given by its caller, inherited by the
calls a model makes while serving it, else made by the hub), the model reads
it with gibbs.request_id(), and it crosses a client hub and the router."""

from __future__ import annotations

import asyncio
import re
from typing import Any, Callable

import pytest
from conftest import run

import gibbs
from gibbs import Hub, protocol


def test_forward_frames_carry_a_request_id_or_none() -> None:
    body = protocol.encode(((1,), {})).body
    for rid in (None, "abc-1", "é" * 100):
        frame = b"".join(bytes(b) for b in protocol.pack_forward(7, "m", protocol.FWD_SINGLE, body, rid))
        kind, req_id, n = protocol.HEADER.unpack_from(frame)
        model, flags, payload, got, _ = protocol.unpack_forward(frame[protocol.HEADER.size :])
        assert (kind, req_id, model, got) == (protocol.FORWARD, 7, "m", rid)
        assert flags & protocol.FWD_SINGLE
        assert bytes(payload) == bytes(body)
    with pytest.raises(protocol.ProtocolError):
        protocol.unpack_request_id(b"")
    with pytest.raises(protocol.ProtocolError):
        protocol.unpack_request_id(b"\xff")


def test_a_request_id_must_be_a_short_str(hub: Hub) -> None:
    with pytest.raises(TypeError):
        hub.submit(1, gibbs_request_id=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        hub.submit(1, gibbs_request_id="")
    with pytest.raises(ValueError):
        hub.submit(1, gibbs_request_id="x" * 201)


def test_outside_a_call_there_is_none() -> None:
    assert gibbs.request_id() is None


@pytest.mark.timeout(120)
def test_ids_given_made_and_inherited(make_hub: Callable[..., Hub], make_workers: Any) -> None:
    from gibbs_test_models import AsyncRequestIds, BatchedRequestIds, RequestIds

    hub = make_hub()
    make_workers(hub, RequestIds, 1, gibbs_model="leaf")
    make_workers(hub, RequestIds, 1, "leaf", gibbs_model="sync-outer")
    make_workers(hub, AsyncRequestIds, 1, "leaf", gibbs_model="async-outer", gibbs_concurrency=4)
    make_workers(hub, BatchedRequestIds, 1, gibbs_model="batched", gibbs_batch_size=4)
    run(hub.wait_for_workers(4, timeout=60))

    async def main() -> list[Any]:
        return list(await asyncio.gather(
            hub.request(gibbs_model="leaf", gibbs_request_id="given-1"),
            hub.request(gibbs_model="leaf"),
            hub.request(gibbs_model="leaf"),
            hub.request(gibbs_model="sync-outer", gibbs_request_id="chain-a"),
            hub.request(gibbs_model="async-outer", gibbs_request_id="chain-b"),
            hub.request(gibbs_model="sync-outer"),
            hub.request(1, gibbs_model="batched", gibbs_request_id="batch-c"),
        ))

    given, made1, made2, chain_a, chain_b, chain_made, batched = run(main(), timeout=60)
    assert given == "given-1"
    assert re.fullmatch(r"[0-9a-f]{8}-\d+", made1), made1
    assert made1 != made2 and made1.split("-")[0] == made2.split("-")[0]
    assert chain_a == ["chain-a", "chain-a"]  # a sync model's nested call carries its id
    assert chain_b == ["chain-b", "chain-b"]  # an async model's too
    assert chain_made[0] == chain_made[1] and re.fullmatch(r"[0-9a-f]{8}-\d+", chain_made[0])
    assert batched == "batch-c"
    # Streams, from a sync and an async worker:
    async def streams() -> list[Any]:
        a = [item async for item in hub.stream(gibbs_model="leaf", gibbs_request_id="s-1")]
        b = [item async for item in hub.stream(gibbs_model="async-outer", gibbs_request_id="s-2")]
        return [a, b]

    assert run(streams(), timeout=60) == [["s-1"], [["s-2", "s-2"]]]
    with hub.submit_stream(gibbs_model="leaf", gibbs_request_id="s-3") as it:
        assert list(it) == ["s-3"]
    # From a plain thread, with submit:
    assert hub.submit(gibbs_model="leaf", gibbs_request_id="thread-d").result(timeout=30) == "thread-d"


@pytest.mark.timeout(120)
def test_a_client_hub_sends_its_id_to_the_router(make_hub: Callable[..., Hub], make_workers: Any) -> None:
    from gibbs_test_models import RequestIds

    router = make_hub()
    make_workers(router, RequestIds, 1)
    run(router.wait_for_workers(1, timeout=60))
    client = Hub(port=router.port, host="127.0.0.1")
    try:
        assert client._ensure_started().role == "client"
        assert client.submit(gibbs_request_id="web-7").result(timeout=30) == "web-7"
        made = client.submit().result(timeout=30)
        # the client made it: its prefix, not the router's
        assert made.startswith(client._ensure_started().request_ids), (made, client._ensure_started().request_ids)
    finally:
        client.close(grace=0)


@pytest.mark.timeout(120)
def test_the_asgi_middleware_takes_x_request_id(make_hub: Callable[..., Hub], make_workers: Any) -> None:
    """An endpoint behind CancelOnDisconnect: its calls carry the request's
    X-Request-ID (and a request without one: ids of the hub's own)."""
    from gibbs_test_models import RequestIds

    from gibbs.asgi import CancelOnDisconnect

    hub = make_hub()
    make_workers(hub, RequestIds, 1)
    run(hub.wait_for_workers(1, timeout=60))

    async def endpoint(scope: Any, receive: Any, send: Any) -> None:
        seen = gibbs.request_id()
        answer = await hub.request()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": f"{seen} {answer}".encode()})

    app = CancelOnDisconnect(endpoint)

    async def get(headers: list[tuple[bytes, bytes]]) -> str:
        sent: list[Any] = []
        never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def receive() -> Any:
            return await never

        async def send(message: Any) -> None:
            sent.append(message)

        await app({"type": "http", "path": "/", "headers": headers}, receive, send)
        assert gibbs.request_id() is None  # it stayed the endpoint's
        return bytes(sent[-1]["body"]).decode()

    assert run(get([(b"x-request-id", b"req-42")]), timeout=30) == "req-42 req-42"
    seen, answer = run(get([(b"accept", b"*/*")]), timeout=30).split()
    assert seen == "None" and re.fullmatch(r"[0-9a-f]{8}-\d+", answer), answer
    seen, answer = run(get([(b"X-Request-ID", b"x" * 201)]), timeout=30).split()  # too long: not taken
    assert seen == "None" and answer != "x" * 201
