"""Finding a hub's place: bind the address (this hub routes), or join the
hub of the same application that holds it (this hub is its client), and
later find the router again or take the address over when it goes (the
bridge's rendezvous thread calls :meth:`_Place.find`).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import time
from typing import Any, Optional

from . import _context, protocol
from .errors import (
    AddressInUseError,
    AuthenticationError,
    ProtocolError,
)
from .pool import Pool
from .transport import (
    ANY_APP,
    APP_ENV,
    PORT_ENV,
    default_app,
    dial,
    is_loopback,
    listen,
    listen_local,
)

logger = logging.getLogger("gibbs")


class _Place:
    """Where a hub stands in its family: the address it takes, or the router
    it joins. Shared by the hub and its bridge (which calls it again when its
    router is lost), so that the bridge holds no reference to the hub."""

    def __init__(
        self,
        host: str,
        port: int,
        router: Optional[tuple[str, int]],
        authkey: bytes,
        explicit: bool,
        handshake_timeout: float,
        heartbeat_interval: float,
    ) -> None:
        self.host = host
        self.port = port
        self.router = router  # set: a client of the hub there, never a router
        self.authkey = authkey
        self.explicit = explicit
        self.handshake_timeout = handshake_timeout
        self.heartbeat_interval = heartbeat_interval
        self.bound: Optional[tuple[str, int]] = None  # once listening
        self.max_frame = protocol.DEFAULT_MAX_FRAME  # the hub sets its own
        self.app = default_app()  # the hub sets its own
        self.standby: list[Pool] = []  # pools started if this hub takes the address over
        self.ssl_context: Optional[ssl.SSLContext] = None  # set: joining the router over TCP carries TLS

    def listen(self) -> list[socket.socket]:
        """The TCP listener, and on loopback the local (unix) one. With a
        known port the local one is bound first: a worker or hub of this
        machine that finds the TCP port open must find the local socket too,
        or it would fall back to TCP, where only a shared key lets it in."""
        loopback = is_loopback(self.host)
        local = listen_local(self.port) if loopback and self.port else None
        try:
            listener = listen(self.host, self.port)
        except BaseException:
            if local is not None:
                local.close()
            raise
        if loopback and local is None:
            for _ in range(5):  # a router that is closing may hold the local name a moment longer
                local = listen_local(listener.getsockname()[1])
                if local is not None:
                    break
                time.sleep(0.01)
        return [listener] + ([local] if local is not None else [])

    def join(self, timeout: float) -> tuple[socket.socket, dict[str, Any], protocol.FrameReader, list[Any]]:
        """Connect to the router hub at our address as a client hub. Returns
        the socket, the router's WELCOME, and the reader with the frames
        that followed our HELLO (at least the router's first POOL): nothing
        is sent on the connection until the router has taken us in."""
        sock, welcome, reader, frames = dial(
            self.host, self.port, self.authkey, self.explicit, timeout, self.ssl_context, self.max_frame
        )
        try:
            # Found at our own address (not named by GIBBS_HUB/address=): the
            # hub there must be of this application, or we would answer our
            # callers with another application's models.
            theirs = welcome.get("app")
            if self.router is None and isinstance(theirs, str) and theirs not in (ANY_APP, self.app):
                raise AddressInUseError(errno.EADDRINUSE, self.mismatch(theirs))
            hello = {
                "role": "client",
                "app": None if self.router is not None else self.app,
                # Inside a worker: whose calls these are (the router tells a
                # model waiting on itself from a busy one).
                "within": _context.serving.token if _context.serving is not None else None,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "name": f"hub-{os.getpid()}",
                "heartbeat_interval": self.heartbeat_interval,
                # Our FORWARDs say "none given" apart from class 0, when the router reads them so.
                "explicit_class": welcome.get("explicit_class") is True,
            }
            sock.sendall(protocol.pack_json(protocol.HELLO, hello))
            while not any(kind == protocol.POOL for kind, _, _ in frames):
                for kind, _, body in frames:
                    if kind == protocol.REFUSED:
                        refusal = protocol.unpack_json(body)
                        if refusal.get("app"):
                            raise AddressInUseError(errno.EADDRINUSE, self.mismatch(str(refusal["app"])))
                        raise ConnectionRefusedError(refusal.get("reason", "refused"))
                data = sock.recv(65536)
                if not data:
                    raise ConnectionResetError("the hub closed the connection after our HELLO")
                frames.extend(reader.feed(data))
            sock.settimeout(None)
            return sock, welcome, reader, frames
        except BaseException:
            sock.close()
            raise

    def mismatch(self, theirs: str) -> str:
        where = f"{self.host}:{self.port}"
        return (
            f"{where} is held by the hub of another application ({theirs}); this hub's application is "
            f"{self.app}. A hub never sends its calls to another application's hub. Give each application "
            f"its own address: Hub(port=...) or {PORT_ENV}=... here, and the same port for its workers "
            f"(gibbs_port=..., python -m gibbs worker --hub 127.0.0.1:PORT); or, if the two are one "
            f"application, give both the same name: Hub(app=...) or {APP_ENV}=..."
        )

    def __call__(self) -> Optional[tuple[str, Any]]:
        """Where this hub stands (the bridge calls it again when its router
        is lost): the address is free -> take it and route; a hub holds it
        -> join that hub as a client. Raises when neither works this time."""
        if self.router is None:
            try:
                return ("listen", self.listen())
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        return ("client", self.join(self.handshake_timeout))

    def find(self) -> tuple[list[socket.socket], Optional[tuple[Any, ...]]]:
        """At start: the listeners if this hub routes, else its connection
        to the router (None: not reached yet; the bridge keeps trying)."""
        where = f"{self.host}:{self.port}"
        if self.router is not None:
            try:
                return [], self.join(self.handshake_timeout)
            except (OSError, ProtocolError) as exc:
                if isinstance(exc, AuthenticationError):
                    raise AuthenticationError(f"the hub at {where} refused this hub's key: {exc}") from exc
                logger.warning("gibbs hub: no hub at %s yet (%s); calls wait for it", where, exc)
                return [], None
        deadline = time.monotonic() + self.handshake_timeout
        while True:
            try:
                return self.listen(), None
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or self.port == 0:
                    raise OSError(exc.errno, f"gibbs hub cannot listen on {where}: {exc.strerror}") from exc
            try:
                return [], self.join(max(0.1, deadline - time.monotonic()))
            except AddressInUseError as exc:
                logger.error("gibbs hub: %s", exc.strerror)
                raise
            except AuthenticationError as exc:
                raise AuthenticationError(
                    f"{where} is held by a gibbs hub that refused this hub's key (another user's, or "
                    f"another key): pick another port, or share its key ({exc})"
                ) from exc
            except ProtocolError as exc:
                raise OSError(
                    errno.EADDRINUSE, f"gibbs hub cannot listen on {where}: in use by something that is not a gibbs hub ({exc})"
                ) from exc
            except OSError as exc:
                # The holder went away between our bind and our connect: try again.
                if time.monotonic() >= deadline:
                    raise OSError(
                        errno.EADDRINUSE, f"gibbs hub cannot listen on {where}, nor reach the hub there: {exc}"
                    ) from exc
                time.sleep(0.02)

    def took_over(self, role: str, listeners: list[socket.socket]) -> None:
        """Bridge thread: the router went away and this hub took the address:
        its standby pools start the family's workers now."""
        if listeners:
            self.bound = listeners[0].getsockname()[:2]
            for pool in self.standby:
                pool.activate()
