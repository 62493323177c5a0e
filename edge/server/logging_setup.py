"""The one logging configuration of every edge process: supervisor, workers, control plane.

Records go to stderr as text lines or JSON lines ([log] format), at the [log] level or
the `--log-level` given on the command line. The level applies to this project's
loggers; other libraries (asyncio, aiohttp, redis) log their warnings and errors only.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO, get_args

import msgspec

from edge.server.config import LogLevel, LogSection

OWN_LOGGERS = ("edge", "wake", "scheduler_client")
LEVELS: tuple[str, ...] = get_args(LogLevel)  # the choices of --log-level


def _timestamp(created: float) -> str:
    """UTC, ISO 8601 with milliseconds: sortable across processes and hosts."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    """`TIME LEVEL PROCESS: message`, the traceback (if any) on the lines after it."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{_timestamp(record.created)} {record.levelname} {self.process}: {record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in the message are escaped)."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _timestamp(record.created),
            "level": record.levelname.lower(),
            "process": self.process,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return msgspec.json.encode(entry).decode()


class _EdgeHandler(logging.StreamHandler):
    """Ours, so configuring again replaces it and leaves anyone else's handlers alone."""


def setup_logging(
    settings: LogSection,
    process: str,
    level: LogLevel | None = None,
    stream: TextIO | None = None,
) -> None:
    """Send this process's log records to stderr as `settings` says; `level` (from
    --log-level) overrides settings.level. Calling it again (on reload) replaces it."""
    number = logging.getLevelNamesMapping()[(level or settings.level).upper()]
    formatter: logging.Formatter = (
        JsonFormatter(process) if settings.format == "json" else TextFormatter(process)
    )
    handler = _EdgeHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _EdgeHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(number, logging.WARNING))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(number)
