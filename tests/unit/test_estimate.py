"""The estimate: the controller's real prompts counted, priced, and not one request sent."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from labelwright.orchestrator.cli import main
from labelwright.orchestrator.estimate import PER_MESSAGE_TOKENS, estimate, render, summary_line
from labelwright.orchestrator.spec import load_task
from labelwright.specialists import prompts
from labelwright.specialists.errors import ConfigError
from tests.fake_openai import FakeOpenAI, constant


class Words:
    """A tokenizer that counts words: no chat template, so messages are counted one by one."""

    chat_template = None

    def encode(self, text, add_special_tokens=False, verbose=True):
        return text.split()


WORDS = (Words(), "words")


@pytest.fixture
def rows(tmp_path):
    texts = [f"review number {i} " + "good " * (i % 7) for i in range(1000)] + ["", "   "]
    path = tmp_path / "in.csv"
    pd.DataFrame({"text": texts}).to_csv(path, index=False)
    return path


def spec_for(**extra):
    data = {"labels": ["positive", "negative"], "seed": {"size": 40}, "voting": {"reference_rows": 100},
            "controller": {"num_demonstrations": 0, "price_prompt_per_1k": 0.15, "price_completion_per_1k": 0.6}}
    for k, v in extra.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return load_task(None, data)


def test_every_sampled_prompt_is_counted_as_the_controller_would_send_it(rows):
    spec = spec_for()
    est = estimate([rows], spec, tokenizer=WORDS, sample_rows=5000)  # the whole input: the mean is exact
    texts = [t for t in pd.read_csv(rows, keep_default_na=False)["text"] if t.strip()]
    want = 0
    for t in texts:
        messages, _ = prompts.build_messages(t, instruction=spec.instruction, labels=spec.label_names,
                                             max_text_chars=spec.controller.max_text_chars)
        want += sum(len(m["content"].split()) + PER_MESSAGE_TOKENS for m in messages)
    assert est.rows == 1002 and est.votable_rows == 1000 and est.sample_rows == 1000
    assert est.prompt_tokens_per_row == pytest.approx(want / 1000, abs=0.05)
    answer = len(prompts.answer_json("positive").split())
    assert est.completion_tokens_per_row == answer
    a = est.all_rows
    assert a.rows == 1000 and a.prompt_tokens == round(want)
    assert a.cost_usd == pytest.approx(a.prompt_tokens / 1000 * 0.15 + a.completion_tokens / 1000 * 0.6, abs=1e-6)


def test_the_pipeline_is_the_seed_the_reference_rows_and_the_hard_share_of_the_rest(rows):
    est = estimate([rows], spec_for(), tokenizer=WORDS, hard_share=0.3)
    assert (est.seed_rows, est.reference_rows) == (40, 100)
    assert est.hard_rows == round((1000 - 140) * 0.3) and est.pipeline.rows == 140 + est.hard_rows
    assert est.hard_share_source.startswith("given")
    assumed = estimate([rows], spec_for(), tokenizer=WORDS)
    assert assumed.hard_share == 0.5 and assumed.hard_share_source.startswith("assumed")
    assert "assumed" in summary_line(assumed)
    # an audit takes at most a quarter of the input
    small = estimate([rows], spec_for(), tokenizer=WORDS, limit=200)
    assert small.rows == 200 and small.reference_rows == 50


def test_a_budget_caps_what_the_estimate_spends_and_says_so(rows):
    est = estimate([rows], spec_for(budget={"max_llm_calls": 100}), tokenizer=WORDS, hard_share=1.0)
    # the rows asked up front take half the budget, in proportion; the hard rows the rest
    assert est.seed_rows + est.reference_rows <= 50 and est.pipeline.rows == 100
    assert any("budget.max_llm_calls=100" in n for n in est.notes)
    active = estimate([rows], spec_for(mode="active", budget={"max_llm_calls": 100}), tokenizer=WORDS)
    assert active.pipeline.rows == 100 and active.seed_rows == 0


def test_without_prices_tokens_only_and_a_bad_share_is_an_error(rows):
    spec = spec_for(controller={"price_prompt_per_1k": 0.0, "price_completion_per_1k": 0.0})
    est = estimate([rows], spec, tokenizer=WORDS)
    assert est.all_rows.cost_usd is None and any("no prices" in n for n in est.notes)
    assert est.people_cost_usd == pytest.approx(1000 * 0.036)
    assert any("people" in line for line in render(est))
    with pytest.raises(ConfigError, match="hard-share"):
        estimate([rows], spec, tokenizer=WORDS, hard_share=1.5)


def test_the_command_spends_no_llm_call(rows, tmp_path, capsys):
    with FakeOpenAI(constant('{"label": "positive"}')) as server:
        task = tmp_path / "task.yaml"
        task.write_text(f"labels: [positive, negative]\ncontroller: {{base_url: '{server.base_url}', "
                        f"model: '{server.model}', price_prompt_per_1k: 0.15, price_completion_per_1k: 0.6}}\n")
        out = tmp_path / "estimate.json"
        assert main(["estimate", str(rows), "--task", str(task), "--json", str(out), "--hard-share", "0.4"]) == 0
        assert server.requests == []
    printed = capsys.readouterr().out
    assert "every row by the controller" in printed and "the pipeline" in printed
    saved = json.loads(out.read_text())
    assert saved["votable_rows"] == 1000 and saved["hard_share"] == 0.4 and saved["all_rows"]["cost_usd"] > 0


class Templated(Words):
    """A tokenizer with a chat template: the request is counted whole, as the template lays it out."""

    chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert not tokenize and add_generation_prompt
        return " ".join(f"<|{m['role']}|> {m['content']}" for m in messages) + " <|assistant|>"


def test_a_chat_template_lays_the_request_out_before_it_is_counted(rows):
    spec = spec_for(controller={"num_demonstrations": 4})
    plain = estimate([rows], spec, tokenizer=WORDS, sample_rows=50)
    templated = estimate([rows], spec, tokenizer=(Templated(), "templated"), sample_rows=50)
    # 10 messages (system, 4 demonstrations and their answers, the row): a role token each instead of 4,
    # and one to start the answer
    assert templated.prompt_tokens_per_row == pytest.approx(plain.prompt_tokens_per_row - 10 * 3 + 1)


def test_seed_rows_are_counted_without_demonstrations(rows):
    est = estimate([rows], spec_for(controller={"num_demonstrations": 4}), tokenizer=WORDS, hard_share=0.0)
    assert est.prompt_tokens_per_seed_row < est.prompt_tokens_per_row
    p = est.pipeline
    want = est.seed_rows * est.prompt_tokens_per_seed_row + est.reference_rows * est.prompt_tokens_per_row
    assert p.rows == 140 and p.prompt_tokens == pytest.approx(want, abs=0.05 * 140)  # per-row means are rounded


def test_zero_shot_specialists_of_the_task_measure_the_hard_share_on_the_sample(datasets_dir, tmp_path):
    data = pd.read_csv(datasets_dir / "movie_sentiment" / "test.csv").head(60)
    path = tmp_path / "movie.csv"
    data[["text"]].to_csv(path, index=False)
    spec = spec_for(specialists=[{"name": "zs", "kind": "embedding_zero_shot"}], voting={"threshold": 0.6})
    est = estimate([path], spec, tokenizer=WORDS)
    assert est.hard_share_source.startswith("measured") and "zs" in est.hard_share_source
    assert 0.0 < est.hard_share < 1.0
    assert est.hard_rows == round((60 - est.seed_rows - est.reference_rows) * est.hard_share)
    # a trainable specialist cannot say anything before it is trained: the assumption stands
    spec = spec_for(specialists=[{"name": "tfidf", "kind": "tfidf_linear"}])
    assert estimate([path], spec, tokenizer=WORDS).hard_share_source.startswith("assumed")
