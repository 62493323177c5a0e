"""JSON-lines access log; absent entirely (None) when off, so the hot path pays one check."""

from __future__ import annotations

import sys
import time
from typing import IO, TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from edge.http.exchange import Exchange


class AccessRecord(msgspec.Struct):
    ts: float
    app: str
    method: str
    path: str
    status: int
    duration_ms: float
    client: str
    request_id: str
    worker: int


class AccessLog:
    """Buffered writer; `flush` runs from the worker's periodic task."""

    def __init__(self, target: str, worker: int) -> None:
        self.worker = worker
        self._encoder = msgspec.json.Encoder()
        self._pending: list[bytes] = []
        self._file: IO[bytes] = (
            sys.stdout.buffer if target == "stdout" else open(target, "ab")  # noqa: SIM115
        )

    def write(self, ex: Exchange, client: str, elapsed: float) -> None:
        record = AccessRecord(
            ts=time.time(),
            app=ex.app or "-",
            method=ex.method.decode("latin-1"),
            path=ex.path.decode("latin-1"),
            status=ex.status,
            duration_ms=round(elapsed * 1000, 3),
            client=client,
            request_id=ex.request_id.decode("latin-1"),
            worker=self.worker,
        )
        self._pending.append(self._encoder.encode(record) + b"\n")
        if len(self._pending) >= 256:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._file.write(b"".join(self._pending))
            self._file.flush()
            self._pending.clear()

    def close(self) -> None:
        self.flush()
        if self._file is not sys.stdout.buffer:
            self._file.close()


def open_access_log(target: str, worker: int) -> AccessLog | None:
    return None if target == "off" else AccessLog(target, worker)
