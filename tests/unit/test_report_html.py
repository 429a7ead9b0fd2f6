"""The HTML report: a page that parses, its plots embedded PNGs, data escaped, and sections for what the report
has (gold, stages, active mode) and none for what it lacks."""

from __future__ import annotations

import base64
import html.parser
import json

import numpy as np
import pandas as pd
import pytest

from labelwright.orchestrator.report import build_report, html_report_path, publish_report
from labelwright.orchestrator.report_html import CONFUSION_MAX_LABELS, OTHER, write_html_report


class Page(html.parser.HTMLParser):
    def __init__(self, text: str):
        super().__init__()
        self.h2, self.images, self.tags, self._h2 = [], [], [], False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self._h2 = tag == "h2"
        if self._h2:
            self.h2.append("")

    def handle_endtag(self, tag):
        self._h2 = self._h2 and tag != "h2"

    def handle_data(self, data):
        if self._h2:
            self.h2[-1] += data


def page_of(path) -> Page:
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    for src in page.images:
        head = "data:image/png;base64,"
        assert src.startswith(head)
        assert base64.b64decode(src[len(head):], validate=True).startswith(b"\x89PNG\r\n\x1a\n")
    assert "<script" not in text and "https://" not in text and "<link" not in text  # nothing from elsewhere
    return page


def frame(n: int = 60, *, labels=("positive", "negative"), gold: bool = True, seed: int = 0) -> pd.DataFrame:
    """An output frame as the pipeline writes it (the columns the report reads)."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(labels, n)
    decided = rng.choice(["consensus", "controller", "combined", "unresolved"], n, p=[0.6, 0.25, 0.1, 0.05])
    label = np.where(rng.random(n) < 0.85, truth, rng.choice(labels, n)).astype(object)
    label[decided == "unresolved"] = None
    asked = np.isin(decided, ["controller", "combined", "unresolved"])
    df = pd.DataFrame({
        "row": range(n), "id": [f"r{i}" for i in range(n)], "text": [f"text {i}" for i in range(n)],
        "label": label, "decided_by": decided,
        "reason": np.where(decided == "unresolved", "endpoint failure: HTTP 500", None),
        "confidence": np.where(decided == "unresolved", np.nan, rng.uniform(0.4, 1.0, n)),
        "vote_tfidf": rng.choice(labels, n), "prompt_tokens": np.where(asked, 120, 0),
        "completion_tokens": np.where(asked, 6, 0), "llm_calls": asked.astype(int), "cached": False,
        "seed": False, "stage": rng.choice([0, 1], n),
    })
    if gold:
        df["gold"] = truth
    return df


def stages_block(*, gold: bool = True) -> dict:
    """``report['stages']`` as ``StagedLearning.report`` makes it (two stages, the second with a gate)."""
    stages = []
    for s, share in ((0, 0.42), (1, 0.25)):
        row = {"stage": s, "rows": 30, "hard_share": share, "llm_calls": 12, "llm_tokens": 1500, "new_rows": 20,
               "replay_rows": 0, "upto_seq": 19, "train_s": 3.2, "train_s_by_specialist": {"tfidf": 3.2},
               "swap_s": 0.4, "rolled_back": [], "failed": None, "versions": {"tfidf": f"s{s}"},
               "check": {"source": "gold", "rows": 40, "hard_share": share, "specialists": {"tfidf": 0.8 + s / 20},
                         "gate": {"kind": "route", "threshold": 0.9 if s else None}}}
        if gold:
            row.update(consensus_accuracy=0.9, accuracy=0.86)
        stages.append(row)
    return {"config": {"enabled": True}, "buffer_rows": 40, "plot": "x.stages.png", "stages": stages}


def report_for(df: pd.DataFrame, **extra) -> dict:
    return build_report(df, labels=sorted(set(df["label"].dropna()) | set(df.get("gold", pd.Series()).dropna())),
                        specialists=["tfidf"], rows_in=len(df), wall_s=12.0, label_s=8.0, price_prompt_per_1k=0.00015,
                        price_completion_per_1k=0.0006, timings={"seed": 1.0, "label": 8.0}, human_cost_per_row=0.036,
                        extra={"controller": {"model": "noisy-0.85", "base_url": "http://127.0.0.1:1/v1"},
                               "output": "/tmp/out.parquet", "run_dir": "/tmp/out.run", **extra})


PLAN = {"source": "controller", "file": "/tmp/out.run/plan.yaml", "specialists": ["tfidf_lr", "minilm_probe"],
        "kept": ["tfidf"], "voting_rule": "weighted", "notes": "short texts", "check": None,
        "llm": {"calls": 1, "prompt_tokens": 900, "completion_tokens": 80}}


def test_a_run_with_gold_has_every_section_and_its_plots(tmp_path):
    df = frame()
    report = report_for(df, stages=stages_block(), plan=PLAN, specialists={"tfidf": "/tmp/ckpt/tfidf/s1"},
                        voting={"rule": "weighted", "route": "measured", "threshold": 0.8})
    page = page_of(write_html_report(report, df, tmp_path / "r.html"))
    assert page.h2 == ["Summary", "Who decided", "Stages: LLM share and accuracy", "Labels",
                       "Confidence by who decided", "Against gold", "Cost", "The plan and the specialists"]
    # decided_by, stages, confidence, confusion matrix, cost (this run, the controller alone, people)
    assert len(page.images) == 5
    text = (tmp_path / "r.html").read_text()
    assert "accuracy (gold)" in text and "Confusion matrix" in text
    assert "tfidf_lr" in text and "cheaper than people" in text


def test_without_gold_the_page_says_so_and_draws_no_confusion_matrix(tmp_path):
    df = frame(gold=False)
    report = report_for(df, stages=stages_block(gold=False))
    assert "gold" not in report
    page = page_of(write_html_report(report, df, tmp_path / "r.html"))
    text = (tmp_path / "r.html").read_text()
    assert "no gold labels" in text and "Confusion matrix" not in text
    assert len(page.images) == 4  # decided_by, stages, confidence, cost
    assert "The plan and the specialists" not in page.h2  # not planned, nothing to say


def test_active_mode_shows_its_rounds_and_no_stages(tmp_path):
    df = frame()
    df["decided_by"] = np.where(df["llm_calls"] > 0, "controller", "model")
    df["round"] = np.where(df["llm_calls"] > 0, 1, None)
    rounds = [{"round": 0, "strategy": "random", "asked": 8, "labelled": 8, "calls": 8, "spent": 8, "kappa": None,
               "check_accuracy": 0.7},
              {"round": 1, "strategy": "entropy", "asked": 8, "labelled": 8, "calls": 8, "spent": 16, "kappa": 0.8,
               "check_accuracy": 0.8, "model_accuracy_before": 0.75},
              {"round": 1, "stopped": "budget spent", "kappa": 0.66, "spent": 16, "check_accuracy": 0.8}]
    report = report_for(df, mode="active", active={"acquisition": "entropy", "budget": 16, "spent": 16,
                                                   "rows_bought": 16, "rounds": rounds, "plot": "x.rounds.png",
                                                   "reweight": None, "model_accuracy_on_its_rows": 0.8})
    page = page_of(write_html_report(report, df, tmp_path / "r.html"))
    assert "Active mode: rounds (no stages in this mode)" in page.h2
    assert not any(h.startswith("Stages") for h in page.h2)
    assert len(page.images) == 5  # decided_by, rounds, confidence, confusion matrix, cost
    text = (tmp_path / "r.html").read_text()
    assert "round 1, stopped budget spent" in text  # why the rounds stopped: a note, not a row of the table


@pytest.mark.parametrize("report", [
    {}, {"decided_by": {"consensus": 3}},
    {"rows_out": 3, "llm": {}, "gold": {}, "stages": {"stages": []}, "people": None, "plan": None},
    {"stages": {"stages": [{"rows": 3}, {"stage": 1, "check": None}]}},
    {"mode": "active", "active": {"rounds": [{"round": 1}, {"round": 1, "stopped": "budget spent"}]}},
    {"reviews": {"file": "r.csv", "reviewed": 4, "changed_by_decided_by": {"consensus": 1}, "accuracy": None}},
])
def test_missing_blocks_and_no_frame_never_crash(tmp_path, report):
    page = page_of(write_html_report(report, None, tmp_path / "r.html"))
    assert "Summary" in page.h2 and len(page.images) <= 2


def test_strings_from_the_data_are_escaped(tmp_path):
    evil = "<script>alert(1)</script>"
    df = frame(labels=(evil, "b&c"))
    df.loc[df["decided_by"] == "unresolved", "reason"] = evil
    report = report_for(df, plan={**PLAN, "notes": evil}, specialists={evil: evil})
    path = write_html_report(report, df, tmp_path / "r.html")
    text = path.read_text()
    page_of(path)  # no <script tag anywhere
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "b&amp;c" in text


def test_a_confusion_matrix_of_many_labels_shows_the_most_frequent(tmp_path):
    labels = [f"intent_{i:02d}" for i in range(77)]
    df = frame(400, labels=labels)
    text = write_html_report(report_for(df), df, tmp_path / "r.html").read_text()
    assert f"the {CONFUSION_MAX_LABELS} most frequent gold labels are shown, the other" in text
    assert OTHER in text


def test_publish_report_writes_the_html_beside_the_json(tmp_path):
    df = frame()
    logged = []
    report = publish_report(report_for(df), report_path=tmp_path / "r.json", output=tmp_path / "o.parquet",
                            log=logged.append, frame=df)
    assert report["html"] == str(tmp_path / "r.html")
    assert json.loads((tmp_path / "r.json").read_text())["html"] == report["html"]
    assert len(page_of(tmp_path / "r.html").images) == 4  # no stages
    assert f"HTML report: {tmp_path / 'r.html'}" in logged[-1]
    assert html_report_path("a/report") == html_report_path("a/report.json") != html_report_path("a/report.html")
