"""Streamed chat requests for bench/cpu_per_chunk.sh: prints how many SSE events arrived in all.

Each stream must bring ``--expect`` content chunks and ``[DONE]``; a short one ends the run with an
error, so a figure per chunk is never computed over streams that broke.
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp


async def _stream(session: aiohttp.ClientSession, url: str, token: str, expect: int) -> int:
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    events = 0
    done = False
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {token}"}) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if line.startswith(b"data: "):
                events += 1
                done = line.strip() == b"data: [DONE]"
    if not done or events < expect:
        raise SystemExit(f"a stream ended early: {events} events, [DONE] {done}")
    return events


async def _main(args: argparse.Namespace) -> None:
    limit = asyncio.Semaphore(args.concurrency)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            async with limit:
                return await _stream(session, args.url, args.token, args.expect)

        counts = await asyncio.gather(*(one() for _ in range(args.streams)))
    print(sum(counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--streams", type=int, default=320)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--expect", type=int, default=200, help="content chunks per stream")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
