"""`deltatune serve`: the OpenAI-compatible HTTP server over one :class:`~deltatune.serving.Engine`.

Endpoints (vLLM's surface): ``GET /v1/models``, ``POST /v1/completions``, ``POST
/v1/chat/completions`` (JSON or server-sent events with ``stream: true``), ``POST
/v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``, ``GET /health``, ``GET /metrics``
(Prometheus) and ``GET /`` (the playground page). The ``model`` field picks the base (its served
name) or an adapter. Every request only *submits* to the engine, whose background thread runs the
continuously batched decode loop; tokens come back through ``RequestHandle`` async iteration, so
one event loop serves any number of concurrent clients. A client that goes away aborts its
request, which frees its slot at the next engine step.

Many tenants: keys and the models each may use (``access.py``; a model a key may not use answers
as one that does not exist), runtime loading off unless enabled and confined to ``--lora-root``,
request limits (``limits.py``: 413 / 400 / 429). Tokenization, adapter loads and unloads run in
worker threads, so the event loop never waits on the engine.

The route handlers live at module level on ``router`` and read the engine and settings from
``request.app.state``, which ``create_app`` fills.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from importlib import resources

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltatune.serving import SamplingParams, UnknownModel, protocol
from deltatune.serving.access import Access, Grant, LoraRoot
from deltatune.serving.limits import BodyLimit, Concurrency, Limits
from deltatune.serving.metrics import Metrics
from deltatune.serving.protocol import ApiError
from deltatune.serving.responses import EventStream, Run, as_api_error

OTHER = "(other)"  # metrics label of requests naming no served model
GRANT = "deltatune.grant"  # scope key of the request's Grant (set by _auth on /v1/*)


def create_app(engine, *, api_key: str | None = None, model_path: str | None = None,
               manage_engine: bool = True, access: Access | None = None, limits: Limits | None = None,
               lora_root: str | None = None):
    """The FastAPI application serving ``engine``.

    Args:
        engine: a :class:`deltatune.serving.Engine` (its base is served under ``engine.base_name``).
        api_key: when set, every ``/v1/*`` request must carry ``Authorization: Bearer <api_key>``
            (else 401); ``/``, ``/health`` and ``/metrics`` stay open, as in vLLM. An operator key.
        model_path: what ``/v1/models`` reports as the base's ``root`` (default: its served name).
        manage_engine: start the engine's loop when the app starts and shut it down when it stops.
        access: keys and the models each may use (:class:`~deltatune.serving.access.Access`); adds to
            ``api_key``.
        limits: request bounds (:class:`~deltatune.serving.limits.Limits`; default its defaults).
        lora_root: enables ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, with every
            ``lora_path`` confined to this directory; None (default) leaves both endpoints off (404).

    Returns:
        A ``fastapi.FastAPI`` instance (run it with uvicorn, or use :func:`serve`). Its ``state`` holds
        what the route handlers read: ``engine``, ``metrics``, ``access``, ``limits``, ``concurrency``,
        ``lora_root``, ``model_path``, ``manage_engine`` and ``created`` (the models' creation time).
    """
    app = FastAPI(title="deltatune serve", lifespan=_lifespan, docs_url=None, redoc_url=None)
    state = app.state
    state.engine, state.metrics, state.created = engine, Metrics(), protocol.now()
    state.model_path, state.manage_engine = model_path, manage_engine
    state.access = Access({**(access.keys if access else {}), **Access.build(api_key).keys})
    state.limits = limits or Limits()
    state.concurrency = Concurrency(state.limits.max_concurrent)
    state.lora_root = LoraRoot(lora_root) if lora_root is not None else None
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.middleware("http")(_auth)
    app.add_middleware(BodyLimit, max_bytes=state.limits.max_request_bytes)  # outermost: before auth reads
    app.include_router(router)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app):
    engine, manage = app.state.engine, app.state.manage_engine
    if manage:
        engine.start()
    try:
        yield
    finally:
        if manage:
            engine.shutdown()


async def _api_error(_request, exc: ApiError):
    return JSONResponse(protocol.error_body(exc.status, exc.message, exc.param), status_code=exc.status)


async def _http_error(_request, exc):  # unknown route, wrong method: still OpenAI's shape
    return JSONResponse(protocol.error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)


async def _auth(request: Request, call_next):
    """API key check on ``/v1/*`` (the grant is kept in the scope for the handlers), and a last-resort
    500 in OpenAI's error shape."""
    if request.url.path.startswith("/v1"):
        peer = request.client.host if request.client else "?"
        grant = request.app.state.access.grant(request.headers.get("authorization", ""), peer)
        if grant is None:
            request.app.state.metrics.count_request("(any)", OTHER, 401)  # not the path: clients choose it
            return JSONResponse(protocol.error_body(401, "missing or wrong API key: send the header "
                                                    "'Authorization: Bearer <key>'"), status_code=401)
        request.scope[GRANT] = grant
    try:
        return await call_next(request)
    except Exception as exc:  # noqa: BLE001 — last resort: an answer in the error shape, not a dropped socket
        print(f"deltatune serve: internal error on {request.url.path}: {exc!r}", file=sys.stderr)
        return JSONResponse(protocol.error_body(500, f"internal error: {exc}"), status_code=500)


def _grant(request: Request) -> Grant:
    return request.scope[GRANT]


def _not_found(model: str) -> ApiError:
    """The one answer for a model that does not exist *and* for one this key may not use (same body,
    so a tenant cannot learn other tenants' adapter names; the engine's message lists them all)."""
    return ApiError(404, f"the model {model!r} does not exist", "model")


def _require_loading(request: Request) -> LoraRoot:
    """Only operator keys see the load/unload endpoints (others get the unknown-route 404); they are
    off unless the server was started with ``--enable-lora-loading --lora-root DIR``."""
    if not _grant(request).operator:
        raise StarletteHTTPException(404, "Not Found")
    root = request.app.state.lora_root
    if root is None:
        raise ApiError(404, "runtime adapter loading is off: start deltatune serve with --enable-lora-loading "
                            "--lora-root DIR to enable /v1/load_lora_adapter and /v1/unload_lora_adapter")
    return root


router = APIRouter()


@router.get("/", response_class=HTMLResponse)
async def playground():
    return resources.files("deltatune.serving").joinpath("playground.html").read_text(encoding="utf-8")


@router.get("/health")
async def health():
    return Response(status_code=200)


@router.get("/metrics")
async def prometheus(request: Request):
    state = request.app.state
    text = state.metrics.render(state.engine.stats())
    extra = getattr(state.engine, "metrics_lines", None)  # replicas.ReplicaEngine: one series per replica
    if extra is not None:
        text += "\n".join(extra()) + "\n"
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models")
async def list_models(request: Request):
    state = request.app.state
    engine, created, grant = state.engine, state.created, _grant(request)
    cards = []
    if grant.allows(engine.base_name):
        cards.append(protocol.model_card(engine.base_name, state.model_path or engine.base_name, None, created,
                                         engine.max_model_len))
    for info in engine.adapters():
        if not grant.allows(info.name):
            continue
        card = protocol.model_card(info.name, str(info.path), engine.base_name, created, engine.max_model_len)
        card["lora"] = {"rank": info.rank, "state": info.state, "version": info.version}
        cards.append(card)
    return {"object": "list", "data": cards}


@router.post("/v1/load_lora_adapter", openapi_extra=protocol.openapi_body(protocol.LoadLoraRequest))
async def load_lora_adapter(request: Request):
    root = _require_loading(request)
    engine = request.app.state.engine
    body = protocol.parse(protocol.LoadLoraRequest, await request.body())
    if body.lora_name == engine.base_name:
        raise ApiError(400, f"lora_name: {body.lora_name!r} is the base model's name", "lora_name")
    known = {a.name for a in engine.adapters()}
    if body.lora_name in known and not body.load_inplace:
        raise ApiError(400, f"lora_name: the adapter {body.lora_name!r} is already loaded; send "
                            "load_inplace: true to replace it", "lora_name")
    try:  # reading and checking files: off the event loop
        path = await run_in_threadpool(root.confine, body.lora_path)
        info = await run_in_threadpool(engine.add_adapter, body.lora_name, path, replace=body.load_inplace)
    except Exception as exc:  # noqa: BLE001 — engine errors map to their status, the rest to 400 below
        raise as_api_error(exc, default_param="lora_path") from None
    verb = "reloaded" if body.lora_name in known else "added"
    return PlainTextResponse(f"Success: LoRA adapter '{info.name}' {verb} successfully "
                             f"(rank {info.rank}, version {info.version}).")


@router.post("/v1/unload_lora_adapter", openapi_extra=protocol.openapi_body(protocol.UnloadLoraRequest))
async def unload_lora_adapter(request: Request):
    _require_loading(request)
    body = protocol.parse(protocol.UnloadLoraRequest, await request.body())
    try:  # waits for the engine's current step: off the event loop
        await run_in_threadpool(request.app.state.engine.remove_adapter, body.lora_name)
    except UnknownModel as exc:
        raise ApiError(404, exc.message, "lora_name") from None
    except Exception as exc:  # noqa: BLE001
        raise as_api_error(exc, default_param="lora_name") from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@router.post("/v1/completions", openapi_extra=protocol.openapi_body(protocol.CompletionRequest))
async def completions(request: Request):
    return await _generate(request, protocol.CompletionRequest, chat=False)


@router.post("/v1/chat/completions", openapi_extra=protocol.openapi_body(protocol.ChatCompletionRequest))
async def chat_completions(request: Request):
    return await _generate(request, protocol.ChatCompletionRequest, chat=True)


async def _generate(request: Request, model_cls, chat: bool):
    """Submit the request's prompts; stream the answer as server-sent events or return it as JSON."""
    arrived = time.perf_counter()
    state, grant = request.app.state, _grant(request)
    engine, metrics = state.engine, state.metrics
    endpoint = request.url.path
    model = OTHER
    leave = None
    try:
        body = protocol.parse(model_cls, await request.body())
        model = _label(engine, grant, body.model)
        state.limits.check(body)
        if model == OTHER:
            raise _not_found(body.model)
        leave = state.concurrency.enter(grant.client)
        handles = await _off_loop(_submit, engine, body, chat)
    except Exception as exc:  # noqa: BLE001
        if leave is not None:
            leave()
        err = _not_found(body.model) if isinstance(exc, UnknownModel) else as_api_error(exc)
        metrics.count_request(endpoint, model, err.status)
        raise err from None
    run = Run(handles, body, chat, arrived, metrics, endpoint, model, leave)
    if body.stream:
        return EventStream(run)
    try:
        answer = await run.collect(request)
    finally:
        leave()
    if answer is None:  # the client went away; nobody reads this (nginx's "client closed request")
        return Response(status_code=499)
    return JSONResponse(answer)


async def _off_loop(submit, engine, body, chat: bool) -> list:
    """Run ``submit`` (chat template, tokenization, engine checks) in a worker thread. If the client
    goes away meanwhile, the requests it queued are aborted once the thread returns them."""
    future = asyncio.ensure_future(run_in_threadpool(submit, engine, body, chat))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(lambda f: [h.abort() for h in (f.result() if not f.exception() else [])])
        raise


def _submit(engine, body, chat: bool) -> list:
    """Validate the request through the engine and enqueue one request per prompt (all or none)."""
    if chat:
        max_tokens, prompts = body.limit(), [_chat_prompt(engine.tokenizer, body)]
    else:
        max_tokens, prompts = body.max_tokens, body.prompts()
    sampling = SamplingParams(**body.sampling_kwargs(max_tokens))
    adapter = None if body.model == engine.base_name else body.model
    handles = []
    try:
        for prompt in prompts:
            handles.append(engine.submit(prompt, adapter=adapter, sampling=sampling))
    except BaseException:
        for handle in handles:
            handle.abort()
        raise
    return handles


def _label(engine, grant: Grant, model: str) -> str:
    """The ``model`` label of a request's metrics: a served name this client may use, else OTHER (labels
    taken from client input would let anyone grow /metrics without bound)."""
    if not grant.allows(model):
        return OTHER
    if model == engine.base_name or model in {a.name for a in engine.adapters()}:
        return model
    return OTHER


def _chat_prompt(tokenizer, body) -> list[int]:
    """Token ids of the conversation through the base's chat template, ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "messages: the base model's tokenizer has no chat template; use /v1/completions",
                       "messages")
    try:
        text = tokenizer.apply_chat_template(body.conversation(), tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 — templates raise their own errors (e.g. roles out of order)
        raise ApiError(400, f"messages: the chat template refused them: {exc}", "messages") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def serve(engine, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_path: str | None = None, log_level: str = "info", access: Access | None = None,
          limits: Limits | None = None, lora_root: str | None = None) -> None:
    """Run the server until interrupted (Ctrl-C / SIGTERM), then shut the engine down.

    The socket is bound before uvicorn starts, so ``port=0`` picks a free port; the first line on
    stdout is ``deltatune serve: listening on http://HOST:PORT`` with the real port (tests and
    scripts read it).
    """
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
    sock.listen(2048)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"deltatune serve: listening on http://{shown}:{bound} (base {engine.base_name!r}, "
          f"{len(engine.adapters())} adapter(s); playground at /, API under /v1)", flush=True)
    app = create_app(engine, api_key=api_key, model_path=model_path, access=access, limits=limits,
                     lora_root=lora_root)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5,
                            access_log=log_level in ("debug", "trace"))
    uvicorn.Server(config).run(sockets=[sock])
