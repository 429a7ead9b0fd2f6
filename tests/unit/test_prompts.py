"""Prompt building and answer parsing: plain functions, no server."""

import pytest

from labelwright.specialists import prompts

LABELS = ["positive", "negative", "very negative"]


@pytest.mark.parametrize(
    "text",
    ["plain", "a </text> b", "<text>\nnested\n</text>", "AT&T &lt;3 <b>bold</b>", "  spaces \n\n lines  "],
)
def test_fence_round_trips_and_cannot_be_broken(text):
    fenced = prompts.fence(text)
    assert fenced.count("<text>") == 1 and fenced.count("</text>") == 1
    assert prompts.unfence(fenced) == text


def test_build_messages_truncates_and_orders_turns():
    messages, truncated = prompts.build_messages(
        "x" * 50, instruction="", labels=LABELS, demonstrations=[("d", "negative")], max_text_chars=20
    )
    assert truncated
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert prompts.unfence(messages[-1]["content"]) == "x" * 20
    assert "cut to its first 20 of 50 characters" in messages[-1]["content"]
    assert prompts.DEFAULT_INSTRUCTION in messages[0]["content"]
    assert all(f"- {label}" in messages[0]["content"] for label in LABELS)


@pytest.mark.parametrize(
    ("content", "label"),
    [
        ('{"label": "positive"}', "positive"),
        ('{"label": "Very  Negative"}', "very negative"),
        ('```json\n{"label": "negative"}\n```', "negative"),
        ('Here you go: {"label": "negative"}', "negative"),
        ('"positive"', "positive"),
        ("negative", "negative"),
    ],
)
def test_parse_answer_accepts(content, label):
    assert prompts.parse_answer(content, LABELS) == (label, None)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"label": "great"}', "'great' is not one of the allowed labels"),
        ('{"answer": "positive"}', 'no string "label" field'),
        ("probably positive-ish", "not the JSON object"),
        ("", "empty"),
        (None, "empty"),
        ("[1, 2]", "not the JSON object"),
    ],
)
def test_parse_answer_rejects_without_guessing(content, problem):
    label, found = prompts.parse_answer(content, LABELS)
    assert label is None and problem in found


def test_match_label_refuses_ambiguous_case_folds():
    assert prompts.match_label("OK", ["ok", "Ok"]) is None
    assert prompts.match_label("Ok", ["ok", "Ok"]) == "Ok"


def test_response_format_modes():
    schema = prompts.response_format("json_schema", LABELS)
    assert schema["json_schema"]["schema"]["properties"]["label"]["enum"] == LABELS
    assert schema["json_schema"]["schema"]["additionalProperties"] is False
    assert prompts.response_format("json_object", LABELS) == {"type": "json_object"}
    assert prompts.response_format("none", LABELS) is None
