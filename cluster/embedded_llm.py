"""The embedded local LLM: a small instruct model behind an OpenAI-compatible HTTP API, on Ray Serve or alone.

Three separate pieces, as in ``ray.serve.llm``:

1. Logic, no Ray: the engine (``specialists/llm_engine.py``: constrained label choice and greedy generation
   on a local causal LM).
2. Protocol: :func:`build_openai_app` turns any engine with those two methods into a FastAPI app speaking
   the OpenAI chat-completions shape (tests pass a fake engine).
3. Wiring: :class:`EmbeddedLLMConfig` and :func:`start_embedded_llm` deploy that app on the running Ray
   cluster under its own Serve application name and route prefix, and return the ``base_url`` for the
   ``openai`` client; :func:`serve_foreground` serves it from this process without Ray
   (``labelwright llm``).

A ``response_format`` that is a JSON schema with one string property restricted by an ``enum`` is answered
by the engine's constrained choice, ``{"<field>": "<label>"}``; one whose property is an array of such
strings (a candidate set) by the labels within ``candidate_margin`` (natural log) of the most likely first
item, ``{"<field>": ["<label>", ...]}``; anything else by greedy generation.
"""

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from labelwright.specialists.errors import ConfigError, ControllerError, LabelwrightError
from labelwright.specialists.llm_engine import Engine, LocalLLMEngine, TokenLogprob

APP_NAME = "labelwright-embedded-llm"
ROUTE_PREFIX = "/labelwright-llm"
MAX_TOP_LOGPROBS = 20
# Labels at least e^-1.5 = 22% as likely as the best join its candidate set (set size and coverage: benchmarks/routing.py).
DEFAULT_CANDIDATE_MARGIN = 1.5


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible protocol (FastAPI)
# --------------------------------------------------------------------------------------------------


class _ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[dict[str, Any]]
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = 1
    stream: bool | None = False

    @field_validator("messages")
    @classmethod
    def _messages_present(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not value:
            raise ValueError("messages must hold at least one message")
        for i, m in enumerate(value):
            if not isinstance(m.get("role"), str):
                raise ValueError(f"messages[{i}] has no role")
        return value


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _error(status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": None}}
    )


class EnumSchema(NamedTuple):
    """The one constrained field of a response format: its name, the allowed labels, and for an array of
    labels (a candidate set) the most items it may hold (None: a single label)."""

    field: str
    allowed: list[str]
    max_items: int | None = None


def parse_enum_schema(response_format: dict[str, Any] | None) -> EnumSchema | None:
    """The constrained field of a one-field schema (a string enum, or an array of string-enum items), None
    for no/``text`` format.

    Raises ``_BadRequest`` (400) for any other response format or schema.
    """
    if response_format is None or response_format.get("type") == "text":
        return None
    if response_format.get("type") != "json_schema":
        raise _BadRequest(
            f"response_format type {response_format.get('type')!r} is not supported; use 'text' or "
            "'json_schema' with one string property restricted by an enum",
            "response_format",
        )
    schema = (response_format.get("json_schema") or {}).get("schema")
    hint = ('the embedded LLM supports only {"type": "object", "properties": {"<field>": {"type": "string", '
            '"enum": [...]}}, "required": ["<field>"]}, or a "<field>" of {"type": "array", "items": '
            '{"type": "string", "enum": [...]}}')
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise _BadRequest(f"unsupported json_schema: {hint}", "response_format.json_schema.schema")
    props = schema.get("properties")
    if not isinstance(props, dict) or len(props) != 1:
        raise _BadRequest(f"unsupported json_schema (need exactly one property): {hint}",
                          "response_format.json_schema.schema.properties")
    ((field, prop),) = props.items()
    where = f"response_format.json_schema.schema.properties.{field}"
    max_items = None
    is_array = isinstance(prop, dict) and prop.get("type") == "array"
    if is_array:
        max_items = prop.get("maxItems")
        if max_items is not None and (not isinstance(max_items, int) or max_items < 1):
            raise _BadRequest(f"maxItems of property {field!r} must be a positive integer", f"{where}.maxItems")
        prop, where = prop.get("items"), f"{where}.items"
    if not isinstance(prop, dict) or prop.get("type", "string") != "string" or "enum" not in prop:
        raise _BadRequest(f"unsupported json_schema (property {field!r} must be a string enum): {hint}", where)
    allowed = prop["enum"]
    if not isinstance(allowed, list) or not allowed or not all(isinstance(v, str) and v for v in allowed):
        raise _BadRequest(f"enum of property {field!r} must be a non-empty list of non-empty strings", f"{where}.enum")
    if len(set(allowed)) != len(allowed):
        raise _BadRequest(f"enum of property {field!r} has duplicate labels", f"{where}.enum")
    if is_array and max_items is None:
        max_items = len(allowed)
    return EnumSchema(field, allowed, max_items)


def candidate_set(allowed: Sequence[str], scores: Sequence[float], *, margin: float, max_items: int) -> list[str]:
    """The labels whose log-probability is within ``margin`` of the best one's, most likely first, at most
    ``max_items`` (never empty)."""
    order = sorted(range(len(allowed)), key=lambda i: -scores[i])
    best = scores[order[0]]
    return [allowed[i] for i in order if scores[i] >= best - margin][:max_items]


def _logprobs_content(entries: list[TokenLogprob], top_n: int) -> list[dict[str, Any]]:
    return [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": list(e.token.encode("utf-8")),
            "top_logprobs": [
                {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in e.top[:top_n]
            ],
        }
        for e in entries
    ]


def build_openai_app(engine: Engine, *, default_max_tokens: int = 256,
                     candidate_margin: float = DEFAULT_CANDIDATE_MARGIN):
    """A FastAPI app serving ``GET /v1/models`` and ``POST /v1/chat/completions`` from ``engine``.

    A response format asking for an array of labels (a candidate set) is answered with the labels whose
    log-probability as the list's first item is within ``candidate_margin`` of the best's."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError

    app = FastAPI(title="labelwright embedded LLM")
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return _error(400, f"invalid request: {first.get('msg', exc)}", param=loc)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": engine.model_name, "object": "model", "created": created, "owned_by": "labelwright"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body is not valid JSON")
        try:
            req = _ChatRequest.model_validate(body)
            if req.stream:
                raise _BadRequest("stream=true is not supported by the embedded LLM", "stream")
            if req.n not in (None, 1):
                raise _BadRequest("only n=1 is supported by the embedded LLM", "n")
            if req.top_logprobs and not req.logprobs:
                raise _BadRequest("top_logprobs needs logprobs=true", "top_logprobs")
            constrained = parse_enum_schema(req.response_format)
        except ValidationError as exc:
            first = exc.errors()[0]
            return _error(400, f"invalid request: {first['msg']}", param=".".join(map(str, first["loc"])) or None)
        except _BadRequest as exc:
            return _error(400, str(exc), param=exc.param)

        cancel = threading.Event()
        try:
            if constrained is not None and constrained.max_items is not None:
                field, allowed, max_items = constrained
                result = await asyncio.to_thread(partial(engine.choose, array=True), req.messages, field, allowed,
                                                 cancel)
                content = json.dumps({field: candidate_set(allowed, result.scores, margin=candidate_margin,
                                                           max_items=max_items)})
                finish = "stop"
            elif constrained is not None:
                field, allowed, _ = constrained
                result = await asyncio.to_thread(engine.choose, req.messages, field, allowed, cancel)
                content = json.dumps({field: result.label})
                finish = "stop"
            else:
                limit = req.max_completion_tokens or req.max_tokens or default_max_tokens
                result = await asyncio.to_thread(engine.generate, req.messages, limit, cancel)
                content, finish = result.text, result.finish_reason
        except asyncio.CancelledError:
            # The client went away (Serve cancels the request): tell the engine thread, which would
            # otherwise queue and compute an answer nobody reads, blocking the requests behind it.
            cancel.set()
            raise
        except (ValueError, LabelwrightError) as exc:
            return _error(400, str(exc))

        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": finish,
            "logprobs": None,
        }
        if req.logprobs:
            choice["logprobs"] = {"content": _logprobs_content(result.logprobs, req.top_logprobs or 0)}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": engine.model_name,
            "choices": [choice],
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },
        }

    return app


# --------------------------------------------------------------------------------------------------
# Serve wiring
# --------------------------------------------------------------------------------------------------


class EmbeddedLLMConfig(BaseModel):
    """Settings of the embedded LLM endpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "qwen2.5-coder-0.5b-instruct"
    # auto: bfloat16 on a CPU with native bfloat16 matmuls (AMX, AVX512-BF16), float32 elsewhere; see
    # specialists/local_model.py and benchmarks/embedded_backends.py for what each costs and answers.
    backend: Literal["auto", "bfloat16", "float32"] = "auto"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # The LLM is the slowest stage on a CPU box; 2 threads ran 1.3x faster than 1 here (3.6 vs 4.5 s
    # a 151-token prompt) when nothing else competed for the cores.
    num_cpus: float = Field(default=2.0, gt=0)
    # None: one thread per reserved CPU. More threads than free cores makes CPU inference much slower
    # (measured here: 2 threads on a busy 2-core box ran 5-10x slower than 1).
    torch_threads: int | None = Field(default=None, ge=1)
    cache_dir: str | None = None  # None: $LABELWRIGHT_CACHE or ~/.cache/labelwright
    # A candidate-set request gets the labels whose log-probability is within this of the best's.
    candidate_margin: float = Field(default=DEFAULT_CANDIDATE_MARGIN, ge=0.0)
    startup_timeout_s: float = Field(default=600.0, gt=0)
    app_name: str = APP_NAME
    route_prefix: str = ROUTE_PREFIX

    @property
    def threads(self) -> int:
        """Torch threads the replica uses."""
        return self.torch_threads or max(1, int(self.num_cpus))

    @field_validator("route_prefix")
    @classmethod
    def _prefix_shape(cls, value: str) -> str:
        if not value.startswith("/") or value == "/" or value.endswith("/"):
            raise ValueError("route_prefix must start with '/', not end with '/', and not be '/' itself "
                             "(the specialists' apps share the Serve instance)")
        return value


EngineFactory = Callable[[EmbeddedLLMConfig], Engine]


def default_engine_factory(config: EmbeddedLLMConfig) -> LocalLLMEngine:
    """Load the configured model into a :class:`LocalLLMEngine`."""
    return LocalLLMEngine.load(config.model, cache_dir=config.cache_dir, torch_threads=config.threads,
                               backend=config.backend)


def build_embedded_llm_app(config: EmbeddedLLMConfig, *, engine_factory: EngineFactory | None = None):
    """The Serve application (not yet deployed) for ``config``; the engine is built inside the replica."""
    from ray import serve

    factory = engine_factory or default_engine_factory

    @serve.ingress()
    class EmbeddedLLMServer:
        def __init__(self, cfg: EmbeddedLLMConfig, make_engine: EngineFactory) -> None:
            import torch

            torch.set_num_threads(cfg.threads)
            self._cfg = cfg
            self._engine = make_engine(cfg)

        def __serve_build_asgi_app__(self):
            return build_openai_app(self._engine, candidate_margin=self._cfg.candidate_margin)

    deployment = serve.deployment(
        EmbeddedLLMServer,
        name="EmbeddedLLM",
        num_replicas=1,
        ray_actor_options={"num_cpus": config.num_cpus},
        max_ongoing_requests=8,
        health_check_timeout_s=max(30.0, config.startup_timeout_s),
        # A missing or corrupt model will not fix itself: fail the app after one retry, not twenty.
        max_constructor_retry_count=2,
        logging_config={"log_level": "WARNING", "enable_access_log": False},
    )
    return deployment.bind(config, factory)


def app_builder(args: dict[str, Any]):
    """The embedded LLM's application from a Serve config file's ``args`` (an :class:`EmbeddedLLMConfig`);
    ``labelwright serve RUN --write-config`` names it by ``import_path``."""
    return build_embedded_llm_app(EmbeddedLLMConfig(**args))


def start_embedded_llm(config: EmbeddedLLMConfig, *, engine_factory: EngineFactory | None = None) -> str:
    """Deploy the embedded LLM on the running Ray cluster and return its ``base_url`` once it answers.

    Starts (or reuses) Serve's HTTP proxy on ``config.host:config.port``; Ray must already be initialised.
    Raises ControllerError if the endpoint is not ready within ``config.startup_timeout_s`` (a model asset
    problem inside the replica is reported as ModelAssetError when Serve passes it through).
    """
    import ray
    from ray import serve

    if not ray.is_initialized():
        raise ConfigError("start_embedded_llm needs a running Ray cluster: call ray.init() (or labelwright's "
                          "cluster connection) first")
    serve.start(http_options={"host": config.host, "port": config.port})
    base_url = f"http://{_url_host(config.host)}:{config.port}{config.route_prefix}/v1"
    running = serve.status().applications.get(config.app_name)
    if running is not None and running.status == "RUNNING" and _serves(served_model(base_url), config):
        return base_url  # already up in this cluster (an earlier job): reuse it, loading takes minutes
    app = build_embedded_llm_app(config, engine_factory=engine_factory)
    deadline = time.monotonic() + config.startup_timeout_s
    try:
        # Do not let Serve wait (unbounded) for the replica: the deadline below bounds the start.
        serve.run_many(
            [serve.RunTarget(app, name=config.app_name, route_prefix=config.route_prefix)],
            wait_for_ingress_deployment_creation=False,
            wait_for_applications_running=False,
        )
    except Exception as exc:
        raise _startup_error(config, exc) from exc
    last = "no answer yet"
    while time.monotonic() < deadline:
        status = serve.status().applications.get(config.app_name)
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            details = [status.message] + [d.message for d in status.deployments.values() if d.message]
            raise _startup_error(config, RuntimeError(f"{status.status.value}: " + "\n".join(details)))
        ok, last = _probe(base_url + "/models")
        if ok:
            return base_url
        time.sleep(0.5)
    raise ControllerError(
        f"embedded LLM {config.model!r} did not answer at {base_url}/models within "
        f"{config.startup_timeout_s:.0f} s (last: {last}). Raise startup_timeout_s (the first start converts "
        f"the model, 1-3 min), check that port {config.port} is free and that Serve was not already started "
        f"on another port in this cluster, or see `serve status`"
    )


def serve_foreground(config: EmbeddedLLMConfig, *, engine_factory: EngineFactory | None = None,
                     on_ready: Callable[[str], None] = print) -> None:
    """Serve the embedded LLM over HTTP in this process, without Ray, until interrupted (Ctrl-C or SIGTERM).

    The app sits at the root of ``config.host:config.port``; ``on_ready`` gets the base URL
    (``http://host:port/v1``) once ``/v1/models`` answers. Raises ConfigError when the port is taken.
    """
    import socket

    import torch
    import uvicorn

    with socket.socket() as probe:  # fail before minutes of loading, not after
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((config.host, config.port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {config.host}:{config.port} ({exc.strerror}); pass a free --port")
    torch.set_num_threads(config.threads)
    engine = (engine_factory or default_engine_factory)(config)
    app = build_openai_app(engine, candidate_margin=config.candidate_margin)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port,
                                           log_level="warning", access_log=False))
    base_url = f"http://{_url_host(config.host)}:{config.port}/v1"

    def announce() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started and _probe(base_url + "/models")[0]:
            on_ready(base_url)

    threading.Thread(target=announce, daemon=True).start()
    server.run()  # returns after SIGINT / SIGTERM, once open requests are done


def served_model(base_url: str) -> str | None:
    """The id of the model an OpenAI-compatible endpoint serves (the first of ``/models``), None if it
    does not answer."""
    import urllib.request

    try:
        with urllib.request.urlopen(base_url + "/models", timeout=5) as resp:
            data = json.loads(resp.read()).get("data") or [{}]
            return data[0].get("id")
    except (OSError, ValueError, AttributeError):
        return None


def _serves(served: str | None, config: EmbeddedLLMConfig) -> bool:
    """Whether an endpoint serving ``served`` is the one ``config`` asks for (model, and precision unless auto)."""
    if served is None:
        return False
    model, _, precision = served.rpartition("@")
    return model == config.model and config.backend in ("auto", precision)


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def _probe(url: str) -> tuple[bool, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200 and b'"data"' in resp.read(), f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, str(exc)


def _startup_error(config: EmbeddedLLMConfig, exc: BaseException) -> LabelwrightError:
    from labelwright.specialists.errors import ModelAssetError

    text = str(exc)
    if "ModelAssetError" in text or isinstance(exc, ModelAssetError):
        return ModelAssetError(f"embedded LLM {config.model!r} could not load its model: {text}")
    if "ConfigError" in text:
        return ConfigError(f"embedded LLM {config.model!r}: {text}")
    return ControllerError(f"embedded LLM {config.model!r} failed to deploy as Serve app "
                           f"{config.app_name!r}: {text}")
