"""The upstream pool's wait line as plain data: no sockets are opened here."""

from __future__ import annotations

from edge.upstream.pool import HEAD_TOO_LARGE, UpstreamConnection, UpstreamPeer


def test_a_waiter_that_gave_up_leaves_the_line() -> None:
    """A request that timed out (or whose client left) while waiting for a connection is
    removed from the peer's line at once, not kept until a connection frees."""
    peer = UpstreamPeer("127.0.0.1", 1, max_idle=4, max_conns=1)
    assert peer.reserve()
    served: list[str] = []

    def waiter(name: str):
        def ready(conn: UpstreamConnection | None) -> bool:
            served.append(name)
            return True

        return ready

    gave_up, patient = waiter("gave-up"), waiter("patient")
    peer.wait(gave_up)
    peer.wait(patient)
    peer.unwait(gave_up)
    peer.unwait(gave_up)  # twice is harmless
    assert list(peer.waiters) == [patient]
    peer.release()  # the one connection closes: its room goes to the next in line
    assert served == ["patient"] and not peer.waiters


def test_a_burst_opens_connections_a_few_at_a_time() -> None:
    """With max_connecting 2, a burst of 6 at a peer with no idle connection opens 2; each
    connect that ends (made or failed) lets the next in line open one, up to max_conns;
    a request given an idle connection meanwhile opens none."""
    peer = UpstreamPeer("127.0.0.1", 1, max_idle=4, max_conns=4, max_connecting=2)
    rooms: list[str] = []

    def waiter(name: str):
        def ready(conn: UpstreamConnection | None) -> bool:
            rooms.append(name if conn is None else f"{name}:idle")
            return True

        return ready

    assert peer.reserve() and peer.reserve()
    assert not peer.reserve(), "a third connect while two are being opened"
    for name in "abcd":
        peer.wait(waiter(name))
    assert (peer.open, peer.connecting) == (2, 2)
    peer.connected()  # the first connect is made: room for one more connect
    assert rooms == ["a"] and (peer.open, peer.connecting) == (3, 2)
    peer.connected()  # the second fails: its connect slot goes to the next...
    peer.release()  # ...and its connection's room stays free: two are being opened
    assert rooms == ["a", "b"] and (peer.open, peer.connecting) == (3, 2)
    peer.connected()
    assert rooms == ["a", "b", "c"] and (peer.open, peer.connecting) == (4, 2)
    peer.connected()
    peer.connected()
    assert rooms == ["a", "b", "c"], "past max_conns"
    assert (peer.open, peer.connecting, len(peer.waiters)) == (4, 0, 1)
    peer.release()  # a connection closes: room for the last one
    assert rooms == ["a", "b", "c", "d"] and (peer.open, peer.connecting) == (4, 1)


class Owner:
    """Records what a connection reports (the UpstreamOwner callbacks used here)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def upstream_head(self, conn, status, reason, headers) -> None:
        self.events.append(("head", status))

    def upstream_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def upstream_end(self, conn) -> None:
        self.events.append(("end",))

    def upstream_lost(self, conn, error: str) -> None:
        self.events.append(("lost", error))

    def upstream_flush(self) -> None:
        pass


class Transport:
    def abort(self) -> None:
        self.aborted = True


def connection(max_head: int) -> tuple[UpstreamConnection, Owner]:
    peer = UpstreamPeer("127.0.0.1", 1, max_idle=4)
    conn = UpstreamConnection(peer, max_head)
    conn.transport = Transport()  # type: ignore[assignment]
    owner = Owner()
    conn.owner = owner  # type: ignore[assignment]
    return conn, owner


def test_a_response_head_over_the_bound_is_lost_as_too_large() -> None:
    conn, owner = connection(1024)
    conn.data_received(
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 2000 + b"\r\nContent-Length: 0\r\n\r\n"
    )
    assert owner.events == [("lost", HEAD_TOO_LARGE)]


def test_an_unfinished_response_head_is_bounded_across_reads() -> None:
    conn, owner = connection(1024)
    conn.data_received(b"HTTP/1.1 200 OK\r\nX-Big: ")
    for _ in range(3):
        if owner.events:
            break
        conn.data_received(b"b" * 800)
    assert owner.events == [("lost", HEAD_TOO_LARGE)]


def test_a_response_head_within_the_bound_passes() -> None:
    conn, owner = connection(1024)
    conn.data_received(
        b"HTTP/1.1 200 OK\r\nX-Ok: " + b"o" * 900 + b"\r\nContent-Length: 2\r\n\r\nok"
    )
    assert owner.events == [("head", 200), ("body", b"ok"), ("end",)]
