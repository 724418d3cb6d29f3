"""`lcq serve`: one engine, one uvicorn server, graceful drain on SIGTERM / Ctrl-C."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lcq.errors import UserError

from .settings import add_serve_arguments, resolve

logger = logging.getLogger("lcq.server")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description="Serve an LCQ (or fp16) model over an OpenAI-compatible HTTP API. "
                                          "Every flag can also be set as an environment variable LCQ_<FLAG>.")
    add_serve_arguments(p)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from lcq.runtime import AsyncEngine, EngineConfig

    from .app import create_app
    from .runner import DrainingServer

    command = resolve(args)
    settings = command.settings
    level = "DEBUG" if settings.log_level == "trace" else settings.log_level.upper()
    logging.basicConfig(level=level, format="%(levelname)s:     %(name)s: %(message)s")
    engine_fields = dict(command.engine_fields)
    if command.model is None:
        from lcq.quantizer.demo import DEMO_SERVED_NAME, ensure_demo_model

        model = str(ensure_demo_model())
        engine_fields.setdefault("served_model_name", DEMO_SERVED_NAME)
    elif not Path(command.model).is_dir():
        raise UserError(f"{command.model}: no such model folder")
    else:
        model = command.model
    try:
        engine = AsyncEngine(EngineConfig(model=model, **engine_fields))
    except ValueError as e:
        raise UserError(str(e)) from None

    app = create_app(engine, settings, on_fatal=lambda: server.fail())
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=int(settings.drain_timeout) + 5)
    server = DrainingServer(config, app.state.lifecycle)
    server.run()
    if server.failed:
        raise UserError("the model failed to load (see the log above)")
    return 0
