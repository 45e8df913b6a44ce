"""TLS for TCP links, from the standard library's ``ssl``.

gibbs reads and writes its sockets from several places at once (the event
loop, the bridge thread, a worker's heartbeat and reader threads) and sends
with ``sendmsg``; an ``ssl.SSLSocket`` allows neither. So a TLS connection is
carried by a *pump*: one thread that alone owns the ``SSLSocket`` and relays
bytes both ways to one end of a ``socket.socketpair()``. The rest of gibbs is
handed the other end, a :class:`TunnelSocket`, and reads and writes it as it
would the TCP socket. Closing either side closes the other.

A tunnelled socket is a unix socket to the kernel, whose ``SO_PEERCRED``
names this very process: :func:`gibbs.transport.peer_uid` and ``peer_pid``
never trust it (the peer is a TCP stranger), so the key is still required.

Configuration: an ``ssl.SSLContext`` in the API, or three files named by
``GIBBS_TLS_CERT``, ``GIBBS_TLS_KEY`` and ``GIBBS_TLS_CA`` (the command
line's ``--tls-cert``, ``--tls-key``, ``--tls-ca`` set them).
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import ssl
import threading
from typing import Any, NamedTuple, Optional

CERT_ENV = "GIBBS_TLS_CERT"
KEY_ENV = "GIBBS_TLS_KEY"
CA_ENV = "GIBBS_TLS_CA"

_logger = logging.getLogger("gibbs")

_CHUNK = 1 << 16
_LIMIT = 1 << 20  # bytes held in each direction before the pump stops reading that way


class TLSFiles(NamedTuple):
    """Where a process's certificate, its key and the authority it trusts lie
    (PEM files). Picklable, unlike an ``ssl.SSLContext``: a worker started
    with spawn carries these and builds its context itself."""

    cert: Optional[str]
    key: Optional[str]
    ca: Optional[str]

    def server_context(self) -> ssl.SSLContext:
        """A hub's context: its certificate; with a CA, clients must show a
        certificate that CA signed (mutual TLS)."""
        if not self.cert:
            raise ValueError(f"a hub with TLS needs its certificate ({CERT_ENV} or --tls-cert)")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key or None)
        if self.ca:
            ctx.load_verify_locations(cafile=self.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A worker's, client hub's or observer's context: it checks the hub's
        certificate against the CA (else the system's authorities) and its
        name; it shows its own certificate when it has one."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key or None)
        return ctx


def files_from_env() -> Optional[TLSFiles]:
    """The files named by ``GIBBS_TLS_CERT``, ``GIBBS_TLS_KEY`` and
    ``GIBBS_TLS_CA``; None when none is set (no TLS)."""
    cert, key, ca = (os.environ.get(name) or None for name in (CERT_ENV, KEY_ENV, CA_ENV))
    if cert is None and key is None and ca is None:
        return None
    if key is not None and cert is None:
        raise ValueError(f"{KEY_ENV} is set but {CERT_ENV} is not")
    return TLSFiles(cert, key, ca)


def server_context_from_env() -> Optional[ssl.SSLContext]:
    files = files_from_env()
    return files.server_context() if files is not None else None


class TunnelSocket(socket.socket):
    """The end of a socketpair that stands for a TLS connection. Its peer is
    the TCP peer: ``getpeername()`` gives that address, and the kernel's
    credentials (``SO_PEERCRED``, which would name this process) are never
    consulted for it."""

    __slots__ = ("peer_address",)
    peer_address: Any
    tunnelled = True

    def getpeername(self) -> Any:
        return self.peer_address


def tunnel(tls: ssl.SSLSocket, peer_address: Any, name: str = "gibbs-tls") -> TunnelSocket:
    """Start the pump of a handshaken ``tls`` socket; return the socket the
    rest of gibbs uses instead (blocking, no timeout)."""
    ours, theirs = socket.socketpair()
    try:
        inner = TunnelSocket(theirs.family, theirs.type, theirs.proto, fileno=theirs.detach())
    except BaseException:
        ours.close()
        theirs.close()
        raise
    inner.peer_address = peer_address
    threading.Thread(target=_pump, args=(tls, ours), name=name, daemon=True).start()
    return inner


def _pump(tls: ssl.SSLSocket, inner: socket.socket) -> None:
    """Relay bytes between ``tls`` and ``inner`` until either side ends.
    Non-blocking both: a TLS read or write may want the socket readable or
    writable (``SSLWantReadError``, ``SSLWantWriteError``), and decrypted
    bytes may wait in the TLS object with nothing to read on the socket, so
    every pass tries each way until none moves, then waits for what the
    blocked ones asked for."""
    sel = selectors.DefaultSelector()
    up = bytearray()  # from gibbs, to encrypt
    down = bytearray()  # decrypted, to gibbs
    up_eof = down_eof = False
    try:
        tls.setblocking(False)
        inner.setblocking(False)
        registered = {tls: 0, inner: 0}
        while True:
            want_tls = want_inner = 0
            moved = True
            while moved:
                moved = False
                if not up_eof and len(up) < _LIMIT:
                    try:
                        data = inner.recv(_CHUNK)
                    except BlockingIOError:
                        want_inner |= selectors.EVENT_READ
                    else:
                        moved = True
                        if data:
                            up += data
                        else:
                            up_eof = True
                if up:
                    try:
                        n = tls.send(memoryview(up)[:_CHUNK])
                    except ssl.SSLWantWriteError:
                        want_tls |= selectors.EVENT_WRITE
                    except ssl.SSLWantReadError:
                        want_tls |= selectors.EVENT_READ
                    else:
                        del up[:n]
                        moved = True
                if not down_eof and len(down) < _LIMIT:
                    try:
                        data = tls.recv(_CHUNK)
                    except ssl.SSLWantReadError:
                        want_tls |= selectors.EVENT_READ
                    except ssl.SSLWantWriteError:
                        want_tls |= selectors.EVENT_WRITE
                    except ssl.SSLZeroReturnError:
                        down_eof = moved = True
                    else:
                        moved = True
                        if data:
                            down += data
                        else:
                            down_eof = True
                if down:
                    try:
                        n = inner.send(down)
                    except BlockingIOError:
                        want_inner |= selectors.EVENT_WRITE
                    else:
                        del down[:n]
                        moved = True
                if (up_eof and not up) or (down_eof and not down):
                    return  # one side ended and all it sent is delivered: close both
            for sock, events in ((tls, want_tls), (inner, want_inner)):
                if events != registered[sock]:
                    if registered[sock]:
                        sel.unregister(sock)
                    if events:
                        sel.register(sock, events)
                    registered[sock] = events
            sel.select()
    except (OSError, ValueError) as exc:  # an SSLError is an OSError: a TLS error closes the link
        _logger.debug("gibbs: TLS link closed: %s", exc)
    finally:
        sel.close()
        for sock in (inner, tls):
            try:
                sock.close()
            except OSError:
                pass


def client_wrap(
    sock: socket.socket, context: ssl.SSLContext, host: str, timeout: Optional[float]
) -> TunnelSocket:
    """The connecting side: the TLS handshake on a connected TCP socket
    (checking the hub's certificate is for ``host``), then its tunnel."""
    sock.settimeout(timeout)
    address = sock.getpeername()
    tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    try:
        tls.do_handshake()
    except BaseException:
        tls.close()
        raise
    return tunnel(tls, address)
