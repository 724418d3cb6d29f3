"""`lcq serve`: one engine, one uvicorn server, graceful drain on SIGTERM / Ctrl-C; `lcq run-batch`: a file
of OpenAI Batch API requests through the same app (batch.py)."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lcq.errors import UserError
from lcq.format import CheckpointReader

from .log_format import configure_logging, uvicorn_log_config
from .settings import ServeCommand, add_serve_arguments, in_flag_terms, resolve

if TYPE_CHECKING:
    from lcq.runtime import AsyncEngine

logger = logging.getLogger("lcq.server")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description="Serve an LCQ (or fp16) model over an OpenAI-compatible HTTP API. "
                                          "Every flag can also be set as an environment variable LCQ_<FLAG>.")
    add_serve_arguments(p)
    p.set_defaults(func=_serve)
    p = subparsers.add_parser("run-batch", help="run a file of OpenAI Batch API requests offline",
                              description="Run every request of a JSONL file in the OpenAI Batch API format "
                                          "(/v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings) "
                                          "through the "
                                          "server's endpoints in-process, and write their responses as JSONL. "
                                          "Takes the flags of `lcq serve` (host, port and API key unused).")
    p.add_argument("-i", "--input-file", required=True, help="JSONL of {custom_id, method, url, body}")
    p.add_argument("-o", "--output-file", required=True,
                   help="JSONL of {id, custom_id, response, error}; - for stdout")
    add_serve_arguments(p)
    p.set_defaults(func=_run_batch)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from .app import create_app
    from .runner import DrainingServer

    command = resolve(args)
    settings = command.settings
    _check_address(settings.host, settings.port)  # before minutes of loading, not after
    engine = _engine(command)
    app = create_app(engine, settings, on_fatal=lambda: server.fail())
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            log_config=uvicorn_log_config(settings.log_level, settings.json_output) or LOGGING_CONFIG,
                            timeout_graceful_shutdown=int(settings.drain_timeout) + 5, root_path=settings.root_path,
                            ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile,
                            ssl_ca_certs=settings.ssl_ca_certs, access_log=not settings.disable_uvicorn_access_log)
    server = DrainingServer(config, app.state.lifecycle)
    server.run()
    if engine.still_loading:  # stopped while loading (SIGTERM): Python would wait for the load's thread at exit
        logger.info("stopped while the model was loading: exiting without waiting for the load")
        logging.shutdown()
        os._exit(0)
    if server.failed:
        raise UserError(in_flag_terms(app.state.lifecycle.load_error or "the model failed to load (see the log above)"))
    return 0


def _run_batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .app import create_app
    from .batch import output_target, read_requests, run_requests, write_lines, writes_a_file

    requests = read_requests(Path(args.input_file))
    output = output_target(args.output_file)
    command = resolve(args)
    settings = dataclasses.replace(command.settings, api_key=None)  # in-process calls carry no key
    failed, engine = [], _engine(command)
    app = create_app(engine, settings, on_fatal=lambda: failed.append(True))
    in_flight = engine.config.max_num_seqs + engine.config.max_queue  # sent at once (one the queue refuses waits)

    async def run() -> list[dict]:
        async with app.router.lifespan_context(app):
            await app.state.lifecycle.loaded()
            if failed:
                raise UserError(app.state.lifecycle.load_error or "the model failed to load (see the log above)")
            with tqdm(total=len(requests), desc="requests", unit="req") as bar:
                return await run_requests(app, requests, in_flight, lambda: bar.update())

    lines = asyncio.run(run())
    write_lines(output, lines)
    answered = sum(line["response"]["status_code"] == 200 for line in lines)
    where = args.output_file if output is not None else "stdout"
    print(f"{len(lines)} requests: {answered} answered, {len(lines) - answered} refused; wrote {where}",
          file=sys.stdout if writes_a_file(output) else sys.stderr)  # (not into JSONL on stdout or a pipe)
    return 0


def _check_address(host: str, port: int) -> None:
    """UserError where the server could not listen on host:port (taken, or no such address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _engine(command: ServeCommand) -> "AsyncEngine":
    """The engine a resolved command asks for (the demo model where it names none), logging set up."""
    from lcq.runtime import AsyncEngine, EngineConfig

    configure_logging(command.settings.log_level, command.settings.json_output)
    engine_fields = dict(command.engine_fields)
    if command.model is None:
        from lcq.quantizer.demo import DEMO_SERVED_NAME, ensure_demo_model

        model = str(ensure_demo_model())
        engine_fields.setdefault("served_model_name", DEMO_SERVED_NAME)
    else:
        model = command.model  # a folder, or a Hub id the engine's settings fetch
    try:
        engine = AsyncEngine(EngineConfig(model=model, **engine_fields))
        engine.config.check_model()  # an unservable architecture or context: one line, before the server starts
    except (ValueError, UserError) as e:
        raise UserError(in_flag_terms(str(e))) from None
    CheckpointReader(engine.config.model)  # config and tensors readable (FormatError: one line), before the load
    return engine
