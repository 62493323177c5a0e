"""A minimal app for fleet tests: stdlib only, starts in milliseconds, answers 200 to anything.

    python bench/apps/tiny_app.py --port 9001 --name a-123 [--start-delay 0.5]

Every response carries X-Allocation-Id; binds 127.0.0.1 only. With --start-delay
the port is bound only after the delay (an app with a start time, cheaply: fleet
benchmarks run hundreds of these).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default=os.environ.get("ALLOCATION_ID", "tiny"))
    parser.add_argument("--start-delay", type=float, default=0.0)
    args = parser.parse_args()
    body = f"tiny {args.name}\n".encode()
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Allocation-Id: %s\r\n\r\n%s" % (
        len(body),
        args.name.encode(),
        body,
    )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                writer.write(response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if args.start_delay > 0:
        try:
            await asyncio.wait_for(stop.wait(), args.start_delay)
            return
        except TimeoutError:
            pass
    server = await asyncio.start_server(handle, "127.0.0.1", args.port)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
