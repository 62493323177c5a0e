"""Durable state of the local control plane: one SQLite file, every transition journalled.

Resources are stored as msgspec-encoded JSON documents keyed by id, with the few
columns queries need. A state change and its journal row (a `machine_move`
plan) commit in one transaction, and callers commit before they act on the new
state.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import TypeVar

import msgspec

from scheduler_client.machine_move import JournalEntry
from scheduler_client.models import (
    Allocation,
    AppRoute,
    EdgeInfo,
    Host,
    Promotion,
    Region,
    RouteChange,
)

T = TypeVar("T", bound=msgspec.Struct)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS allocations (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    idempotency_key TEXT,
    state TEXT NOT NULL,
    pid INTEGER,
    doc BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS allocations_key ON allocations(app, idempotency_key);
CREATE TABLE IF NOT EXISTS promotions (id TEXT PRIMARY KEY, app TEXT, doc BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS hosts (name TEXT PRIMARY KEY, doc BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS regions (name TEXT PRIMARY KEY, doc BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS edges (edge_id TEXT PRIMARY KEY, doc BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS routes (app TEXT PRIMARY KEY, cas_epoch INTEGER, doc BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS route_changes (epoch INTEGER PRIMARY KEY, app TEXT, doc BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    machine TEXT NOT NULL,
    subject TEXT NOT NULL,
    from_state TEXT NOT NULL,
    to_state TEXT NOT NULL,
    reason TEXT NOT NULL,
    reason_code TEXT NOT NULL DEFAULT ''
);
"""
# Created after _migrate (reason_code may be new): they keep the gallery's counts cheap.
_JOURNAL_INDEXES = """
CREATE INDEX IF NOT EXISTS journal_reasons ON journal(machine, reason_code);
CREATE INDEX IF NOT EXISTS journal_moves ON journal(machine, from_state, to_state);
"""
# Instances per state, per table: allocations have a state column, the others' is in the doc.
_STATE_COUNTS = {
    table: f"SELECT {column}, COUNT(*) FROM {table} GROUP BY 1"
    for table, column in (
        ("allocations", "state"),
        ("promotions", "json_extract(CAST(doc AS TEXT), '$.state')"),
        ("hosts", "json_extract(CAST(doc AS TEXT), '$.state')"),
        ("regions", "json_extract(CAST(doc AS TEXT), '$.state')"),
    )
}
_JOURNAL_COLUMNS = "at, machine, subject, from_state, to_state, reason, reason_code"


class JournalRow(JournalEntry, frozen=True, kw_only=True):
    """A journal entry as stored: numbered in commit order."""

    seq: int


class ControlPlaneStore:
    """Synchronous SQLite access; the file is local and every statement is short."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        self._migrate()
        self.db.executescript(_JOURNAL_INDEXES)
        self._encoder = msgspec.json.Encoder()

    def _migrate(self) -> None:
        """Bring a state file written by an older version up to the current schema."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(journal)")}
        if "reason_code" not in columns:
            self.db.execute("ALTER TABLE journal ADD COLUMN reason_code TEXT NOT NULL DEFAULT ''")

    def close(self) -> None:
        self.db.close()

    # -------------------------------------------------------------- generic

    def _transaction(self) -> _Transaction:
        return _Transaction(self.db)

    def _load(self, table: str, key: str, value: str, kind: type[T]) -> T | None:
        row = self.db.execute(f"SELECT doc FROM {table} WHERE {key} = ?", (value,)).fetchone()
        return None if row is None else msgspec.json.decode(row[0], type=kind)

    def _all(self, sql: str, args: tuple, kind: type[T]) -> list[T]:
        decoder = msgspec.json.Decoder(kind)
        return [decoder.decode(row[0]) for row in self.db.execute(sql, args)]

    def _journal(self, entry: JournalEntry) -> None:
        self.db.execute(
            f"INSERT INTO journal ({_JOURNAL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                entry.at,
                entry.machine,
                entry.subject,
                entry.from_state,
                entry.to_state,
                entry.reason,
                entry.reason_code,
            ),
        )

    def journal_entries(self, subject: str | None = None) -> list[JournalRow]:
        sql = f"SELECT seq, {_JOURNAL_COLUMNS} FROM journal"
        args: tuple = ()
        if subject is not None:
            sql += " WHERE subject = ?"
            args = (subject,)
        names = ("seq", *_JOURNAL_COLUMNS.split(", "))
        return [
            JournalRow(**dict(zip(names, row, strict=True)))
            for row in self.db.execute(sql + " ORDER BY seq", args)
        ]

    def state_counts(self, table: str) -> dict[str, int]:
        """Rows of `table` (allocations, promotions, hosts, regions) per state."""
        return {state: n for state, n in self.db.execute(_STATE_COUNTS[table])}

    def reason_counts(self) -> dict[str, dict[str, int]]:
        """machine -> reason_code -> journal rows that name it."""
        found: dict[str, dict[str, int]] = {}
        rows = self.db.execute(
            "SELECT machine, reason_code, COUNT(*) FROM journal WHERE reason_code != ''"
            " GROUP BY machine, reason_code"
        )
        for machine, code, n in rows:
            found.setdefault(machine, {})[code] = n
        return found

    def move_counts(self) -> dict[str, dict[str, int]]:
        """machine -> "from->to" -> journalled moves (creations and events left out)."""
        found: dict[str, dict[str, int]] = {}
        rows = self.db.execute(
            "SELECT machine, from_state, to_state, COUNT(*) FROM journal"
            " WHERE from_state != '' AND from_state != to_state"
            " GROUP BY machine, from_state, to_state"
        )
        for machine, frm, to, n in rows:
            found.setdefault(machine, {})[f"{frm}->{to}"] = n
        return found

    def meta(self, key: str, default: int = 0) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else int(row[0])

    # ---------------------------------------------------------- allocations

    def allocation(self, allocation_id: str) -> Allocation | None:
        return self._load("allocations", "id", allocation_id, Allocation)

    def allocation_by_key(self, app: str, key: str) -> Allocation | None:
        row = self.db.execute(
            "SELECT doc FROM allocations WHERE app = ? AND idempotency_key = ?", (app, key)
        ).fetchone()
        return None if row is None else msgspec.json.decode(row[0], type=Allocation)

    def allocations(self, app: str | None = None) -> list[Allocation]:
        if app is None:
            return self._all("SELECT doc FROM allocations ORDER BY rowid", (), Allocation)
        return self._all(
            "SELECT doc FROM allocations WHERE app = ? ORDER BY rowid", (app,), Allocation
        )

    def live_allocations(self) -> list[Allocation]:
        return self._all(
            "SELECT doc FROM allocations WHERE state NOT IN ('stopped', 'failed') ORDER BY rowid",
            (),
            Allocation,
        )

    def insert_allocation(self, alloc: Allocation, entry: JournalEntry) -> None:
        """Insert a new allocation; raises sqlite3.IntegrityError on a duplicate key."""
        with self._transaction():
            self.db.execute(
                "INSERT INTO allocations (id, app, idempotency_key, state, pid, doc)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    alloc.id,
                    alloc.app,
                    alloc.idempotency_key,
                    alloc.state,
                    alloc.pid,
                    self._encoder.encode(alloc),
                ),
            )
            self._journal(entry)

    def save(
        self, record: Allocation | Promotion | Host | Region, entry: JournalEntry | None = None
    ) -> None:
        """Persist one resource (an allocation must exist) and journal `entry` with it."""
        with self._transaction():
            doc = self._encoder.encode(record)
            if isinstance(record, Allocation):
                self.db.execute(
                    "UPDATE allocations SET state = ?, pid = ?, doc = ? WHERE id = ?",
                    (record.state, record.pid, doc, record.id),
                )
            elif isinstance(record, Promotion):
                self.db.execute(
                    "INSERT INTO promotions (id, app, doc) VALUES (?, ?, ?)"
                    " ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
                    (record.id, record.app, doc),
                )
            elif isinstance(record, Host):
                self.db.execute(
                    "INSERT INTO hosts (name, doc) VALUES (?, ?)"
                    " ON CONFLICT(name) DO UPDATE SET doc = excluded.doc",
                    (record.name, doc),
                )
            else:
                self.db.execute(
                    "INSERT INTO regions (name, doc) VALUES (?, ?)"
                    " ON CONFLICT(name) DO UPDATE SET doc = excluded.doc",
                    (record.name, doc),
                )
            if entry is not None:
                self._journal(entry)

    # ------------------------------------------------------------ documents

    def promotion(self, promotion_id: str) -> Promotion | None:
        return self._load("promotions", "id", promotion_id, Promotion)

    def promotions(self) -> list[Promotion]:
        return self._all("SELECT doc FROM promotions ORDER BY rowid", (), Promotion)

    def host(self, name: str) -> Host | None:
        return self._load("hosts", "name", name, Host)

    def hosts(self) -> list[Host]:
        return self._all("SELECT doc FROM hosts ORDER BY name", (), Host)

    def region(self, name: str) -> Region | None:
        return self._load("regions", "name", name, Region)

    def edge(self, edge_id: str) -> EdgeInfo | None:
        return self._load("edges", "edge_id", edge_id, EdgeInfo)

    def edges(self) -> list[EdgeInfo]:
        return self._all("SELECT doc FROM edges ORDER BY edge_id", (), EdgeInfo)

    def save_edge(self, edge: EdgeInfo) -> None:
        self.db.execute(
            "INSERT INTO edges (edge_id, doc) VALUES (?, ?)"
            " ON CONFLICT(edge_id) DO UPDATE SET doc = excluded.doc",
            (edge.edge_id, self._encoder.encode(edge)),
        )

    # --------------------------------------------------------------- routes

    def route_epoch(self) -> int:
        return self.meta("route_epoch")

    def route(self, app: str) -> tuple[AppRoute, int] | None:
        """(route, epoch of its last compare-and-set)."""
        row = self.db.execute("SELECT doc, cas_epoch FROM routes WHERE app = ?", (app,)).fetchone()
        return None if row is None else (msgspec.json.decode(row[0], type=AppRoute), row[1])

    def routes(self) -> list[AppRoute]:
        return self._all("SELECT doc FROM routes ORDER BY app", (), AppRoute)

    def commit_route(self, route: AppRoute, cas: bool, history: int) -> RouteChange:
        """Give `route` the next epoch, store it and its change, trim old changes."""
        with self._transaction():
            epoch = self.route_epoch() + 1
            previous = self.route(route.app)
            # Only a compare-and-set (promotion) replaces a route; plain changes keep its epoch.
            cas_epoch = epoch if cas else (previous[1] if previous else 0)
            route = msgspec.structs.replace(route, epoch=epoch, promoted_epoch=cas_epoch)
            self.db.execute(
                "INSERT INTO routes (app, cas_epoch, doc) VALUES (?, ?, ?)"
                " ON CONFLICT(app) DO UPDATE SET cas_epoch = excluded.cas_epoch,"
                " doc = excluded.doc",
                (route.app, cas_epoch, self._encoder.encode(route)),
            )
            change = RouteChange(epoch=epoch, app=route.app, route=route)
            self.db.execute(
                "INSERT INTO route_changes (epoch, app, doc) VALUES (?, ?, ?)",
                (epoch, route.app, self._encoder.encode(change)),
            )
            self.db.execute(
                "INSERT INTO meta (key, value) VALUES ('route_epoch', ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (epoch,),
            )
            self.db.execute("DELETE FROM route_changes WHERE epoch <= ?", (epoch - history,))
        return change

    def oldest_retained_epoch(self) -> int | None:
        row = self.db.execute("SELECT MIN(epoch) FROM route_changes").fetchone()
        return row[0]

    def route_changes_after(self, epoch: int) -> list[RouteChange]:
        return self._all(
            "SELECT doc FROM route_changes WHERE epoch > ? ORDER BY epoch", (epoch,), RouteChange
        )


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error; re-entrant within one store."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.outer = False

    def __enter__(self) -> None:
        if not self.db.in_transaction:
            self.db.execute("BEGIN IMMEDIATE")
            self.outer = True

    def __exit__(self, kind: object, *_: object) -> None:
        if not self.outer:
            return
        self.db.execute("ROLLBACK" if kind is not None else "COMMIT")
