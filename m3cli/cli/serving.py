"""`m3 serve`: the model and its bank behind the OpenAI-compatible HTTP API (m3cli/serve.py)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..default_model import resolve_bank, resolve_model
from ..errors import M3Error
from .common import BankOpt, DeviceOpt, DtypeOpt, EmbedderOpt, ModelOpt, check_batch, command, echo_json, user_errors

PANEL = "Answers"
CURL = (
    "curl -s --retry 60 --retry-connrefused --retry-delay 1 http://127.0.0.1:8321/v1/chat/completions "
    "-H 'Content-Type: application/json' "
    '-d \'{"messages": [{"role": "user", "content": "Who founded Northwind?"}], "max_tokens": 16}\' '
    "| jq -r '.choices[0].message.content, .m3.references[0].title'"
)


@command(
    panel=PANEL,
    examples=[
        "m3 serve --bank kb.m3bank --port 8321 > serve.log 2>&1 & echo $! > serve.pid",
        CURL,
        "curl -s http://127.0.0.1:8321/v1/models | jq -r '.data[0].id'",
        'kill "$(cat serve.pid)"',
    ],
)
@user_errors
def serve(
    model: ModelOpt = None,
    bank: BankOpt = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; 0.0.0.0 for every interface.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            "--api-key",
            envvar="M3_API_KEY",
            help="Refuse requests without `Authorization: Bearer KEY` (default: $M3_API_KEY; none: no key needed).",
        ),
    ] = None,
    model_id: Annotated[str, typer.Option("--model-id", help="The model name clients see in /v1/models.")] = "m3",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Requests decoded together at most.")] = 16,
    embedder: EmbedderOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print {url, model, bank, references} as JSON when it starts.")
    ] = False,
) -> None:
    """Serve the model with its bank over the OpenAI-compatible HTTP API.

    POST /v1/chat/completions and /v1/completions (with "stream": true, server-sent events), GET
    /v1/models and /health. Each answer carries an "m3" field with the references the model read;
    a request may set "mode" (memory, rag, none) and "memories". Concurrent requests are decoded
    together. Listens on 127.0.0.1 unless --host says otherwise.
    """
    import uvicorn

    from ..api import Bank, Model
    from ..serve import create_app

    check_batch(batch_size)
    if not 1 <= port <= 65535:
        raise M3Error("--port must be in 1..65535")
    bank = resolve_bank(bank)
    opened = Bank.open(bank, embedder=embedder, device=device) if bank is not None else None
    try:
        loaded = Model.load(resolve_model(model, bank), bank=opened, device=device, dtype=dtype)
        if opened is not None:
            loaded.generator(opened)  # the retriever and its embedder load now, not with the first request
        app = create_app(
            loaded, opened, api_key=api_key or None, model_id=model_id, max_batch=batch_size, engine_thread=False
        )
        url = f"http://{host}:{port}"
        info = {
            "url": url,
            "model": str(loaded.path),
            "bank": str(bank) if bank else None,
            "references": opened.references if opened is not None else 0,
        }
        if as_json:
            echo_json(info)
        else:
            typer.echo(
                f"m3: serving {loaded.path} with {bank or 'no bank'} on {url} (OpenAI API at {url}/v1)", err=True
            )
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
        server = uvicorn.Server(config)
        _serve_on_two_threads(server, app.state.engine)
        if not server.started:
            raise M3Error(f"could not listen on {host}:{port} (in use, or not an address of this machine?)")
    finally:
        if opened is not None:
            opened.close()


def _serve_on_two_threads(server, engine) -> None:
    """The HTTP server on a thread of its own, the decode loop on this (the main) thread, where
    torch's CPU kernels run fastest (`m3cli.serve.Engine`). SIGINT and SIGTERM shut the server
    down gracefully, as uvicorn does on its main thread, and are raised again once it is down."""
    import signal
    import threading

    failed: list[BaseException] = []
    caught: list[int] = []

    def listen() -> None:
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot bind
            server.started = False
        except BaseException as e:  # noqa: BLE001 — reported on the main thread below
            failed.append(e)
        finally:
            engine.close()  # the decode loop ends with the server

    def on_signal(sig, frame) -> None:
        caught.append(sig)
        server.handle_exit(sig, frame)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    listener = threading.Thread(target=listen, name="m3-http", daemon=True)
    listener.start()
    try:
        engine.run()
    finally:
        server.should_exit = True
        listener.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        raise failed[0]
    for sig in reversed(caught):  # as uvicorn: the default action of the signal, now that all is closed
        signal.raise_signal(sig)
