"""Structured logging: one event per line, ``key=value`` text or JSON, to stderr.

``log_event(logger, "upstream_error", status=502, detail=...)`` is the structured helper;
fields whose names look secret are redacted. :class:`AccessLogger` adds one cheap line per
request (method, path without query, status, duration, bytes, request id, client IP). Lines are
written in small batches (:class:`BufferedLineHandler`): at most 0.1 s late, warnings at once.
"""

import asyncio
import contextlib
import json
import logging
import re
import sys
import time
from typing import Any, TextIO

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from gateway.forwarded import CLIENT_KEY
from gateway.settings import Settings

__all__ = [
    "ACCESS_LOGGER",
    "AccessEntry",
    "AccessLogger",
    "BufferedLineHandler",
    "JsonFormatter",
    "TextFormatter",
    "flush_logs",
    "log_event",
    "setup_logging",
]

_SECRET_WORDS = ("secret", "password", "token", "authorization", "cookie", "api_key", "apikey")
_RESERVED = frozenset({"ts", "level", "logger", "event"})
_FIELDS_ATTR = "gate_fields"
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

ACCESS_LOGGER = logging.getLogger("gateway.access")
#: An access-log entry: ts, logger, method, path, status, seconds, bytes, request id, IP.
AccessEntry = tuple[float, str, str, str, int, float, int, str, str]
# The handler installed by setup_logging (the access log writes to it directly).
_sink: "BufferedLineHandler | None" = None
_now = time.time


def setup_logging(settings: Settings) -> None:
    """Route every logger (ours, aiohttp's, libraries') to stderr in the configured format."""
    global _sink
    json_lines = settings.log_format == "json"
    handler = BufferedLineHandler(sys.stderr, json_lines=json_lines)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        old.flush()
        root.removeHandler(old)
    root.addHandler(handler)
    _sink = handler
    root.setLevel(_LEVELS[settings.log_level])
    # stripe-python logs two INFO lines per API call ("message='Request to Stripe api'…"):
    # useful when debugging, noise that buries everything else otherwise.
    logging.getLogger("stripe").setLevel(
        logging.DEBUG if settings.log_level == "debug" else logging.WARNING
    )
    # The records never show thread or process names; skipping them makes each record cheaper.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def flush_logs() -> None:
    """Write out buffered lines now (before a worker process exits: forked workers end with
    ``os._exit``, which skips logging's own flush at exit)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


class BufferedLineHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes lines in batches.

    At thousands of requests per second one ``write`` per access-log line costs more than the
    line itself. Lines are written when ``BATCH_LINES`` are pending, at most ``FLUSH_DELAY``
    seconds after the first pending one (an event-loop timer), at once for WARNING and above or
    when no event loop runs, and on ``flush()``.
    """

    # Kept hand-written rather than the standard library's batching handlers, for the request
    # path: ``logging.handlers.MemoryHandler`` flushes on a count or a level but has no time
    # bound (at low traffic a line could wait forever), and ``QueueHandler``/``QueueListener``
    # moves the writes to a thread, which costs a lock and a thread hand-off per line. The
    # access log hands in unformatted ``AccessEntry`` tuples that are formatted only when the
    # batch is written, so a request pays a tuple and a list append (no ``LogRecord``); that
    # cost is part of the gate's overhead that ``bench/`` measures against a bare proxy.
    BATCH_LINES = 256
    FLUSH_DELAY = 0.1

    def __init__(self, stream: TextIO, *, json_lines: bool = False) -> None:
        super().__init__(stream)
        self.json = json_lines  # the format, for writers that hand in unformatted entries
        self._pending: list[str | AccessEntry] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.add_line(line, urgent=record.levelno >= logging.WARNING)

    def add_line(self, line: str | AccessEntry, *, urgent: bool = False) -> None:
        """Queue one formatted line (no newline), or an access entry rendered when written:
        rendering a batch in one go is cheaper than one line between two requests."""
        with self.lock or contextlib.nullcontext():
            self._pending.append(line)
            if urgent or len(self._pending) >= self.BATCH_LINES:
                self.flush()
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (startup, shutdown, CLI): write now
                self.flush()
                return
            if self._timer is None or self._timer_loop is not loop:
                self._timer = loop.call_later(self.FLUSH_DELAY, self.flush)
                self._timer_loop = loop

    def is_only_handler_of(self, logger: logging.Logger) -> bool:
        """True when records of ``logger`` reach this handler and no other."""
        root = logging.root.handlers
        parent = logger.parent
        return (
            len(root) == 1
            and root[0] is self
            and not logger.handlers
            and logger.propagate
            and (parent is None or parent is logging.root or not parent.handlers)
        )

    def flush(self) -> None:
        with self.lock or contextlib.nullcontext():
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._pending:
                render = _access_json if self.json else _access_text
                text = "\n".join(
                    item if isinstance(item, str) else render(item) for item in self._pending
                )
                self._pending.clear()
                self.stream.write(text + "\n")
            self.stream.flush()


def log_event(
    logger: logging.Logger, event: str, *, level: int = logging.INFO, **fields: object
) -> None:
    """Log one structured event. Fields named like secrets (token, password, cookie…) are
    replaced by ``<redacted>``; never pass secrets or full customer payloads anyway."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={_FIELDS_ATTR: _redact(fields)}, stacklevel=2)


def _redact(fields: dict[str, object]) -> dict[str, object]:
    for name in fields:
        low = name.lower()
        if any(word in low for word in _SECRET_WORDS):
            fields[name] = "<redacted>"
    return fields


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """ts, level, logger, event, then the event's own fields and any exception."""
    out: dict[str, Any] = {
        "ts": _timestamp(record.created),
        "level": record.levelname.lower(),
        "logger": record.name,
        "event": record.getMessage(),
    }
    extra: dict[str, object] | None = getattr(record, _FIELDS_ATTR, None)
    if extra:
        for key, value in extra.items():
            out[f"{key}_" if key in _RESERVED else key] = value
    if record.exc_info:
        out["exc"] = logging.Formatter().formatException(record.exc_info)
    return out


_second = -1
_second_text = ""


def _timestamp(created: float) -> str:
    """ISO 8601 UTC with milliseconds; strftime runs once per second, not once per line."""
    global _second, _second_text
    sec = int(created)
    if sec != _second:
        _second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _second = sec
    return f"{_second_text}.{int((created - sec) * 1000):03d}Z"


# Values made only of these characters are written bare; anything else is JSON-quoted.
_BARE = re.compile(r"[!#-<>-\[\]-~]+")


class TextFormatter(logging.Formatter):
    """``key=value`` pairs; values with spaces, quotes, ``=`` or newlines are JSON-quoted."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"ts={_timestamp(record.created)} level={record.levelname.lower()} "
            f"logger={record.name} event={_text_value(record.getMessage())}"
        )
        extra: dict[str, object] | None = getattr(record, _FIELDS_ATTR, None)
        if extra:
            line += "".join(
                f" {key}_={_text_value(value)}"
                if key in _RESERVED
                else f" {key}={_text_value(value)}"
                for key, value in extra.items()
            )
        if record.exc_info:
            line += " exc=" + _text_value(self.formatException(record.exc_info))
        return line


def _text_value(value: object) -> str:
    if type(value) is int or type(value) is float:
        return str(value)
    text = value if isinstance(value, str) else str(value)
    if _BARE.fullmatch(text) is None:
        return json.dumps(text, ensure_ascii=False)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_record_fields(record), ensure_ascii=False, default=str)


def _access_text(e: AccessEntry) -> str:
    return (
        f"ts={_timestamp(e[0])} level=info logger={e[1]} event=request method={e[2]} "
        f"path={_text_value(e[3])} status={e[4]} ms={e[5] * 1000:.1f} bytes={e[6]} "
        f"rid={_text_value(e[7])} ip={e[8]}"
    )


def _access_json(e: AccessEntry) -> str:
    return json.dumps({
        "ts": _timestamp(e[0]), "level": "info", "logger": e[1], "event": "request",
        "method": e[2], "path": e[3], "status": e[4], "ms": round(e[5] * 1000, 1),
        "bytes": e[6], "rid": e[7], "ip": e[8],
    }, ensure_ascii=False)  # fmt: skip


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path (without the query: it may carry tokens), status,
    duration, bytes sent, request id and client IP.

    It runs for every request, so when our own :class:`BufferedLineHandler` is the only handler
    (the normal case after :func:`setup_logging`) it hands the bare values to it, skipping the
    LogRecord and the handler chain, and the line is rendered with its batch. With any other
    logging set-up it falls back to an ordinary record.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        try:
            client = request[CLIENT_KEY]  # not .get(): the Mapping mixin is slower
        except KeyError:  # answered without resolving the client (gate pages, healthz)
            rid, ip = "-", request.remote or "-"
        else:
            rid, ip = client.request_id, client.ip or "-"
        sink = _sink
        if sink is not None and sink.is_only_handler_of(self.logger):
            sink.add_line((_now(), self.logger.name, request.method, request.path,
                           response.status, time, response.body_length, rid, ip))  # fmt: skip
            return
        record = logging.LogRecord(
            self.logger.name, logging.INFO, __file__, 0, "request", None, None
        )
        record.gate_fields = {  # read by the formatters
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "ms": round(time * 1000, 1),
            "bytes": response.body_length,
            "rid": rid,
            "ip": ip,
        }
        self.logger.handle(record)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
