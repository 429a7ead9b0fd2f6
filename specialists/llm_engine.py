"""The LLM engine: a local causal LM answering constrained label choices and greedy generations (no Ray).

:class:`LocalLLMEngine` holds a ``transformers`` model and tokenizer and answers ``choose`` (constrained
choice of one label out of an allowed list: one pass over the prompt, then one pass over the allowed labels'
token tree on the prompt's cached keys/values) and ``generate`` (greedy free text); ``label_logprobs``
returns every allowed label's log-prob from that same computation. The embedded controller
(``cluster/embedded_llm.py`` serves an engine over HTTP) and the ``lm_scorer`` specialist share it. The
maths of the constrained per-token log-probs is the plain function :func:`constrained_logprobs`.

Constrained choice. For an answer ``{"<field>": "<label>"}``, the prompt is the chat template plus the
assistant prefix ``{"<field>": "``; every allowed continuation ``<label>"}`` is scored and the one with the
highest total log-probability wins. The reported per-token log-probs are those of the model *conditioned on
the output staying inside the allowed set*: p(token | prefix, output in allowed). They sum, along the chosen
label, to log p(label | allowed set) = log p(label) - log sum over allowed labels of p(label'), so ``exp`` of
the sum is a calibrated-as-the-model-is confidence over exactly the offered labels.
"""

import json
import math
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from labelwright.specialists.errors import ConfigError


# --------------------------------------------------------------------------------------------------
# Engine results (shared by the real engine and fakes)
# --------------------------------------------------------------------------------------------------


class TokenLogprob(NamedTuple):
    """One token of the answer: its text, its log-prob, and the alternatives at that step (best first)."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


class ChoiceResult(NamedTuple):
    """A constrained choice; ``logprobs`` covers every token of ``{"<field>": "<label>"}``; ``scores``, where
    the engine gives them, holds log p(label | one of the allowed) for every allowed label, in their order."""

    label: str
    logprobs: list[TokenLogprob]
    prompt_tokens: int
    completion_tokens: int
    scores: list[float] | None = None


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
    # An engine that can score the first item of a JSON array (``{"<field>": ["<label>"``) also takes
    # ``array=True``; the endpoint answers candidate sets with it.

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


def answer_prefix(field: str, *, array: bool = False) -> str:
    """The text of the JSON answer up to the opening quote of the value: ``{"<field>": "``, or of the
    array's first item, ``{"<field>": ["``."""
    return json.dumps({field: [""] if array else ""})[: -3 if array else -2]


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
        """Load model ``name`` (see :mod:`labelwright.specialists.local_model`) in the precision ``backend``
        names and wrap it."""
        from labelwright.specialists.local_model import load_local_model

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
                      cancel: threading.Event | None = None, *, array: bool = False) -> "_LabelPass":
        """The model's log-probs of each ``<label>"}`` after the prompt and ``{"<field>": "`` (with ``array``,
        of each ``<label>"`` after ``{"<field>": ["``, the first item of a list): one pass over
        the prompt, then one pass over the labels' token tree (:func:`label_tree`) on the prompt's cached
        keys/values, each tree position seeing the prompt and its own ancestors only."""
        import torch

        prompt_ids = self._encode(self._prompt_text(messages))
        prefix_ids = self._encode(answer_prefix(field, array=array))
        # Continuation of each label as it appears in json.dumps output, closing quote (and brace) included.
        close = '"' if array else '"}'
        conts = [self._encode(json.dumps(label)[1:-1] + close) for label in labels]
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
               cancel: threading.Event | None = None, *, array: bool = False) -> ChoiceResult:
        """The most likely allowed label (``array``: as the first item of a JSON list), its tokens' log-probs
        with the alternatives at each step, and every allowed label's conditioned log-prob (``scores``)."""
        import torch

        if not allowed:
            raise ValueError("allowed labels are empty")
        labels = list(dict.fromkeys(allowed))
        prompt_ids, prefix_ids, conts, token_lps, dists = self._score_labels(messages, field, labels, cancel,
                                                                             array=array)
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
        return ChoiceResult(labels[best], entries, len(prompt_ids), len(prefix_ids) + len(chosen), totals)

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
