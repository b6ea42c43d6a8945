"""structlog configured once, with last processors that mask secrets: anything shaped like one,
and the exact values of those the process was configured with."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any
from urllib.parse import quote

import structlog

from llm_proxy.crypto import redact

# Configured secrets shorter than this are not looked for: they would match ordinary words in
# log lines (and a password that short is no secret anyway).
SHORTEST_REDACTED = 6
REDACTED = "***"


def _redact_secrets(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = redact(value)
    return event_dict


class ExactValues:
    """Masks the configured secrets in a rendered line: as they are, and as a JSON string, a
    ``repr`` or a URL would spell them. A few substring searches per line; never per request
    unless the request logs."""

    def __init__(self, secrets: Iterable[str]) -> None:
        spellings: set[str] = set()
        for secret in secrets:
            if len(secret) >= SHORTEST_REDACTED:
                spellings |= {
                    secret,
                    json.dumps(secret)[1:-1],
                    repr(secret)[1:-1],
                    quote(secret, safe=""),
                    quote(secret),
                }
        self._spellings = sorted(spellings, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._spellings)

    def __call__(self, line: str) -> str:
        for spelling in self._spellings:
            if spelling in line:
                line = line.replace(spelling, REDACTED)
        return line

    def rendered(self, _logger: Any, _name: str, line: str) -> str:
        """The processor after the renderer: a rendered line in, the line masked out."""
        return self(line)


class _RedactingFormatter(logging.Formatter):
    """Library lines (the standard library's logging) masked as structlog's are."""

    def __init__(self, fmt: str, exact: ExactValues) -> None:
        super().__init__(fmt)
        self._exact = exact

    def format(self, record: logging.LogRecord) -> str:
        return self._exact(redact(super().format(record)))


class _LogStream:
    """The log's stream, which no line can make raise. Workers and events processes share the
    supervisor's stderr, and what reads it (a terminal, a log shipper) may be gone with it: a
    line written into that closed pipe would raise out of whatever was logging, a shutdown
    included, and keep the process from stopping. From the first failed write on, the stream's
    file descriptor and every later line go to /dev/null."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except OSError:
            self._reader_gone()

    def flush(self) -> None:
        """Each write flushes already."""

    def _reader_gone(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        # The descriptor too: the interpreter writes tracebacks and warnings to it directly.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(devnull, self._stream.fileno())
        self._stream = os.fdopen(devnull, "w")


def configure_logging(
    level: str, fmt: str, stream: Any = None, *, secrets: Iterable[str] = ()
) -> None:
    """JSON lines for machines, coloured console lines on a terminal; secrets masked in both:
    anything shaped like a token or key, and the exact values of ``secrets``."""
    numeric = logging.getLevelName(level.upper())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=stream is None and sys.stderr.isatty())
    )
    exact = ExactValues(secrets)
    out = _LogStream(stream or sys.stderr)
    # The end of every chain: secrets masked, rendered, then masked again in the rendered line
    # (so values of every type, exceptions and nested ones included, are covered).
    rendered: list[Any] = [structlog.processors.format_exc_info, _redact_secrets, renderer]
    if exact:
        rendered.append(exact.rendered)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        *rendered,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line, its newline included: print() writes the line and its newline in
        # two calls, and workers and events processes share one stderr, so two processes' lines
        # could run together.
        logger_factory=structlog.WriteLoggerFactory(out),  # type: ignore[arg-type]  # write and flush suffice
        cache_logger_on_first_use=False,
    )
    # Libraries log through the standard library; route them to the same stream and level, in
    # the same format: a JSON log holds JSON lines only.
    handler = logging.StreamHandler(out)
    if fmt == "json":
        library: list[Any] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendered]
        handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=[
                    structlog.stdlib.add_logger_name,
                    structlog.stdlib.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                ],
                processors=library,
            )
        )
    else:
        handler.setFormatter(
            _RedactingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", exact)
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO))
    # python-multipart warns of every malformed form it reads, and the forms are the clients':
    # one line each would let any client fill the log. The proxy answers them 400 instead.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
