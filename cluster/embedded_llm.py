"""The embedded local LLM: a small instruct model behind an OpenAI-compatible HTTP API on Ray Serve.

Three separate pieces, as in ``ray.serve.llm``:

1. Logic, no Ray: :class:`LocalLLMEngine` holds a ``transformers`` model and tokenizer and answers
   ``choose`` (constrained choice of one label out of an allowed list, scored in one batched forward pass
   over the prompt's cached keys/values) and ``generate`` (greedy free text); ``label_logprobs`` returns every
   allowed label's log-prob from that same pass (the ``lm_scorer`` specialist uses it). The maths of the
   constrained per-token log-probs is the plain function :func:`constrained_logprobs`.
2. Protocol: :func:`build_openai_app` turns any engine with those two methods into a FastAPI app speaking
   the OpenAI chat-completions shape (tests pass a fake engine).
3. Wiring: :class:`EmbeddedLLMConfig` and :func:`start_embedded_llm` deploy that app on the running Ray
   cluster under its own Serve application name and route prefix, and return the ``base_url`` for the
   ``openai`` client.

Constrained choice. For ``response_format`` = a JSON schema with one string property restricted by an
``enum``, the answer is ``{"<field>": "<label>"}``. The prompt is the chat template plus the assistant prefix
``{"<field>": "``; every allowed continuation ``<label>"}`` is scored and the one with the highest total
log-probability wins. The reported per-token log-probs are those of the model *conditioned on the output
staying inside the allowed set*: p(token | prefix, output in allowed). They sum, along the chosen label, to
log p(label | allowed set) = log p(label) - log sum over allowed labels of p(label'), so ``exp`` of the sum is
a calibrated-as-the-model-is confidence over exactly the offered labels.
"""

import asyncio
import json
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from labelwright.orchestrator.errors import ConfigError, ControllerError, LabelwrightError

APP_NAME = "labelwright-embedded-llm"
ROUTE_PREFIX = "/labelwright-llm"
MAX_TOP_LOGPROBS = 20


# --------------------------------------------------------------------------------------------------
# Engine results (shared by the real engine and fakes)
# --------------------------------------------------------------------------------------------------


class TokenLogprob(NamedTuple):
    """One token of the answer: its text, its log-prob, and the alternatives at that step (best first)."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


class ChoiceResult(NamedTuple):
    """A constrained choice; ``logprobs`` covers every token of ``{"<field>": "<label>"}``."""

    label: str
    logprobs: list[TokenLogprob]
    prompt_tokens: int
    completion_tokens: int


class Generation(NamedTuple):
    """Free text from greedy decoding; ``logprobs`` covers every generated token."""

    text: str
    logprobs: list[TokenLogprob]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"


class Engine(Protocol):
    """What :func:`build_openai_app` needs from an engine."""

    model_name: str

    def choose(self, messages: list[dict], field: str, allowed: list[str],
               cancel: threading.Event | None = None) -> ChoiceResult: ...

    def generate(self, messages: list[dict], max_tokens: int, cancel: threading.Event | None = None) -> Generation: ...


class RequestCancelled(Exception):
    """The caller went away (``cancel`` was set) before the engine got to its request."""


# --------------------------------------------------------------------------------------------------
# Maths: per-token log-probs conditioned on staying inside the allowed set
# --------------------------------------------------------------------------------------------------


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


def constrained_logprobs(
    sequences: Sequence[Sequence[int]], token_logprobs: Sequence[Sequence[float]]
) -> tuple[list[float], list[list[float]], dict[tuple[int, ...], float]]:
    """Condition token log-probs on the output being one of ``sequences``.

    ``token_logprobs[i][j]`` is the model's unconstrained log p(sequences[i][j] | prompt, sequences[i][:j]).
    Returns ``(totals, steps, prefix_mass)``:

    - ``totals[i]`` = log p(sequence i | allowed set) = log p(seq_i) - logsumexp_k log p(seq_k);
    - ``steps[i][j]`` = log p(token j | prompt, tokens before it, output in allowed set); the steps of a
      sequence sum to its total;
    - ``prefix_mass[prefix]`` = log of the allowed-set probability mass below ``prefix`` (conditional on
      the prefix), so the conditioned log-prob of appending token ``t`` to ``prefix`` with model log-prob
      ``lp`` is ``lp + prefix_mass[prefix + (t,)] - prefix_mass[prefix]``.

    Sequences must be distinct and non-empty.
    """
    if len(sequences) != len(token_logprobs):
        raise ValueError("sequences and token_logprobs differ in length")
    seqs = [tuple(s) for s in sequences]
    if len(set(seqs)) != len(seqs) or any(len(s) == 0 for s in seqs):
        raise ValueError("sequences must be distinct and non-empty")
    # Suffix sums: log p(seq_i[j:] | seq_i[:j]).
    suffix = []
    for lps in token_logprobs:
        acc, out = 0.0, [0.0] * (len(lps) + 1)
        for j in range(len(lps) - 1, -1, -1):
            acc += lps[j]
            out[j] = acc
        suffix.append(out)
    members: dict[tuple[int, ...], list[float]] = {}
    for seq, suf in zip(seqs, suffix):
        for j in range(len(seq) + 1):
            members.setdefault(seq[:j], []).append(suf[j])
    prefix_mass = {prefix: _logsumexp(vals) for prefix, vals in members.items()}
    log_z = prefix_mass[()]
    totals = [suf[0] - log_z for suf in suffix]
    steps = []
    for seq, lps, total in zip(seqs, token_logprobs, totals):
        row = [lps[j] + prefix_mass[seq[: j + 1]] - prefix_mass[seq[:j]] for j in range(len(seq))]
        # A sequence that is a strict prefix of another has mass > its own at its end; put the
        # difference on its last step so the row always sums to the exact total.
        row[-1] += total - sum(row)
        steps.append(row)
    return totals, steps, prefix_mass


# --------------------------------------------------------------------------------------------------
# The engine (no Ray)
# --------------------------------------------------------------------------------------------------


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "" if content is None else str(content)


class _LabelPass(NamedTuple):
    """What one scoring pass over the allowed labels yields (see ``LocalLLMEngine._score_labels``)."""

    prompt_ids: list[int]
    prefix_ids: list[int]
    conts: list[list[int]]  # the tokens of each label's continuation ``<label>"}``
    token_lps: list[list[float]]  # the model's unconstrained log-prob of each of those tokens
    dists: dict  # continuation prefix (a tuple of tokens, () first) -> log-probs of the next token (a tensor)


def label_tree(conts: Sequence[Sequence[int]]) -> tuple[list[int], list[int], dict[tuple[int, ...], int]]:
    """The positions that scoring ``conts`` after a prompt needs, as one sequence: every non-empty proper
    prefix of a continuation once (shared prefixes once), in first-seen order.

    Returns ``(tokens, parents, index)``: position ``i`` holds the last token of its prefix, ``parents[i]`` is
    the position of the prefix one token shorter (-1: the prompt), ``index`` maps each prefix to its
    position. The next-token distribution at a prefix's position gives the log-prob of every continuation
    token after it, so ``len(tokens)`` positions score every label (a label's first token is scored from
    the prompt's last position).
    """
    tokens: list[int] = []
    parents: list[int] = []
    index: dict[tuple[int, ...], int] = {}
    for cont in conts:
        for j in range(1, len(cont)):
            prefix = tuple(cont[:j])
            if prefix not in index:
                index[prefix] = len(tokens)
                tokens.append(cont[j - 1])
                parents.append(index.get(prefix[:-1], -1))
    return tokens, parents, index


# Fewer shared prompt tokens than this are computed again rather than taken from the last prompt's cache.
MIN_REUSE = 16


def _crop(cache, length: int) -> None:
    """Cut a key/value cache back to its first ``length`` positions (negative counts: transformers 5.x
    refuses absolute lengths, 4.x takes both)."""
    drop = cache.get_seq_length() - length
    if drop > 0:
        cache.crop(-drop)


def _raise_if_cancelled(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise RequestCancelled("the request was cancelled by its caller")


def _cache_kwarg(model) -> str:
    """The name forward() takes the key/value cache by: ``cache`` from transformers 5.24 (where
    ``past_key_values`` warns until it goes in 5.40), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    """The key/value cache of a forward's output, under either name (see :func:`_cache_kwarg`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def served_name(model: str, precision: str) -> str:
    """The name the endpoint serves ``model`` under when it runs in ``precision``: ``<model>@<precision>``."""
    return f"{model}@{precision}"


def answer_prefix(field: str) -> str:
    """The text of the JSON answer up to the opening quote of the value: ``{"<field>": "``."""
    return json.dumps({field: ""})[:-2]


class LocalLLMEngine:
    """A causal LM and its tokenizer, answering constrained choices and greedy generations on CPU.

    Thread-safe: one request runs at a time (a lock around the forward passes); torch's own threads do
    the parallel work.
    """

    def __init__(self, model: Any, tokenizer: Any, *, model_name: str) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError(
                f"model {model_name!r} has no chat template; the embedded LLM needs an instruct model"
            )
        self.model = model.eval()
        self._cache_kw = _cache_kwarg(model)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self._lock = threading.Lock()
        # The last prompt's token ids and keys/values: the next prompt of the same task shares its
        # system message (instruction, label list, rules), which is then not computed again.
        self._last: tuple[list[int], Any] | None = None
        self.reused_tokens = 0  # prompt tokens served from that cache, for measurement

    @classmethod
    def load(
        cls, name: str, *, cache_dir: str | None = None, torch_threads: int | None = None, backend: str = "auto"
    ) -> "LocalLLMEngine":
        """Load model ``name`` (see :mod:`labelwright.cluster.local_model`) in the precision ``backend``
        names and wrap it."""
        from labelwright.cluster.local_model import load_local_model

        model, tokenizer = load_local_model(name, cache_dir=cache_dir, torch_threads=torch_threads, backend=backend)
        # The precision is part of the served model's name: answers differ between precisions on near ties,
        # and the controller's cache keys on the model name.
        return cls(model, tokenizer, model_name=served_name(name, str(model.dtype).removeprefix("torch.")))

    # -- helpers ---------------------------------------------------------------------------------
    def _prompt_text(self, messages: list[dict]) -> str:
        clean = [{"role": m["role"], "content": _message_text(m.get("content"))} for m in messages]
        return self.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # -- constrained choice ----------------------------------------------------------------------
    def _score_labels(self, messages: list[dict], field: str, labels: list[str],
                      cancel: threading.Event | None = None) -> "_LabelPass":
        """The model's log-probs of each ``<label>"}`` after the prompt and ``{"<field>": "``: one pass over
        the prompt, then one pass over the labels' token tree (:func:`label_tree`) on the prompt's cached
        keys/values, each tree position seeing the prompt and its own ancestors only."""
        import torch

        prompt_ids = self._encode(self._prompt_text(messages))
        prefix_ids = self._encode(answer_prefix(field))
        # Continuation of each label as it appears in json.dumps output, closing quote and brace included.
        conts = [self._encode(json.dumps(label)[1:-1] + '"}') for label in labels]
        if len({tuple(c) for c in conts}) != len(conts):
            raise ValueError("two allowed labels have the same tokens")
        tokens, parents, index = label_tree(conts)
        device = self.model.device
        ids = prompt_ids + prefix_ids
        n, length = len(tokens), len(ids)
        depth = [0] * n
        visible = torch.zeros(1, 1, n, length + n, dtype=torch.bool, device=device)
        visible[..., :length] = True
        for i, parent in enumerate(parents):
            depth[i] = 0 if parent < 0 else depth[parent] + 1
            visible[0, 0, i, length + i] = True
            if parent >= 0:
                visible[0, 0, i, length:] |= visible[0, 0, parent, length:]

        with self._lock, torch.inference_mode():
            _raise_if_cancelled(cancel)  # waited in the queue behind other requests: the caller may be gone
            out = self._prefill(ids)
            cache = _cache_of(out)
            self._last = None  # the tree pass extends the cache; it is cropped back below
            logits = self.model(
                torch.tensor([tokens], device=device), attention_mask=visible,
                position_ids=torch.tensor([[length + d for d in depth]], device=device),
                **{self._cache_kw: cache}, use_cache=True,
            ).logits
            _crop(cache, length)
            self._last = (ids, cache)
            dists = {(): torch.log_softmax(out.logits[0, -1].float(), dim=-1)}  # distribution of token 0
            tree = torch.log_softmax(logits[0].float(), dim=-1)
            dists.update((prefix, tree[i]) for prefix, i in index.items())
            token_lps = [[dists[tuple(cont[:j])][cont[j]].item() for j in range(len(cont))] for cont in conts]
        return _LabelPass(prompt_ids, prefix_ids, conts, token_lps, dists)

    def _prefill(self, ids: list[int]):
        """``model(ids)`` keeping only the last position's logits, reusing the keys/values of the longest
        prefix shared with the previous prompt (at least ``MIN_REUSE`` tokens), whose cache it takes over
        (the caller puts it back in ``_last``). Call under the lock."""
        import torch

        device = self.model.device
        last, self._last = self._last, None  # a failure below must not leave a half-extended cache behind
        reuse = 0
        if last is not None:
            n = 0
            for a, b in zip(last[0], ids):
                if a != b:
                    break
                n += 1
            reuse = min(n, len(ids) - 1)  # the last token must be run to get its logits
        if reuse >= MIN_REUSE:
            cache = last[1]
            _crop(cache, reuse)
            out = self.model(torch.tensor([ids[reuse:]], device=device), **{self._cache_kw: cache}, use_cache=True,
                             logits_to_keep=1)
            self.reused_tokens += reuse
        else:
            # Only the last position's logits are needed: skipping the vocabulary projection for the
            # rest of the prompt saves about a quarter of the prefill on a 0.5B model.
            out = self.model(torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
        return out

    def label_logprobs(self, messages: list[dict], field: str, allowed: list[str]) -> list[float]:
        """log p(label | the answer is one of ``allowed``) for each label of ``allowed``, in its order.

        The prompt, answer format and scoring are those of :meth:`choose` (whose label is the argmax of
        these); ``exp`` of the values sums to 1. ``allowed`` must be distinct.
        """
        if not allowed:
            raise ValueError("allowed labels are empty")
        if len(set(allowed)) != len(allowed):
            raise ValueError("allowed labels repeat; give each once")
        scored = self._score_labels(messages, field, list(allowed))
        totals, _, _ = constrained_logprobs(scored.conts, scored.token_lps)
        return totals

    def choose(self, messages: list[dict], field: str, allowed: list[str],
               cancel: threading.Event | None = None) -> ChoiceResult:
        import torch

        if not allowed:
            raise ValueError("allowed labels are empty")
        labels = list(dict.fromkeys(allowed))
        prompt_ids, prefix_ids, conts, token_lps, dists = self._score_labels(messages, field, labels, cancel)
        totals, steps, mass = constrained_logprobs(conts, token_lps)
        best = max(range(len(labels)), key=lambda i: sum(token_lps[i]))
        # Alternatives at each step of the chosen path: the children of the node, conditioned.
        chosen = conts[best]
        tops = []
        with torch.inference_mode():
            for j in range(len(chosen)):
                node = tuple(chosen[:j])
                dist = dists[node]
                children = {c[j] for c in conts if len(c) > j and tuple(c[:j]) == node}
                alts = [
                    (self._token_text(t), dist[t].item() + mass[node + (t,)] - mass[node]) for t in children
                ]
                tops.append(sorted(alts, key=lambda a: -a[1]))

        entries = [TokenLogprob(self._token_text(t), 0.0, [(self._token_text(t), 0.0)]) for t in prefix_ids]
        entries += [
            TokenLogprob(self._token_text(t), lp, top) for t, lp, top in zip(chosen, steps[best], tops)
        ]
        return ChoiceResult(labels[best], entries, len(prompt_ids), len(prefix_ids) + len(chosen))

    # -- free generation -------------------------------------------------------------------------
    def generate(self, messages: list[dict], max_tokens: int, cancel: threading.Event | None = None) -> Generation:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _Cancelled(StoppingCriteria):  # checked after every token: a long answer stops when its caller goes
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel is not None and cancel.is_set(), dtype=torch.bool)

        prompt_ids = self._encode(self._prompt_text(messages))
        eos = self.model.generation_config.eos_token_id
        with self._lock, torch.inference_mode():
            _raise_if_cancelled(cancel)
            out = self.model.generate(
                torch.tensor([prompt_ids]),
                stopping_criteria=StoppingCriteriaList([_Cancelled()]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=self.tokenizer.pad_token_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        new = out.sequences[0, len(prompt_ids):].tolist()
        eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        finish = "length"
        if new and new[-1] in eos_ids:
            new, finish = new[:-1], "stop"
        entries = []
        for t, scores in zip(new, out.scores):
            lp = torch.log_softmax(scores[0].float(), dim=-1)
            entries.append(TokenLogprob(self._token_text(t), lp[t].item(), [(self._token_text(t), lp[t].item())]))
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Generation(text, entries, len(prompt_ids), len(new), finish)


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


def parse_enum_schema(response_format: dict[str, Any] | None) -> tuple[str, list[str]] | None:
    """``(field, allowed)`` for a one-field string-enum JSON schema, None for no/``text`` format.

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
            '"enum": [...]}}, "required": ["<field>"]}')
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise _BadRequest(f"unsupported json_schema: {hint}", "response_format.json_schema.schema")
    props = schema.get("properties")
    if not isinstance(props, dict) or len(props) != 1:
        raise _BadRequest(f"unsupported json_schema (need exactly one property): {hint}",
                          "response_format.json_schema.schema.properties")
    ((field, prop),) = props.items()
    if not isinstance(prop, dict) or prop.get("type", "string") != "string" or "enum" not in prop:
        raise _BadRequest(f"unsupported json_schema (property {field!r} must be a string enum): {hint}",
                          f"response_format.json_schema.schema.properties.{field}")
    allowed = prop["enum"]
    if not isinstance(allowed, list) or not allowed or not all(isinstance(v, str) and v for v in allowed):
        raise _BadRequest(f"enum of property {field!r} must be a non-empty list of non-empty strings",
                          f"response_format.json_schema.schema.properties.{field}.enum")
    if len(set(allowed)) != len(allowed):
        raise _BadRequest(f"enum of property {field!r} has duplicate labels",
                          f"response_format.json_schema.schema.properties.{field}.enum")
    return field, allowed


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


def build_openai_app(engine: Engine, *, default_max_tokens: int = 256):
    """A FastAPI app serving ``GET /v1/models`` and ``POST /v1/chat/completions`` from ``engine``."""
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
            if constrained is not None:
                field, allowed = constrained
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
    # cluster/local_model.py and benchmarks/embedded_backends.py for what each costs and answers.
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
            self._engine = make_engine(cfg)

        def __serve_build_asgi_app__(self):
            return build_openai_app(self._engine)

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
    server = uvicorn.Server(uvicorn.Config(build_openai_app(engine), host=config.host, port=config.port,
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
    from labelwright.orchestrator.errors import ModelAssetError

    text = str(exc)
    if "ModelAssetError" in text or isinstance(exc, ModelAssetError):
        return ModelAssetError(f"embedded LLM {config.model!r} could not load its model: {text}")
    if "ConfigError" in text:
        return ConfigError(f"embedded LLM {config.model!r}: {text}")
    return ControllerError(f"embedded LLM {config.model!r} failed to deploy as Serve app "
                           f"{config.app_name!r}: {text}")
