"""The stage scheduler without Ray: buffer filling, the trigger, a swap, a failed stage, resume."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest

import labelwright.orchestrator.learning as learning_mod
from labelwright.orchestrator.learning import StagedLearning, StageGate
from labelwright.orchestrator.reference import gold_check_set
from labelwright.orchestrator.spec import load_task
from labelwright.training.stage import CheckSet, train_stage

LABELS = ["negative", "positive"]


class FakeGate:
    """Stands in for the StageGate actor: records close/open calls."""

    def __init__(self):
        self.calls = []
        outer = self

        class _M:
            def __init__(self, name):
                self.name = name

            def remote(self):
                outer.calls.append(self.name)

        self.open, self.close = _M("open"), _M("close")
        self.thresholds = []

        class _Set:
            def remote(self, versions, threshold, stack=None):
                outer.calls.append("set_threshold")
                outer.thresholds.append((dict(versions), threshold))

        self.set_threshold = _Set()


@pytest.fixture(scope="module")
def movie(datasets_dir):
    return pd.read_csv(datasets_dir / "movie_sentiment" / "train.csv").head(400)


def make(spec, tmp_path, movie, swaps, gate=None):
    seed = movie.iloc[:60]
    ck = train_stage(spec.specialists, seed["text"].tolist(), seed["label"].tolist(), label_names=LABELS,
                     run_dir=tmp_path, stage=0, log=lambda m: None)
    held = movie.iloc[340:400]
    return StagedLearning(spec, run_dir=tmp_path, seed_texts=seed["text"].tolist(), seed_labels=seed["label"].tolist(),
                          stage0=ck, stage0_train_s=0.1, check=CheckSet(held["text"].tolist(), held["label"].tolist(), "gold"),
                          exclude_rows=set(range(340, 400)), total_rows=400, gpu=False, swap=swaps.append,
                          log=lambda m: None, gate=gate)


def batch(movie, start, stop, decided="controller"):
    part = movie.iloc[start:stop]
    return pd.DataFrame({"row": range(start, stop), "id": [str(i) for i in range(start, stop)],
                         "text": part["text"].tolist(), "label": part["label"].tolist(), "confidence": 0.9,
                         "decided_by": decided, "seed": False})


def wait_idle(learning):
    deadline = time.monotonic() + 120
    while learning.training:
        assert time.monotonic() < deadline
        time.sleep(0.05)
        learning.poll()


def test_a_stage_starts_swaps_and_is_recorded(tmp_path, movie):
    spec = load_task(None, {"labels": LABELS, "specialists": [{"name": "tfidf", "kind": "tfidf_linear"}],
                            "stages": {"every_rows": 50, "wait": True}})
    swaps, gate = [], FakeGate()
    learning = make(spec, tmp_path, movie, swaps, gate)
    learning.observe(batch(movie, 60, 100))
    assert not learning.training and len(learning.buffer) == 40  # under every_rows
    learning.observe(batch(movie, 100, 120, decided="consensus"))  # consensus rows are not buffered
    learning.observe(batch(movie, 120, 140))
    assert learning.training and gate.calls == ["close"]
    wait_idle(learning)
    assert learning.stage == 1 and gate.calls == ["close", "open"]
    assert swaps == [{"tfidf": str(tmp_path / "checkpoints" / "tfidf" / "stage-1")}] or learning.records[1]["rolled_back"]
    rec = json.loads((tmp_path / "stages.json").read_text())
    assert [r["stage"] for r in rec] == [0, 1] and rec[1]["new_rows"] == 60 and rec[1]["upto_seq"] == 59
    # held-out gold rows never reach the buffer
    learning.observe(batch(movie, 340, 400))
    assert len(learning.buffer) == 60
    learning.finish()

    # a resumed run picks up the recorded stage and the buffer position
    again = make(spec, tmp_path, movie, [])
    assert again.stage == 1 and again.deployed == learning.deployed and len(again.buffer) == 60
    again.finish()


def test_a_failed_stage_keeps_the_deployed_specialists_and_reopens_voting(tmp_path, movie, monkeypatch):
    spec = load_task(None, {"labels": LABELS, "specialists": [{"name": "tfidf", "kind": "tfidf_linear"}],
                            "stages": {"every_rows": 20, "wait": True}})

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory on the Train worker")

    monkeypatch.setattr(learning_mod, "run_stage", broken)
    swaps, gate = [], FakeGate()
    learning = make(spec, tmp_path, movie, swaps, gate)
    deployed = dict(learning.deployed)
    learning.observe(batch(movie, 60, 90))
    wait_idle(learning)
    assert gate.calls == ["close", "open"] and swaps == []
    assert learning.deployed == deployed and learning.records[-1]["failed"].startswith("RuntimeError")
    # the next stage waits for new rows instead of retrying at once
    learning.observe(batch(movie, 90, 95))
    assert not learning.training
    learning.finish()


def test_every_fraction_starts_a_stage_per_share_of_the_input(tmp_path, movie):
    spec = load_task(None, {"labels": LABELS, "specialists": [{"name": "tfidf", "kind": "tfidf_linear"}],
                            "stages": {"every_rows": None, "every_fraction": 0.25}})
    learning = make(spec, tmp_path, movie, [])
    learning.observe(batch(movie, 60, 140, decided="consensus"))  # 80 rows seen, no new controller rows
    assert not learning.training
    learning.observe(batch(movie, 140, 165))  # 105 rows seen >= 25% of 400, new rows present
    assert learning.training
    wait_idle(learning)
    learning.finish()


def test_calibrated_thresholds_are_published_for_stage_0_and_before_each_swap(tmp_path, movie, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "get", lambda ref: ref)  # the fake gate answers at once
    spec = load_task(None, {"labels": LABELS, "specialists": [{"name": "tfidf", "kind": "tfidf_linear"},
                                                              {"name": "tfidf2", "kind": "tfidf_linear", "l2": 10.0}],
                            "voting": {"target_accuracy": 0.7}, "stages": {"every_rows": 50}})
    gate = FakeGate()
    swaps = []
    learning = make(spec, tmp_path, movie, swaps, gate)
    fit = learning.records[0]["check"]["gate"]
    assert fit["rows"] == 60 and fit["target_accuracy"] == 0.7
    assert fit["threshold"] is None or fit["accuracy"] >= 0.7
    assert gate.thresholds == [(learning.records[0]["versions"], fit["threshold"])]

    swap_order = []
    learning.swap_fn = lambda changed: swap_order.append(("swap", len(gate.thresholds)))
    learning.observe(batch(movie, 60, 120))
    wait_idle(learning)
    rec = learning.records[1]
    assert rec["check"]["gate"]["rows"] == 60
    assert gate.thresholds[-1] == (rec["versions"], rec["check"]["gate"]["threshold"])
    if swap_order:  # the stage's threshold was there before its weights were swapped in
        assert swap_order == [("swap", 2)]
    assert gate.calls.count("close") == 0  # no stages.wait: voting never paused
    learning.finish()


def test_stage_gate_threshold_for_exact_mixed_and_unknown_versions():
    import asyncio

    async def scenario():
        g = StageGate()
        await g.set_threshold({"a": "a0", "b": "b0"}, 0.6)
        await g.set_threshold({"a": "a1", "b": "b1"}, 0.8, {"a": [1.0, 1.0], "b": [0.0, 0.0]})
        await g.set_threshold({"a": "a2", "b": "b2"}, None)
        assert await g.threshold_for({"a": "a1", "b": "b1"}) == (True, 0.8, {"a": [1.0, 1.0], "b": [0.0, 0.0]})
        assert await g.threshold_for({"a": "a0", "b": "b0"}) == (True, 0.6, None)
        assert (await g.threshold_for({"a": "a1", "b": "b0"}))[:2] == (True, 0.8)  # mid-swap: the stricter one
        assert await g.threshold_for({"a": "a2", "b": "b1"}) == (True, None, None)  # None settles nothing: strictest
        assert await g.threshold_for({"a": "x", "b": "y"}) == (False, None, None)
        await g.set_threshold({"a": "a1", "b": "b1"}, 0.5)  # recalibrated (a rolled-back stage): replaced
        assert await g.threshold_for({"a": "a1", "b": "b1"}) == (True, 0.5, None)

    asyncio.run(scenario())


def test_gold_check_set_is_fixed_skips_seed_and_unlabelled_rows_and_keeps_three_quarters_to_train(tmp_path):
    from types import SimpleNamespace

    shards = []
    for k in range(2):  # 2 shards x 50 rows; every 10th row has no gold, row 3 is skipped as empty
        rows = range(50 * k, 50 * k + 50)
        d = pd.DataFrame({"row": list(rows), "id": [f"r{r}" for r in rows], "text": [f"text {r}" for r in rows],
                          "gold": [None if r % 10 == 0 else "a" for r in rows],
                          "skip_reason": ["empty text" if r == 3 else None for r in rows]})
        d.to_parquet(tmp_path / f"s{k}.parquet")
        shards.append(SimpleNamespace(path=tmp_path / f"s{k}.parquet"))
    staged = SimpleNamespace(shards=shards)
    check, ids = gold_check_set(staged, size=300, exclude_ids={"r1"}, exclude_texts={"text 2"})
    usable = 100 - 10 - 3  # no gold, the seed's id and text, the skipped row
    assert len(check) == len(ids) == len(check.rows) == int(usable * 0.25) and check.source == "gold"
    assert not set(check.rows) & {0, 1, 2, 3, 10, 20}
    assert ids == [f"r{r}" for r in check.rows] and check.texts == [f"text {r}" for r in check.rows]
    again, ids2 = gold_check_set(staged, size=300, exclude_ids={"r1"}, exclude_texts={"text 2"})
    assert ids2 == ids and again.texts == check.texts  # the same slice on a resumed run
    small, _ = gold_check_set(staged, size=5, exclude_ids=set(), exclude_texts=set())
    assert len(small) == 5
    assert gold_check_set(staged, size=0, exclude_ids=set(), exclude_texts=set())[1] == []


def test_final_vote_redecides_only_untrained_controller_rows_from_earlier_stages(monkeypatch):
    import numpy as np

    import labelwright.orchestrator.job as job
    from labelwright.orchestrator.stages import VoteSettings

    n = 8
    df = pd.DataFrame({
        "row": range(n), "text": [f"t{i}" for i in range(n)], "skip_reason": None,
        "label": ["negative", "negative", "negative", "negative", "negative", "positive", "negative", "negative"],
        "controller_label": ["negative"] * n, "controller_confidence": [0.6] * n, "confidence": [0.6] * n,
        "decided_by": ["controller"] * 5 + ["combined", "controller", "controller"],
        "seed": [False, False, False, True, False, False, False, False],
        "reference": [False, False, True, False, False, False, False, False],
        "vote_a": "negative", "prob_a": 0.5, "version_a": ["v0"] * 6 + ["v1", "v0"], "specialists_label": "negative",
        "gold": ["positive", "negative", "negative", "negative", "positive", "negative", "negative", "negative"],
    })
    df["stage"] = df["version_a"].map({"v0": 0, "v1": 1}).astype("Int64")
    asked = []

    def revote(rows, vote, batch_size, gate=None):
        asked.extend(rows["row"])
        by_row = {  # row -> (hard, specialists' label, combine logits)
            0: (False, "positive", None), 4: (True, "negative", [-5.0, 5.0]), 5: (True, "negative", None),
            7: (False, "negative", None)}
        out = pd.DataFrame([{"vote_a": by_row[r][1], "prob_a": 0.99, "version_a": "v1", "specialists_label": by_row[r][1],
                             "vote_confidence": 0.99, "hard": by_row[r][0], "combine_logits": by_row[r][2],
                             "combine_weight": 1.0} for r in rows["row"]])
        return out.set_axis(rows.index)

    class Learning:
        stage, gate = 1, None

        def trained_rows(self):
            return {1}

        def row_stages(self, frame, names):
            return frame["version_a"].map({"v0": 0, "v1": 1}).astype("Int64")

    monkeypatch.setattr(job, "_revote", revote)
    vote = VoteSettings(labels=LABELS, endpoints={})
    out, rep = job._final_vote(df.copy(), vote, Learning(), ["a"], 128, lambda m: None)
    assert sorted(asked) == [0, 4, 5, 7]  # not trained on (1), a reference (2) or seed (3) row, nor stage 1's (6)
    assert out.loc[0, ["label", "decided_by", "version_a"]].tolist() == ["positive", "specialists", "v1"]
    assert out.loc[4, ["label", "decided_by"]].tolist() == ["positive", "combined"]
    assert out.loc[5, ["label", "decided_by", "confidence"]].tolist() == ["negative", "controller", 0.6]
    assert out.loc[7, ["label", "decided_by"]].tolist() == ["negative", "controller"]
    assert out.loc[[1, 2, 3, 6], "label"].tolist() == df.loc[[1, 2, 3, 6], "label"].tolist()
    assert out["stage"].tolist() == [1, 0, 0, 0, 1, 1, 1, 1]
    assert rep["rows"] == 4 and rep["settled"] == 2 and rep["changed"] == 3
    assert rep["decided_by"] == {"specialists": 1, "combined": 1, "controller": 1}
    assert rep["gold_rows"] == 3 and rep["accuracy_before"] == pytest.approx(0.0) and rep["accuracy_after"] == 1.0
    assert np.isclose(rep["trained_rows_left"], 1)


def test_trained_rows_are_the_kept_buffer_rows_up_to_the_last_stage(tmp_path, movie):
    spec = load_task(None, {"labels": LABELS, "specialists": [{"name": "tfidf", "kind": "tfidf_linear", "model": "tfidf"}],
                            "stages": {"every_rows": 1000}})
    learning = make(spec, tmp_path, movie, [])
    learning.observe(batch(movie, 60, 100))
    assert learning.trained_rows() == set()  # stage 0 trained on the seed only
    learning.records[-1]["upto_seq"] = 19
    assert learning.trained_rows() == set(range(60, 80))
    learning.finish()
