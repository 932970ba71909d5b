"""`vas serve`: VAS behind an OpenAI-compatible HTTP server (FastAPI + uvicorn).

/v1/models, /v1/completions and /v1/chat/completions (streaming too) in the OpenAI protocol; the
request logic is models.serving.serving and models.serving.openai_protocol. Each request runs in a worker thread
(anyio.to_thread, at most WORKER_THREADS at once), so the event loop keeps accepting and answering
requests meanwhile. With the local base model the worker threads hand their rows to the Engine's
scheduler, which decodes every request in flight in one running batch (continuous batching,
models/serving/scheduler.py). With an upstream base model each request decodes in its thread, its upstream
calls beside every other request's (black-box VAS, models/decoding/blackbox.py). A streamed request's
chunks leave as the tokens are drawn.

The operational surface follows the servers people run instead (orchestration/serve_ops.py):
/health (503 while loading, then 200; no key needed), /metrics (Prometheus), --api-key (Bearer
on /v1/*, 401 otherwise), a bounded queue (--max-queued: 429 with Retry-After past it), a
per-request timeout (408), X-Request-Id, and on SIGTERM a graceful drain (uvicorn stops accepting
and lets the requests in flight finish within --shutdown-timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from typing import Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from models.serving.serving import Engine, ServingError
from orchestration.serve_ops import RETRY_AFTER_S, ServeOptions, ServerMetrics, request_gate

log = logging.getLogger(__name__)

WORKER_THREADS = 256      # requests being prepared, decoded or scored at once (each waits on the batch)


def error(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None,
          headers: dict | None = None) -> JSONResponse:
    return JSONResponse(ServingError(message, param, code, status, kind).body(), status_code=status, headers=headers)


def create_app(engine: Engine | Callable[[], Engine], options: ServeOptions | None = None) -> FastAPI:
    """engine: a loaded Engine, or a function that loads one; then the app starts at once, /health
    answers 503 and /v1/* 503 until the engine is ready (it loads in a thread)."""
    options = options or ServeOptions()
    loads = not isinstance(engine, Engine)       # then the app owns the engine, and closes it
    state = {"engine": None if loads else engine, "failed": None}
    metrics = ServerMetrics(lambda: state["engine"])
    running: set[asyncio.Task] = set()     # streaming decodes in flight (a task needs a reference)
    limiter = anyio.CapacityLimiter(WORKER_THREADS)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        loading = None
        if loads:
            def load():
                try:
                    state["engine"] = engine()
                except Exception as err:       # /health says so; the log has the traceback
                    log.exception("loading the engine failed")
                    state["failed"] = f"{type(err).__name__}: {err}"
            loading = threading.Thread(target=load, name="vas-load", daemon=True)
            loading.start()
        yield
        if loading is not None:
            loading.join()
            if state["engine"] is not None:
                state["engine"].close()

    app = FastAPI(title="VAS", description="Value Augmented Sampling, OpenAI-compatible completions",
                  lifespan=lifespan)
    app.add_middleware(request_gate(options.api_key, metrics))
    def in_thread(fn, *args):
        return anyio.to_thread.run_sync(fn, *args, limiter=limiter)

    def ready() -> Engine:
        if state["engine"] is None:
            why = f"the model failed to load ({state['failed']})" if state["failed"] else "the model is loading"
            raise ServingError(why, code="model_not_ready", status=503, kind="unavailable_error")
        return state["engine"]

    @app.exception_handler(ServingError)
    async def bad_request(_, err: ServingError):
        metrics.rejected(err.code or str(err.status))
        headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status in (429, 503) else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

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

    @app.get("/health")
    async def health():
        if state["engine"] is None:
            message = f"Failed to load the model: {state['failed']}" if state["failed"] else "Loading model"
            return error(503, message, kind="unavailable_error", code="model_not_ready")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return ready().models_body()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, chat=True)

    async def answer(request: Request, chat: bool):
        eng = ready()
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as err:
            raise ServingError(f"the request body is not valid JSON: {err}") from None
        if isinstance(body, dict) and body.get("stream"):
            return await streamed(eng, body, chat)
        with metrics.admitted(options.max_queued):
            try:
                response = await in_thread(eng.handle, body, chat, options.request_timeout)
            except TimeoutError as err:
                raise timed_out(err) from None
        metrics.finished(response, chat)
        return response

    def timed_out(err: TimeoutError) -> ServingError:
        return ServingError(str(err), code="request_timeout", status=408, kind="timeout_error")

    async def streamed(eng: Engine, body, chat: bool) -> StreamingResponse:
        """Server-sent events as the decode draws tokens. The request counts as in flight until the
        decode task ends, whether or not the client still reads."""
        gate = metrics.admitted(options.max_queued)
        gate.__enter__()
        try:
            req = await in_thread(eng.prepare, body, chat)   # a bad request: 4xx, not a stream
        except BaseException:
            gate.__exit__(None, None, None)
            raise
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def emit(chunk) -> None:       # called from the worker and scheduler threads
            loop.call_soon_threadsafe(queue.put_nowait, chunk)

        async def decode():
            try:
                metrics.finished(await in_thread(eng.stream, req, emit, options.request_timeout), chat)
            except TimeoutError as err:
                emit(timed_out(err).body())
            except Exception as err:
                log.exception("streamed request failed")
                emit(ServingError(f"internal error: {type(err).__name__}", status=500, kind="server_error").body())
            finally:
                emit(None)
                gate.__exit__(None, None, None)

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
          upstream=None, max_batch_rows: int | None = None, max_batch_tokens: int | None = None,
          options: ServeOptions | None = None) -> None:
    """upstream: a models.decoding.upstream.UpstreamConfig to steer a base model behind an OpenAI-compatible API.
    max_batch_rows, max_batch_tokens: the running batch's bounds (models.serving.scheduler). The server
    answers /health (503) while the models load."""
    import uvicorn

    options = options or ServeOptions()
    base = f"upstream {upstream.base_url} ({upstream.model})" if upstream else "the local base model"

    def load() -> Engine:
        started = time.monotonic()
        engine = Engine(data_dir, device=device, model_id=model_id, upstream=upstream, max_batch_rows=max_batch_rows,
                        max_batch_tokens=max_batch_tokens)
        log.info(f"loaded {model_id} from {data_dir} with {base} (value models {engine.values.version}) "
                 f"in {time.monotonic() - started:.1f} s")
        return engine

    log.info(f"serving on http://{host}:{port}/v1 (/health, /metrics); auth {'on' if options.api_key else 'off'}")
    uvicorn.run(create_app(load, options), host=host, port=port, timeout_graceful_shutdown=options.shutdown_timeout)


@contextlib.contextmanager
def background_server(engine: Engine, host: str = "127.0.0.1", start_timeout: float = 30.0,
                      options: ServeOptions | None = None):
    """The app on a free port of `host`, served by uvicorn in a daemon thread; yields the /v1 base
    URL and stops the server on exit (tests and bench/serve.py drive it with the openai client)."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, options), host=host, port=port, log_level="warning"))
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
