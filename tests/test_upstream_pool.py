"""The upstream pool's wait line as plain data: no sockets are opened here."""

from __future__ import annotations

from edge.upstream.pool import UpstreamConnection, UpstreamPeer


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
