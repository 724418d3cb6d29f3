"""`lcq run-batch`: a file of OpenAI Batch API requests through the server's own endpoints, without a port.

Each input line is `{"custom_id", "method": "POST", "url", "body"}`, the OpenAI Batch API's (and vLLM's
run-batch) format; `url` is /v1/chat/completions, /v1/completions, /v1/responses or /v1/embeddings. The
whole file is checked before the model loads: a bad line is one error naming it, and nothing is written. Then every
request goes through the app `lcq serve` runs, called in-process (ASGI, no socket), as many at once as
the server's queue admits so that the engine batches them continuously. Each output line is
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}`, in input order;
a request the server refuses keeps its status and error envelope, as OpenAI's batch output does, but one
the engine's queue refuses (429) waits and is sent again, and one the app fails is a 500 line (the other
lines are kept). The output file is written under a temporary name beside it (a symlink's target) and renamed
once complete; `-o -` (or a path to stdout, a device or a FIFO) is written directly.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from lcq.errors import UserError
from lcq.inputs import check_output

from .errors import error_body

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings")
QUEUE_FULL_WAIT = 0.05  # seconds a request the engine's queue refused waits before it is sent again
logger = logging.getLogger("lcq.server")


@dataclass
class BatchRequest:
    custom_id: str
    url: str
    body: dict[str, Any]


def read_requests(path: Path) -> list[BatchRequest]:
    """Every request of a JSONL batch file, checked; UserError naming the first bad line."""
    if not path.is_file():
        raise UserError(f"{path}: no such batch file")
    try:
        text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")  # (a BOM, as Windows tools write)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    requests, seen = [], set()
    # lines end at "\n" only (and "\r\n"): str.splitlines also splits at U+2028, U+2029, U+0085..., which JSON
    # strings hold raw (json.dumps(ensure_ascii=False) writes them so), as vLLM's run-batch splits
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(item, dict):
            raise UserError(f"{where}: a request must be a JSON object")
        custom_id, method, url, body = (item.get(key) for key in ("custom_id", "method", "url", "body"))
        if not isinstance(custom_id, str) or not custom_id:
            raise UserError(f"{where}: custom_id must be a non-empty string")
        if custom_id in seen:
            raise UserError(f"{where}: custom_id {custom_id!r} is used twice")
        if method != "POST":
            raise UserError(f"{where}: method must be POST (got {method!r})")
        if url not in URLS:
            raise UserError(f"{where}: url must be one of {', '.join(URLS)} (got {url!r})")
        if not isinstance(body, dict):
            raise UserError(f"{where}: body must be a JSON object")
        seen.add(custom_id)
        requests.append(BatchRequest(custom_id, url, body))
    if not requests:
        raise UserError(f"{path}: no requests")
    return requests


async def call_app(app, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    """POST `body` to the ASGI `app` at `url`: (status, decoded JSON body)."""
    payload = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": url, "raw_path": url.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
             "client": ("run-batch", 0), "server": ("run-batch", 0)}
    sent, never = False, asyncio.Event()
    status, chunks = 500, []

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await never.wait()  # the client never disconnects
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, json.loads(b"".join(chunks) or b"null")


async def run_requests(app, requests: list[BatchRequest], concurrency: int,
                       on_done=lambda: None) -> list[dict[str, Any]]:
    """Every request through `app`, at most `concurrency` at once; the output lines in input order."""
    gate = asyncio.Semaphore(concurrency)

    async def answer(request: BatchRequest) -> tuple[int, Any]:
        """The request's status and body: waiting while the engine's queue is full (a batch answers every
        request), and a 500 line where the app fails (the others' answers are kept)."""
        while True:
            try:
                status, body = await call_app(app, request.url, request.body)
            except Exception as e:  # (Starlette answers it with a 500, then raises it on)
                logger.exception("batch request %s failed", request.custom_id)
                return 500, error_body(500, f"internal error: {type(e).__name__}")
            if status != 429:
                return status, body
            await asyncio.sleep(QUEUE_FULL_WAIT)

    async def one(request: BatchRequest) -> dict[str, Any]:
        refused = next((key for key in ("stream", "background") if _asks_for(request, key)), None)
        if refused:  # (a batch answers every request whole)
            status, body = 400, error_body(400, f"{refused} is not supported in a batch", param=refused)
        else:
            async with gate:
                status, body = await answer(request)
        on_done()
        request_id = body.get("id") if status == 200 and isinstance(body, dict) else None
        return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": request.custom_id,
                "response": {"status_code": status, "request_id": request_id or f"req_{uuid.uuid4().hex}",
                             "body": body}, "error": None}

    return await asyncio.gather(*(one(request) for request in requests))


def _asks_for(request: BatchRequest, key: str) -> bool:
    """Whether the request asks for `key` (stream, background) as the server reads it: through its endpoint's
    request model, so that "false" is false; a field the endpoint has not is ignored there, and a value its
    model refuses is left to the server's 400."""
    from pydantic import TypeAdapter, ValidationError

    from .protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
    from .responses_protocol import ResponsesRequest

    model = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
             "/v1/responses": ResponsesRequest, "/v1/embeddings": EmbeddingRequest}[request.url]
    field = model.model_fields.get(key)
    if field is None or key not in request.body:
        return False
    kind = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    try:
        return bool(TypeAdapter(kind).validate_python(request.body[key]))
    except ValidationError:
        return False


def output_target(given: str) -> Path | None:
    """Where `-o given` writes, checked before the model loads (UserError): None for "-" (stdout, and so is a
    path to the process's own stdout, as /dev/stdout); a device or FIFO as given (written directly); else the
    real path, a symlink's target (so that the link stays a link and its target gets the output)."""
    if given == "-":
        return None
    try:
        found = os.stat(given)  # (follows links, /proc's too: /dev/stdout to a pipe)
    except OSError:
        found = None
    if found is not None and not stat.S_ISDIR(found.st_mode):
        if _is_stdout(found):
            return None
        if not stat.S_ISREG(found.st_mode):
            if not os.access(given, os.W_OK):
                raise UserError(f"{given}: not writable")
            return Path(given)
    output = check_output(Path(os.path.realpath(given)), "output file")
    if not output.parent.is_dir():
        raise UserError(f"{output.parent}: no such folder for the output file")
    return output


def _is_stdout(found: os.stat_result) -> bool:
    try:
        own = os.fstat(1)
    except OSError:  # (no stdout)
        return False
    return (own.st_dev, own.st_ino) == (found.st_dev, found.st_ino)


def writes_a_file(target: Path | None) -> bool:
    """Whether the output goes to a regular file (not stdout, a pipe or a device)."""
    return target is not None and not (target.exists() and not target.is_file())


def write_lines(target: Path | None, lines: list[dict[str, Any]]) -> None:
    """The output JSONL (target: output_target's): a file is written under a temporary name beside it and renamed
    into place; stdout (None), a device or a FIFO is written directly. What cannot be written (the disk full, the
    folder gone since the check) is one line (UserError), the file there before left as it was."""
    if target is None:
        _write(sys.stdout, lines)
        sys.stdout.flush()
        return
    tmp = None
    try:
        if writes_a_file(target):  # a name of its own beside the target: no file of the user's is touched
            handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            tmp = Path(name)
            with os.fdopen(handle, "w") as f:
                _write(f, lines)
            os.chmod(tmp, 0o666 & ~_umask())  # as a file made by open() (mkstemp's are the owner's alone)
            os.replace(tmp, target)
        else:
            with open(target, "w") as f:
                _write(f, lines)
    except OSError as e:
        raise UserError(f"{target}: cannot be written ({e.strerror or e})") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write(f, lines: list[dict[str, Any]]) -> None:
    for line in lines:
        f.write(json.dumps(line) + "\n")
