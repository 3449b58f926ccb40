"""The only door hospitals see: a TLS gateway that passes Flower's Fleet API to the SuperLink and nothing else.

In open-source Flower 1.42 one HTTP server of the SuperLink serves the Fleet API (SuperNodes), the Control
API (``flwr run``, ``flwr supernode register``: submit code, register node keys, read results) and the Runtime
API, and the Control API has no login (OIDC is enterprise-only). So the SuperLink listens on loopback only and
this gateway listens where hospitals connect. It forwards exactly the Fleet API's routes (read from Flower's own
Fleet router, so a Flower upgrade cannot widen it silently) and ``/health``, with the request's headers (the
SuperNode's signature) and body, to the SuperLink over TLS verified against the study CA; every other path is
answered ``403`` without reaching the SuperLink. The operator runs ``flwr`` on the SuperLink's host (loopback).

    python -m deploy.gateway --listen 0.0.0.0:8000 --upstream 127.0.0.1:9092 \
        --ssl-certfile superlink.crt --ssl-keyfile superlink.key --ca-certfile ca.crt
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

log = logging.getLogger("fedbiopsy.gateway")
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
REFUSAL = ("this port serves only the Flower Fleet API (SuperNodes); the Control API is reachable on the "
           "coordinating centre's own host")
_HOP_BY_HOP = {b"host", b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
               b"te", b"trailer", b"content-length"}
_CLIENT_CLAIMS = {b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"forwarded", b"x-real-ip"}
MAX_BODY_BYTES = 32 * 1024 * 1024  # one Fleet request at most (Flower's objects are <= 5 MB chunks, a FAB <= 10 MB)
BODY_TIMEOUT_S = 60.0  # a request body must arrive within this (no slow trickle holds a worker)


def fleet_routes() -> frozenset[tuple[str, str]]:
    """(method, path) of every route of Flower's Fleet API, and the health check."""
    from flwr.superlink.routers.fleet.router import router

    routes = {(method, str(getattr(route, "path", ""))) for route in router.routes
              for method in getattr(route, "methods", ())}
    return frozenset(routes | {("GET", "/health"), ("HEAD", "/health")})


class FleetGateway:
    """An ASGI app forwarding the allowed routes to ``upstream`` (``https://host:port``); 403 for the rest."""

    def __init__(self, upstream: str, ca_certfile: Path | None = None, timeout_s: float = 120.0,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.upstream = upstream.rstrip("/")
        self.max_body_bytes = max_body_bytes
        self.allowed = fleet_routes()
        self.verify: ssl.SSLContext | bool = (ssl.create_default_context(cafile=str(ca_certfile)) if ca_certfile
                                              else True)
        self.timeout_s = timeout_s
        self.client: httpx.AsyncClient | None = None

    def permits(self, method: str, path: str) -> bool:
        """Whether ``method path`` is a Fleet API route (exact match: no prefix, no dot segments, no query)."""
        return (method, path) in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        path = scope.get("path", "")
        if not self.permits(request.method, path) or scope.get("query_string"):
            log.warning("refused %s %r from %s", request.method, path[:200], request.client)
            await PlainTextResponse(REFUSAL, status_code=403)(scope, receive, send)
            return
        try:
            body = await asyncio.wait_for(self._body(request), BODY_TIMEOUT_S)
        except TimeoutError:
            body = None
        if body is None:
            await PlainTextResponse("request body too large or too slow", status_code=413)(scope, receive, send)
            return
        if self.client is None:
            self.client = httpx.AsyncClient(base_url=self.upstream, verify=self.verify, timeout=self.timeout_s)
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in _HOP_BY_HOP | _CLIENT_CLAIMS]
        if request.client is not None:  # who connected, as the gateway saw it (never what the client claims)
            headers.append((b"x-forwarded-for", request.client.host.encode()))
        try:
            upstream = await self.client.request(request.method, path, headers=headers, content=body)
        except httpx.HTTPError as exc:
            log.error("the SuperLink did not answer %s: %s", path, type(exc).__name__)
            await PlainTextResponse("the SuperLink is not reachable", status_code=502)(scope, receive, send)
            return
        kept = {k: v for k, v in upstream.headers.items() if k.lower().encode() not in _HOP_BY_HOP
                and k.lower() != "content-encoding"}
        await Response(upstream.content, status_code=upstream.status_code, headers=kept)(scope, receive, send)

    async def _body(self, request: Request) -> bytes | None:
        """The request body, or None once it passes :attr:`max_body_bytes` (declared or streamed)."""
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m deploy.gateway``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="0.0.0.0:8000", help="host:port hospitals connect to")
    parser.add_argument("--upstream", required=True, help="the SuperLink's loopback host:port")
    parser.add_argument("--ssl-certfile", type=Path, help="certificate hospitals see (the SuperLink's)")
    parser.add_argument("--ssl-keyfile", type=Path, help="its private key")
    parser.add_argument("--ca-certfile", type=Path, help="study CA, to verify the SuperLink")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP on both sides (never for real data)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """``python -m deploy.gateway``: serve the Fleet API of a loopback SuperLink on a public address."""
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, _, port = args.listen.rpartition(":")
    scheme = "http" if args.insecure else "https"
    app = FleetGateway(f"{scheme}://{args.upstream}", None if args.insecure else args.ca_certfile)
    log.info("gateway %s -> %s: %d Fleet API routes", args.listen, app.upstream, len(app.allowed))
    uvicorn.run(app, host=host, port=int(port), access_log=False, log_level="warning", limit_concurrency=512,
                ssl_certfile=None if args.insecure else str(args.ssl_certfile),
                ssl_keyfile=None if args.insecure else str(args.ssl_keyfile))


if __name__ == "__main__":
    main()
