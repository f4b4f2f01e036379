"""Logging configured once from ``__main__``; per-message context through a ContextVar."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Literal

import orjson

node_context: ContextVar[str | None] = ContextVar("node_context", default=None)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.node = node_context.get() or "-"
        return True


SECRET_HEADERS = frozenset(("authorization", "proxy-authorization", "cookie", "set-cookie"))


class QueryRedaction(logging.Filter):
    """uvicorn logs request targets with their query strings ("WebSocket /ws?token=…"
    [accepted]) and, at DEBUG, the WebSocket handshake's headers ("< authorization: …").
    The gateway never reads a credential from a query string, but a client may put one
    there: queries and credential headers are hidden before the record is formatted."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and args:
            if len(args) == 2 and str(args[0]).lower() in SECRET_HEADERS:
                record.args = (args[0], "[hidden]")
            else:
                record.args = tuple(_cut_query(a) if isinstance(a, str) else a for a in args)
        return True


def _cut_query(text: str) -> str:
    head, sep, _ = text.partition("?")
    return head + "?[query hidden]" if sep else text


def redact_server_logs() -> None:
    """Install ``QueryRedaction`` on uvicorn's loggers (once)."""
    for name in ("uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, QueryRedaction) for f in logger.filters):
            logger.addFilter(QueryRedaction())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "node": getattr(record, "node", "-"),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def configure(level: str = "INFO", fmt: Literal["text", "json"] = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiormq / paho are chatty at INFO about every reconnect attempt; ours say it once.
    for noisy in ("aiormq", "aio_pika", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
