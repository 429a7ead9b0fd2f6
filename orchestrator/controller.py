"""The controller client: one label per row from an OpenAI-compatible LLM endpoint.

One shared path around every request (in the manner of autolabel's ``label()``): build the prompt, look the
row up in the persistent cache, call the endpoint with our own retries and backoff, parse and validate the
answer against the allowed labels (one repair round at most, never a guess), meter tokens and cost, and
cache resolved answers. Row-level failures come back as data (``label=None`` plus a ``reason``), never as
exceptions, so one bad row or a dead endpoint never sinks a batch.

The class holds no Ray code and can be built from its config alone, inside a Ray actor or anywhere else;
tests pass a real ``openai`` client pointed at ``tests/fake_openai.py``.
"""

from __future__ import annotations

import ipaddress
import math
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator

from labelwright.specialists import prompts
from .cost import Usage, UsageMeter
from labelwright.specialists.errors import ConfigError, ControllerError
from .llm_cache import LLMCache, cache_key

LOCAL_DUMMY_KEY = "labelwright-local"  # sent to loopback endpoints when no key is set; they ignore it
_MAX_BACKOFF_S = 30.0
_MAX_RETRY_AFTER_S = 60.0
_GAVE_UP = "gave up after"
_UNUSABLE = "the endpoint sent an unusable response"


def is_transient(reason: str) -> bool:
    """Whether a request's failure may pass if asked again later: the retries ran out on timeouts, connection
    errors or HTTP 408/409/429/5xx, or the body was unusable. Not a refused request (401/403, other 4xx), nor
    an answer that named no valid label (the same prompt tends to get the same answer)."""
    return reason.startswith((_GAVE_UP, _UNUSABLE))


class ControllerConfig(BaseModel):
    """How to reach and use the controller LLM. Validation errors name the field at fault."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = None  # None: the embedded local LLM; the job fills the URL in once it has started it
    model: str = "embedded"
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key; the key never sits in a file
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(64, ge=1)
    timeout_s: float = Field(60.0, gt=0.0)
    max_retries: int = Field(4, ge=0)  # our own retries; the openai client is built with max_retries=0
    backoff_s: float = Field(0.5, ge=0.0)
    concurrency: int = Field(4, ge=1)  # max in-flight requests per Controller
    structured_output: Literal["json_schema", "json_object", "none"] = "json_schema"
    use_logprobs: bool = True
    # label: one label per row. candidates: a set of 1 to max_candidates plausible labels, most likely
    # first (CanDist); the first is the row's label until a distilled student decides between them.
    mode: Literal["label", "candidates"] = "label"
    max_candidates: int = Field(3, ge=2)
    num_demonstrations: int = Field(4, ge=0)
    # With gold rows (the held-out rows of a gold column, the rows of voting.gold_file), the demonstrations
    # are drawn from them, with their gold labels, as well as from the seed rows; a row is never shown its own.
    gold_demonstrations: bool = True
    max_choices: int = Field(12, ge=1)
    max_text_chars: int = Field(4000, ge=1)
    # A demonstration's text is cut to this: four long ones made each prompt of a set of forum answers
    # (yahoo_topics, a tenth over 1,100 characters) take 8-36 s on the embedded LLM; the row itself keeps
    # max_text_chars. A cut demonstration says so, as a cut row does.
    max_demonstration_chars: int = Field(500, ge=1)
    price_prompt_per_1k: float = Field(0.0, ge=0.0)
    price_completion_per_1k: float = Field(0.0, ge=0.0)
    cache: bool = True
    cache_path: str | None = None  # default: $LABELWRIGHT_CACHE or ~/.cache/labelwright, file controller-cache.sqlite

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(
                f"{value!r} is not an http(s) URL; give the endpoint's OpenAI-compatible base URL, "
                "for example http://127.0.0.1:8000/v1"
            )
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(
                f"{value!r} is not an environment variable name; api_key_env names the variable that holds "
                "the key (for example OPENAI_API_KEY), it is not the key itself"
            )
        return value


class ControllerAnswer(BaseModel):
    """The controller's answer for one row."""

    model_config = ConfigDict(extra="forbid")

    label: str | None  # None = unresolved
    candidates: list[str] | None = None  # candidates mode: the set, most likely first (label is its first)
    confidence: float | None  # from logprobs when the endpoint gives them
    raw: str | None  # raw content of the last answer
    reason: str | None  # why unresolved, or a note (for example: the text was truncated)
    prompt_tokens: int = 0  # tokens actually spent on this row (0 on a cache hit)
    completion_tokens: int = 0
    calls: int = 0  # HTTP requests made for this row (retries and the repair round included)
    cached: bool = False
    endpoint_down: bool = False  # unresolved because the endpoint kept failing (not because of the answer)
    retryable: bool = False  # unresolved for a reason that may pass (see is_transient): --retry-unresolved asks again

    @property
    def resolved(self) -> bool:
        return self.label is not None


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_key(config: ControllerConfig) -> str:
    """The key from ``$<api_key_env>``; a dummy for loopback endpoints; ConfigError for remote ones."""
    key = os.environ.get(config.api_key_env, "")
    if key:
        return key
    if config.base_url is None or is_loopback(config.base_url):
        return LOCAL_DUMMY_KEY
    raise ConfigError(
        f"controller.api_key_env: the environment variable {config.api_key_env} is not set, and "
        f"controller.base_url {config.base_url} is not a local address. Export {config.api_key_env}=<your key> "
        "(the key is read from the environment, never from a file), or set controller.api_key_env to the "
        "variable that holds it."
    )


def label_confidence(tokens: Sequence[tuple[str, float]], content: str, label: str) -> float | None:
    """exp(sum of the logprobs of the tokens that spell ``label`` in ``content``).

    Falls back to the sum over all content tokens (scaffolding tokens have ~0 logprob) when the tokens do
    not spell the content or the label cannot be located in it. None when there are no tokens.
    """
    if not tokens:
        return None
    chosen = [lp for _, lp in tokens]
    if "".join(tok for tok, _ in tokens) == content:
        spans = list(re.finditer(re.escape(label), content, flags=re.IGNORECASE))
        if spans:
            start, end = spans[-1].span()  # the value comes after the "label" key
            picked, pos = [], 0
            for tok, lp in tokens:
                if pos < end and pos + len(tok) > start:
                    picked.append(lp)
                pos += len(tok)
            if picked:
                chosen = picked
    return float(min(1.0, max(0.0, math.exp(sum(chosen)))))


@dataclass
class JSONAnswer:
    """What :meth:`Controller.complete_json` got: the parsed value, or why there is none."""

    value: Any = None
    raw: str | None = None  # the content as sent (None when the request failed)
    reason: str | None = None  # why there is no usable value
    refused_schema: bool = False  # the endpoint refused the response_format (HTTP 400/422)
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Tally:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int | None = None  # HTTP status of the last refused request


class Controller:
    """Labels rows with the controller LLM. Thread-safe; ``label_many`` runs rows on a bounded thread pool."""

    def __init__(
        self,
        config: ControllerConfig,
        *,
        labels: list[str],
        descriptions: dict[str, str] | None = None,
        instruction: str = "",
        client: Any = None,
    ) -> None:
        if not labels:
            raise ConfigError("the task has no labels; give the task's label list to the controller")
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ConfigError(f"the task's labels repeat {duplicates}; give each label once")
        self.config = config
        self.labels = list(labels)
        self.descriptions = dict(descriptions or {})
        self.instruction = instruction
        self._own_client = client is None
        if client is None:
            if config.base_url is None:
                raise ConfigError(
                    "controller.base_url is not set. The job fills it in after starting the embedded LLM; when "
                    "using the Controller directly, set controller.base_url to an OpenAI-compatible URL such "
                    "as http://127.0.0.1:8000/v1."
                )
            import openai

            client = openai.OpenAI(
                base_url=config.base_url,
                api_key=resolve_api_key(config),
                timeout=config.timeout_s,
                max_retries=0,
            )
        self._client = client
        self._cache = LLMCache(config.cache_path) if config.cache else None
        self._meter = UsageMeter(
            price_prompt_per_1k=config.price_prompt_per_1k,
            price_completion_per_1k=config.price_completion_per_1k,
        )
        self._slots = threading.BoundedSemaphore(config.concurrency)

    def __reduce__(self):  # noqa: ANN204
        if not self._own_client:
            raise TypeError(
                "a Controller built with a client= cannot be pickled; send its ControllerConfig to the Ray "
                "actor and build the Controller there"
            )
        return (_rebuild, (self.config, self.labels, self.descriptions, self.instruction))

    @property
    def usage(self) -> Usage:
        """Totals so far: calls, prompt/completion tokens, cache hits, cost in USD."""
        return self._meter.snapshot()

    @property
    def _where(self) -> str:
        return self.config.base_url or "the configured endpoint"

    def check_endpoint(self) -> None:
        """GET /models once; ControllerError saying what to do when the endpoint is unusable."""
        import openai

        try:
            self._client.models.list(timeout=min(self.config.timeout_s, 30.0))
        except openai.AuthenticationError as exc:
            raise ControllerError(
                f"the controller endpoint {self._where} refused the API key (HTTP {exc.status_code}); put a "
                f"valid key in ${self.config.api_key_env} or set controller.api_key_env to the right variable"
            ) from exc
        except openai.APIStatusError as exc:
            raise ControllerError(
                f"the controller endpoint {self._where} answered HTTP {exc.status_code} to GET /models: "
                f"{_status_message(exc)}; check controller.base_url (it should end in /v1) and that the "
                "server is OpenAI-compatible"
            ) from exc
        except openai.APITimeoutError as exc:
            raise ControllerError(
                f"the controller endpoint {self._where} did not answer GET /models in time; check the server "
                "is up and not overloaded, or raise controller.timeout_s"
            ) from exc
        except openai.APIConnectionError as exc:
            raise ControllerError(
                f"cannot reach the controller endpoint {self._where} ({_cause(exc)}); start the server or "
                "fix controller.base_url"
            ) from exc

    # ------------------------------------------------------------------ one row

    def label(
        self,
        text: str,
        *,
        demonstrations: Sequence[tuple[str, str]] = (),
        choices: Sequence[str] | None = None,
    ) -> ControllerAnswer:
        """One label for ``text`` from the allowed set; an unresolved answer (with a reason) on any failure.

        ``choices`` narrows the offered labels only when the task has more than ``max_choices`` labels
        (the first ``max_choices`` of them, in the caller's order). Never raises for a row.
        """
        tally = _Tally()
        try:
            return self._label(text, demonstrations, choices, tally)
        except Exception as exc:  # noqa: BLE001 - a row's failure is data, not an exception
            return self._unresolved(f"internal error while labelling: {type(exc).__name__}: {exc}", None, tally)

    def _offered(self, choices: Sequence[str] | None) -> tuple[list[str], str | None]:
        if choices is None or len(self.labels) <= self.config.max_choices:
            return list(self.labels), None
        offered: list[str] = []
        unknown: list[str] = []
        for choice in choices:
            label = prompts.match_label(choice, self.labels)
            if label is None:
                unknown.append(choice)
            elif label not in offered:
                offered.append(label)
        if unknown:
            return [], f"choices {unknown} are not labels of the task; narrow with labels from the task's label list"
        if not offered:
            return [], "choices is empty; pass at least one candidate label, or None to offer every label"
        return offered[: self.config.max_choices], None

    def _label(
        self,
        text: str,
        demonstrations: Sequence[tuple[str, str]],
        choices: Sequence[str] | None,
        tally: _Tally,
    ) -> ControllerAnswer:
        cfg = self.config
        if not isinstance(text, str) or not text.strip():
            return self._unresolved("the text is empty; nothing to classify", None, tally)
        offered, problem = self._offered(choices)
        if problem:
            return self._unresolved(problem, None, tally)
        demos = list(demonstrations)[: cfg.num_demonstrations]
        most = min(cfg.max_candidates, len(offered)) if cfg.mode == "candidates" else None
        messages, truncated = prompts.build_messages(
            text,
            instruction=self.instruction,
            labels=offered,
            descriptions=self.descriptions,
            demonstrations=demos,
            max_text_chars=cfg.max_text_chars,
            max_candidates=most,
            max_demonstration_chars=cfg.max_demonstration_chars,
        )
        note = f"text truncated to {cfg.max_text_chars} of {len(text)} characters in the prompt" if truncated else None
        fmt = prompts.response_format(cfg.structured_output, offered, max_candidates=most)

        def parse(content: str | None) -> tuple[list[str] | None, str | None]:
            if most is None:
                label, problem = prompts.parse_answer(content, offered)
                return ([label] if label is not None else None), problem
            return prompts.parse_candidates(content, offered, max_candidates=most)

        params = {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens, "logprobs": cfg.use_logprobs}

        key = None
        if self._cache is not None:
            key = cache_key(model=cfg.model, params=params, messages=messages, response_format=fmt)
            hit = self._cache.get(key)
            if hit is not None:
                self._meter.add_cache_hit()
                return ControllerAnswer(
                    label=hit["label"],
                    candidates=hit.get("candidates"),
                    confidence=hit.get("confidence"),
                    raw=hit.get("raw"),
                    reason=hit.get("note"),
                    cached=True,
                )

        completion, error = self._request(messages, fmt, tally)
        if error:
            answer = self._unresolved(error, None, tally, note)
            answer.endpoint_down = error.startswith(_GAVE_UP)
            answer.retryable = is_transient(error)
            return answer
        content, tokens = _content_and_tokens(completion)
        chosen, problem = parse(content)
        if chosen is None:
            first_problem = problem
            messages = messages + prompts.repair_messages(content or "", problem or "", labels=offered,
                                                          max_candidates=most)
            completion, error = self._request(messages, fmt, tally)
            if error:
                answer = self._unresolved(
                    f"first answer invalid ({first_problem}); the repair request failed: {error}", content, tally, note
                )
                answer.retryable = is_transient(error)
                return answer
            content, tokens = _content_and_tokens(completion)
            chosen, problem = parse(content)
            if chosen is None:
                return self._unresolved(
                    f"no valid label after one repair round: {problem}; allowed labels were {offered}",
                    content,
                    tally,
                    note,
                )
        label = chosen[0]
        candidates = chosen if most is not None else None
        confidence = label_confidence(tokens, content or "", label) if cfg.use_logprobs else None
        if key is not None and self._cache is not None:
            self._cache.put(key, {"label": label, "candidates": candidates, "confidence": confidence, "raw": content,
                                  "note": note})
        return ControllerAnswer(
            label=label,
            candidates=candidates,
            confidence=confidence,
            raw=content,
            reason=note,
            prompt_tokens=tally.prompt_tokens,
            completion_tokens=tally.completion_tokens,
            calls=tally.calls,
        )

    def _unresolved(self, reason: str, raw: str | None, tally: _Tally, note: str | None = None) -> ControllerAnswer:
        return ControllerAnswer(
            label=None,
            confidence=None,
            raw=raw,
            reason=f"{reason} ({note})" if note else reason,
            prompt_tokens=tally.prompt_tokens,
            completion_tokens=tally.completion_tokens,
            calls=tally.calls,
        )

    def _request(
        self, messages: list[dict[str, str]], fmt: dict[str, Any] | None, tally: _Tally,
        *, max_tokens: int | None = None, logprobs: bool = True,
    ) -> tuple[Any, str | None]:
        """One chat completion with retries: ``(completion, None)`` or ``(None, reason)``."""
        import openai

        cfg = self.config
        kwargs: dict[str, Any] = {
            "model": cfg.model,
            "messages": messages,
            "temperature": cfg.temperature,
            "max_tokens": max_tokens or cfg.max_tokens,
        }
        if fmt is not None:
            kwargs["response_format"] = fmt
        if cfg.use_logprobs and logprobs:
            kwargs["logprobs"] = True
        last = "no request made"
        for attempt in range(cfg.max_retries + 1):
            retry_after: float | None = None
            try:
                with self._slots:
                    tally.calls += 1
                    try:
                        completion = self._client.chat.completions.create(**kwargs)
                    except Exception:
                        self._meter.add_call()
                        raise
                usage = getattr(completion, "usage", None)
                prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
                completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
                tally.prompt_tokens += prompt_tokens
                tally.completion_tokens += completion_tokens
                self._meter.add_call(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
                return completion, None
            except openai.APITimeoutError:
                last = f"the endpoint {self._where} did not answer within controller.timeout_s={cfg.timeout_s}"
            except openai.APIConnectionError as exc:
                last = f"cannot reach the endpoint {self._where} ({_cause(exc)})"
            except openai.APIStatusError as exc:
                code = tally.status = exc.status_code
                last = f"the endpoint answered HTTP {code}: {_status_message(exc)}"
                if code in (401, 403):
                    return None, last + f" (not retried: check the key in ${cfg.api_key_env} and its permissions)"
                if not (code in (408, 409, 429) or code >= 500):
                    return None, last + " (not retried: fix the request or the endpoint settings)"
                retry_after = _retry_after(exc)
            except openai.APIError as exc:  # e.g. an unparseable response body
                return None, f"{_UNUSABLE}: {exc}"
            if attempt < cfg.max_retries:
                delay = min(_MAX_BACKOFF_S, cfg.backoff_s * (2**attempt)) * random.uniform(0.5, 1.5)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, _MAX_RETRY_AFTER_S))
                time.sleep(delay)
        return None, f"{_GAVE_UP} {cfg.max_retries + 1} attempts: {last}"

    # ------------------------------------------------------------------ structured answers

    def complete_json(
        self, messages: list[dict[str, str]], *, schema: dict[str, Any], name: str, max_tokens: int,
        use_schema: bool = True,
    ) -> "JSONAnswer":
        """One JSON answer for ``messages`` (a plan, say), asked with ``schema`` as structured output (per
        ``structured_output``; ``use_schema=False`` leaves the format to the prompt). Never raises for an
        endpoint failure: the answer says why it has no value, and whether the endpoint refused the
        schema (HTTP 400/422). The caller validates the content."""
        tally = _Tally()
        fmt = prompts.schema_format(self.config.structured_output, name, schema) if use_schema else None
        completion, reason = self._request(messages, fmt, tally, max_tokens=max_tokens, logprobs=False)
        answer = JSONAnswer(calls=tally.calls, prompt_tokens=tally.prompt_tokens,
                            completion_tokens=tally.completion_tokens)
        if completion is None:
            answer.reason = reason
            answer.refused_schema = fmt is not None and tally.status in (400, 422)
            return answer
        answer.raw, _ = _content_and_tokens(completion)
        try:
            answer.value = prompts.parse_json(answer.raw or "")
        except ValueError:
            answer.reason = "the answer is not JSON"
        return answer

    # ------------------------------------------------------------------ many rows

    def label_many(
        self,
        texts: Sequence[str],
        *,
        demonstrations: Sequence[Sequence[tuple[str, str]]] | None = None,
        choices: Sequence[Sequence[str] | None] | None = None,
        on_done: Callable[[int, ControllerAnswer], None] | None = None,
        admit: Callable[[int], str | None] | None = None,
    ) -> list[ControllerAnswer]:
        """Label every text; answers in input order. Never raises for a row.

        At most ``concurrency`` requests are in flight (the controller's slots), but rows are worked on by up
        to four times as many threads, so a row sleeping before a retry (a backoff, a Retry-After) holds no
        slot and no row behind it. ``demonstrations`` and ``choices``, when given, hold one entry per text.
        ``admit(i)``, when given, is called on the worker thread as row ``i`` starts: a reason (a budget spent,
        say) leaves the row unresolved and retryable without a request. ``on_done(i, answer)`` is called from
        the caller's thread as each row finishes.
        """
        n = len(texts)
        for name, per_row in (("demonstrations", demonstrations), ("choices", choices)):
            if per_row is not None and len(per_row) != n:
                raise ValueError(f"{name} has {len(per_row)} entries but texts has {n}; give one entry per text")
        if n == 0:
            return []

        def one(i: int) -> ControllerAnswer:
            stop = admit(i) if admit is not None else None
            if stop:
                return ControllerAnswer(label=None, confidence=None, raw=None, reason=stop, retryable=True)
            return self.label(texts[i], demonstrations=demonstrations[i] if demonstrations is not None else (),
                              choices=choices[i] if choices is not None else None)

        results: list[ControllerAnswer | None] = [None] * n
        pool = ThreadPoolExecutor(max_workers=min(4 * self.config.concurrency, n), thread_name_prefix="lw-controller")
        try:
            futures = {pool.submit(one, i): i for i in range(n)}
            for future in as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                if on_done is not None:
                    on_done(i, results[i])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
        if self._own_client:
            self._client.close()


def _rebuild(config: ControllerConfig, labels: list[str], descriptions: dict[str, str], instruction: str) -> Controller:
    return Controller(config, labels=labels, descriptions=descriptions, instruction=instruction)


def _content_and_tokens(completion: Any) -> tuple[str | None, list[tuple[str, float]]]:
    choices = getattr(completion, "choices", None) or []
    if not choices:
        return None, []
    choice = choices[0]
    content = getattr(choice.message, "content", None)
    logprobs = getattr(choice, "logprobs", None)
    items = getattr(logprobs, "content", None) or []
    return content, [(item.token, float(item.logprob)) for item in items]


def _status_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
    return str(getattr(exc, "message", exc))[:300]


def _retry_after(exc: Any) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
