"""Checks that run before any route: API key, body size, the per-status response counter (500s
from unhandled exceptions too), and the request id every response carries in X-Request-Id.

Plain ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched and a client that
disconnects still reaches the route's disconnect handling.
"""
from __future__ import annotations

import hmac
import json
import uuid

from .errors import REQUEST_ID_HEADER, APIError, tgi_error
from .metrics import ServerMetrics

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
TGI_PATHS = ("/", "/generate", "/generate_stream", "/info")  # TGI's routes, whose errors take its shape
PROTECTED_PATHS = (*TGI_PATHS, "/invocations")
# Probes and scrapes, left out of lcq:http_requests_total as vLLM leaves them out of its: a loading or
# draining server's 503s to health checks are no client's errors.
UNCOUNTED_PATHS = ("/health", "/ping", "/metrics", "/version")
ASK_NEXT_REPLICA_HEADER = "x-lcq-ask-next-replica"  # set by a balancer that asks another replica on a 404
REQUEST_ID_KEY = REQUEST_ID_HEADER.lower().encode()  # as ASGI spells header names
MAX_REQUEST_ID_LENGTH = 128


def route_path(scope) -> str:
    """The path the routes are matched on: the request's without the server's root path (`--root-path`), which
    uvicorn puts in front of it, as Starlette's router takes it off."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("/", ""):
        return path[len(root):]
    return path


def request_id_of(headers: dict[bytes, bytes]) -> str:
    """The client's X-Request-Id (vLLM's base of a response id), so that its logs and ours name a request
    alike; a fresh id where it sent none, or one unfit to go into ids, headers and logs as it is (anything
    but 1 to 128 printable ASCII characters without spaces)."""
    given = headers.get(REQUEST_ID_KEY, b"")
    if 0 < len(given) <= MAX_REQUEST_ID_LENGTH and all(0x21 <= byte <= 0x7E for byte in given):
        return given.decode("ascii")
    return uuid.uuid4().hex


class GuardMiddleware:
    def __init__(self, app, metrics: ServerMetrics, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.metrics = metrics
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        path = route_path(scope)
        counted = path not in UNCOUNTED_PATHS
        started = False
        headers = dict(scope.get("headers") or [])
        balanced = ASK_NEXT_REPLICA_HEADER.encode() in headers  # (its 404s hand the request on: not answers)
        state = scope.setdefault("state", {})  # request.state to the routes (in place: the 500 handler, outside this
        # layer, reads the same scope)
        state["request_id"] = request_id_of(headers)
        # whether the client named it (else a body's request_id may: state.request_id_of)
        state["request_id_sent"] = headers.get(REQUEST_ID_KEY) == state["request_id"].encode()

        async def guarded_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if counted and not (balanced and message["status"] == 404):
                    self.metrics.http_response(message["status"])
                named = (REQUEST_ID_KEY, state["request_id"].encode())
                message = {**message, "headers": [*message.get("headers", []), named]}
            await send(message)

        error = self._auth_error(path, headers)
        if error is None:
            receive, error = await self._limited_body(headers, receive)
        if error is not None:
            return await self._reply(error, guarded_send, tgi=path in TGI_PATHS)
        try:
            await self.app(scope, receive, guarded_send)
        except Exception:  # answered by Starlette's outermost layer, outside this one: a 500 counted here
            if counted and not started:
                self.metrics.http_response(500)
            raise

    def _auth_error(self, path: str, headers: dict[bytes, bytes]) -> APIError | None:
        if self.api_key is None or not (path.startswith(PROTECTED_PREFIXES) or path in PROTECTED_PATHS):
            return None
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key):
            return None
        return APIError(401, "invalid or missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"})

    async def _limited_body(self, headers: dict[bytes, bytes], receive):
        """Read the whole body up front (refusing it past the limit), then replay it to the route.

        After the replay, receive() goes back to the server's own, so disconnects are still seen.
        """
        too_large = APIError(413, f"request body is larger than {self.max_body_bytes} bytes",
                             code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return receive, too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body: counted as a 499, as a
                # non-streamed request it leaves is (the route counted a 400, its body not JSON)
                return receive, APIError(499, "the client closed the connection", code="client_closed_request")
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return receive, too_large
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        return replay, None

    @staticmethod
    async def _reply(error: APIError, send, tgi: bool = False) -> None:
        """The error of a check before any route, in the shape of the API of the path it came to (tgi: TGI's)."""
        status, body = tgi_error(error) if tgi else (error.status, error.body())
        body = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
