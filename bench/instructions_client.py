"""Send N chat requests over C keep-alive connections, as wrk_post.lua does, and check each answer.

Used by instructions_per_request.sh, which needs an exact request count (wrk runs for a time).

  python bench/instructions_client.py PORT TOKEN N C
"""

from __future__ import annotations

import asyncio
import sys

BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'


async def _connection(port: int, request: bytes, count: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(count):
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            raise SystemExit(f"unexpected answer: {head[:80]!r}")
        length = int(head.lower().split(b"\r\ncontent-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    writer.close()


async def main(port: int, token: str, total: int, connections: int) -> None:
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    ) % (port, token.encode(), len(BODY), BODY)
    await asyncio.gather(
        *(_connection(port, request, total // connections) for _ in range(connections))
    )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
