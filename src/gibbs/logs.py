"""What gibbs's log lines name: the model, the worker and the request id.

Every record gibbs logs (the ``"gibbs"`` logger) carries three attributes,
``None`` where the line concerns no model, worker or call:

* ``gibbs_model``: the model's name;
* ``gibbs_worker``: the worker's name (``Worker(gibbs_name=...)``, by
  default ``<host>-<pid>``);
* ``gibbs_request_id``: the request id of the call the line is about
  (several, comma-separated, for a worker lost with several calls), see
  :func:`gibbs.request_id`.

A log call passes them with ``extra=fields(...)`` (or ``extra=peer(p)``
for a connection of the hub). :class:`LogFields` is the filter to put on a
handler so that every record it formats has the three, a user's own
records too: those logged while a worker serves a call get that call's.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from . import _context

__all__ = ["LogFields", "FIELDS", "fields", "peer"]

#: The attributes every gibbs record carries.
FIELDS = ("gibbs_model", "gibbs_worker", "gibbs_request_id")


def fields(model: Optional[str] = None, worker: Optional[str] = None, request_id: Optional[str] = None) -> dict[str, Any]:
    """The ``extra=`` of a gibbs log call."""
    return {"gibbs_model": model or None, "gibbs_worker": worker, "gibbs_request_id": request_id}


def peer(p: Any, request_id: Optional[str] = None) -> dict[str, Any]:
    """``extra=`` for a line about a connection of the hub (a worker, a client
    hub, the router): its model, and its name when it is a worker."""
    hello = p.hello
    worker = p.name if hello.role == "worker" else None
    return fields(hello.model, worker, request_id)


class LogFields(logging.Filter):
    """A ``logging.Filter`` for a handler: every record it lets through has
    ``gibbs_model``, ``gibbs_worker`` and ``gibbs_request_id`` (``None``
    where unknown), so that a format string (``%(gibbs_request_id)s``) or a
    JSON formatter can use them on any record. A record that has none (a
    user's own, say) gets the call being served here: in a model's call in
    a worker, the request id (:func:`gibbs.request_id`), the model and the
    worker; in an endpoint behind :class:`gibbs.asgi.CancelOnDisconnect`,
    the request's id. Lets every record through::

        handler = logging.StreamHandler()
        handler.addFilter(gibbs.LogFields())
        handler.setFormatter(logging.Formatter(
            "%(levelname)s %(gibbs_model)s %(gibbs_worker)s %(gibbs_request_id)s %(message)s"))
    """

    def filter(self, record: logging.LogRecord) -> bool:
        d = record.__dict__
        if "gibbs_request_id" not in d:
            d["gibbs_request_id"] = _context.request_id()
            serving = _context.serving if d["gibbs_request_id"] is not None else None
            d.setdefault("gibbs_model", serving.model if serving is not None else None)
            d.setdefault("gibbs_worker", serving.name or None if serving is not None else None)
        else:
            d.setdefault("gibbs_model", None)
            d.setdefault("gibbs_worker", None)
        return True
