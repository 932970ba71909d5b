"""`vas serve`: VAS behind an OpenAI-compatible HTTP server (FastAPI + uvicorn).

/v1/models and /v1/completions (streaming too) in the OpenAI protocol; the request logic is
models.serving. Each request runs in a worker thread (anyio.to_thread, at most WORKER_THREADS at
once), so the event loop keeps accepting and answering requests meanwhile. With the local base
model the worker threads hand their rows to the Engine's scheduler, which decodes every request in
flight in one running batch (continuous batching, models/scheduler.py). With an upstream base
model, one asyncio.Lock serializes the decodes (one request at a time, in arrival order). A
streamed request's chunks leave as the tokens are drawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from models.serving import Engine, ServingError

log = logging.getLogger(__name__)

WORKER_THREADS = 256      # requests being prepared, decoded or scored at once (each waits on the batch)


def error(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
    return JSONResponse(ServingError(message, param, code, status, kind).body(), status_code=status)


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="VAS", description="Value Augmented Sampling, OpenAI-compatible completions")
    # One decode at a time only where nothing batches them: an upstream base model.
    lock = asyncio.Lock() if engine.scheduler is None else contextlib.nullcontext()
    limiter = anyio.CapacityLimiter(WORKER_THREADS)

    def in_thread(fn, *args):
        return anyio.to_thread.run_sync(fn, *args, limiter=limiter)
    running: set[asyncio.Task] = set()     # streaming decodes in flight (a task needs a reference)

    @app.exception_handler(ServingError)
    async def bad_request(_, err: ServingError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, err: HTTPException):
        return error(err.status_code, str(err.detail), code=str(err.status_code))

    @app.exception_handler(RequestValidationError)
    async def invalid(_, err: RequestValidationError):
        return error(400, f"invalid request: {err.errors()}")

    @app.exception_handler(Exception)
    async def crash(_, err: Exception):
        # Logged here with its traceback; the client gets a message, never the traceback.
        log.exception("request failed")
        return error(500, f"internal error: {type(err).__name__}", kind="server_error")

    @app.get("/v1/models")
    async def models():
        return engine.models_body()

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as err:
            raise ServingError(f"the request body is not valid JSON: {err}") from None
        if not (isinstance(body, dict) and body.get("stream")):
            async with lock:
                return await in_thread(engine.handle, body)
        return await streamed(body)

    async def streamed(body) -> StreamingResponse:
        """Server-sent events as the decode draws tokens. The lock is taken here and released by the
        decode task when it ends, whether or not the client is still reading."""
        await lock.__aenter__()
        try:
            req = await in_thread(engine.prepare, body)   # a bad request: 4xx, not a stream
        except BaseException:
            await lock.__aexit__(None, None, None)
            raise
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def emit(chunk) -> None:       # called from the worker thread
            loop.call_soon_threadsafe(queue.put_nowait, chunk)

        async def decode():
            try:
                await in_thread(engine.stream, req, emit)
            except Exception as err:
                log.exception("streamed request failed")
                emit(ServingError(f"internal error: {type(err).__name__}", status=500, kind="server_error").body())
            finally:
                emit(None)
                await lock.__aexit__(None, None, None)

        task = asyncio.create_task(decode())
        running.add(task)
        task.add_done_callback(running.discard)

        async def events():
            while (chunk := await queue.get()) is not None:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def serve(data_dir, host: str = "127.0.0.1", port: int = 8000, device: str = "auto", model_id: str = "vas",
          upstream=None, max_batch_rows: int | None = None, max_batch_tokens: int | None = None) -> None:
    """upstream: a models.upstream.UpstreamConfig to steer a base model behind an OpenAI-compatible API.
    max_batch_rows, max_batch_tokens: the running batch's bounds (models.scheduler)."""
    import uvicorn

    engine = Engine(data_dir, device=device, model_id=model_id, upstream=upstream, max_batch_rows=max_batch_rows,
                    max_batch_tokens=max_batch_tokens)
    base = f"upstream {upstream.base_url} ({upstream.model})" if upstream else "the local base model"
    log.info(f"serving {model_id} from {data_dir} with {base} (value models {engine.values.version}) "
             f"on http://{host}:{port}/v1")
    try:
        uvicorn.run(create_app(engine), host=host, port=port)
    finally:
        engine.close()


@contextlib.contextmanager
def background_server(engine: Engine, host: str = "127.0.0.1", start_timeout: float = 30.0):
    """The app on a free port of `host`, served by uvicorn in a daemon thread; yields the /v1 base
    URL and stops the server on exit (tests and bench/serve.py drive it with the openai client)."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
