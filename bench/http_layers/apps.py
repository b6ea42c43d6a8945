"""The HTTP layers weighed by ``bench/http_layers/run.sh``, each answering the bench's chat POST
with the same fixed JSON, with no upstream: what the layer alone costs per request.

- ``raw``: an httptools protocol on uvloop that writes a prepared answer (the floor of a layer);
- ``front``: llm-proxy's front door (``FrontSite``: strict framing policy, timers, the serving task,
  the response writer) with a handler that reads the body and answers;
- ``asgi_app`` for uvicorn (its httptools protocol) and granian's ASGI interface;
- ``rsgi_app`` for granian's own interface.

  python apps.py raw|front PORT
"""

import asyncio
import sys

BODY = (
    b'{"id":"chatcmpl-bench","object":"chat.completion",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello"}}]}'
)
LENGTH = b"%d" % len(BODY)


async def asgi_app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", LENGTH)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


async def rsgi_app(scope, protocol):
    await protocol()
    protocol.response_bytes(200, [("content-type", "application/json")], BODY)


async def raw(port):
    import httptools

    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %s\r\n\r\n%s"
    answer %= (LENGTH, BODY)

    class Raw(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.parser = transport, httptools.HttpRequestParser(self)

        def data_received(self, data):
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.transport.close()

        def on_message_complete(self):
            self.transport.write(answer)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Raw, "127.0.0.1", port, backlog=4096)
    await server.serve_forever()


async def front(port):
    from aiohttp import web

    from llm_proxy.http.front import FrontSite, listening_socket
    from llm_proxy.http.messages import RenderedFields

    class Fixed:
        async def serve(self, request, writer):
            if request.content_length:
                await request.body.read_exactly(request.content_length)
            await writer.respond(200, b"", RenderedFields.of_json([], BODY), BODY)

    runner = web.AppRunner(web.Application())
    await runner.setup()
    sock = listening_socket("127.0.0.1", port, reuse_port=False)
    await FrontSite(runner, sock, Fixed()).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    import uvloop

    uvloop.run({"raw": raw, "front": front}[sys.argv[1]](int(sys.argv[2])))
