"""The labelling job end to end on the session's local Ray cluster: real MiniLM specialists on
Serve, Ray Data stages, and a deterministic fake OpenAI-compatible controller over HTTP."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from labelwright.orchestrator.cli import main
from labelwright.specialists.errors import ConfigError, ControllerError, InputDataError
from labelwright.orchestrator.job import annotate
from labelwright.orchestrator.plan import load_plan
from labelwright.orchestrator.spec import load_task
from tests.conftest import movie_slice
from tests.unit.test_report_html import page_of
from tests.fake_openai import (FakeOpenAI, HTTPError, candidate_oracle, demonstrations, garbage, http_error,
                               last_fenced_text, oracle, script, slow)

FAST = [{"name": "tfidf", "kind": "tfidf_linear"}, {"name": "probe", "kind": "embedding_linear"}]


@pytest.fixture(scope="module")
def movie(datasets_dir, tmp_path_factory):
    return movie_slice(datasets_dir, tmp_path_factory.mktemp("movie"), 160)


def spec_for(server, **extra):
    data = {
        "labels": ["positive", "negative"],
        "gold_column": "label",
        "controller": {"base_url": server.base_url, "model": server.model, "backoff_s": 0.01,
                       "max_retries": 1, "cache": False, "price_prompt_per_1k": 0.001},
        "seed": {"size": 40},
        "specialists": FAST,
        "runtime": {"shard_rows": 50},
        # The spine's tests route by the rule alone; routing by reference rows has its own tests below.
        "voting": {"route": "threshold"},
    }
    for k, v in extra.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    return load_task(None, data)


def test_every_row_once_with_provenance_then_resume(ray_cluster, movie, tmp_path):
    path, df = movie
    truth = dict(zip(df["text"], df["label"]))
    with FakeOpenAI(oracle(truth)) as server:
        out = tmp_path / "out.parquet"
        report = annotate(path, spec=spec_for(server), output=out, report_path=tmp_path / "r.json")
        first_calls = server.chat_calls

        res = pd.read_parquet(out)
        assert len(res) == len(df) and res["row"].tolist() == list(range(len(df)))
        assert res["id"].is_unique
        assert set(res["decided_by"]) <= {"consensus", "controller", "unresolved"}
        assert (res["decided_by"] == "consensus").sum() > 0
        ctrl = res[res["decided_by"] == "controller"]
        assert len(ctrl) > 0 and (ctrl["label"] == ctrl["gold"]).all()  # the oracle is always right
        assert ctrl["prompt_tokens"].gt(0).all() and ctrl["controller_answer"].notna().all()
        for name in ("tfidf", "probe"):
            assert res[f"vote_{name}"].isin(["positive", "negative"]).all()
            assert res[f"prob_{name}"].between(0.5, 1.0).all()
            assert res[f"version_{name}"].notna().all()
        assert res["seed"].sum() > 0
        assert report["rows_in"] == report["rows_out"] == len(df)
        assert sum(report["decided_by"].values()) == len(df)
        assert json.loads((tmp_path / "r.json").read_text())["gold"]["accuracy"] == report["gold"]["accuracy"]
        assert report["llm"]["calls"] == first_calls
        # The HTML report beside it: parses, its plots embedded PNGs (who decided, stages, confidence, confusion
        # matrix, cost), nothing fetched from elsewhere.
        assert report["html"] == str(tmp_path / "r.html")
        page = page_of(tmp_path / "r.html")
        assert len(page.images) == 5 and {"Who decided", "Against gold", "Cost"} <= set(page.h2)

        # Kill simulation: one shard's output is lost; the rerun redoes only that shard.
        (tmp_path / "out.run" / "parts" / "part-00001.parquet").unlink()
        lost = res[(res["row"] >= 50) & (res["row"] < 100)]
        report2 = annotate(path, spec=spec_for(server), output=out)
        again = pd.read_parquet(out)
        assert len(again) == len(df) and again["row"].is_unique
        assert report2["resumed_shards"] == 3
        new_calls = server.chat_calls - first_calls
        asked = ((lost["decided_by"] == "controller") & ~lost["seed"]).sum()
        assert new_calls == asked  # only the lost shard's hard rows were asked again; no re-seeding
        pd.testing.assert_series_equal(again["label"], res["label"])


def test_garbage_answers_make_rows_unresolved_not_lost(ray_cluster, movie, tmp_path):
    path, df = movie
    truth = dict(zip(df["text"], df["label"]))
    seed_calls = 40
    # The seed is answered well; afterwards the endpoint only returns garbage.
    calls = {"n": 0}
    good, bad = oracle(truth), garbage()

    def responder(request):
        calls["n"] += 1
        return good(request) if calls["n"] <= seed_calls else bad(request)

    with FakeOpenAI(responder) as server:
        out = tmp_path / "out.csv"
        annotate(path, spec=spec_for(server), output=out)
    res = pd.read_csv(out)
    assert len(res) == len(df)
    unresolved = res[res["decided_by"] == "unresolved"]
    assert len(unresolved) > 0
    assert unresolved["label"].isna().all()
    assert unresolved["reason"].str.contains("JSON|label", case=False).all()


def test_endpoint_dying_mid_run_stops_the_job_then_resumes(ray_cluster, movie, tmp_path):
    path, df = movie
    truth = dict(zip(df["text"], df["label"]))
    state = {"n": 0, "down": False}
    good = oracle(truth)

    def responder(request):
        state["n"] += 1
        if state["down"] or state["n"] > 40:  # the seed is answered, then the endpoint dies
            state["down"] = True
            return HTTPError(503, "overloaded")
        return good(request)

    with FakeOpenAI(responder) as server:
        out = tmp_path / "out.parquet"
        with pytest.raises(ControllerError, match="run the same command again to resume"):
            annotate(path, spec=spec_for(server), output=out)
        state["down"], state["n"] = False, -10**9  # the endpoint is back
        report = annotate(path, spec=spec_for(server), output=out)
        res = pd.read_parquet(out)
        assert len(res) == len(df) and res["row"].is_unique and report["rows_out"] == len(df)
        # a shard that finished before the stop keeps the rows the outage left unresolved, each retryable, until
        # --retry-unresolved asks them again (the stop's message says so); whether there are any depends on timing
        failed = res[res["decided_by"] == "unresolved"]
        assert failed["retryable"].all() and failed["reason"].str.contains("503").all()
        report = annotate(path, spec=spec_for(server), output=out, retry_unresolved=True)
    res = pd.read_parquet(out)
    assert len(res) == len(df) and res["row"].is_unique
    assert (res["decided_by"] == "unresolved").sum() == 0
    assert report["rows_out"] == len(df)


def test_budget_caps_llm_calls(ray_cluster, movie, tmp_path):
    path, df = movie
    with FakeOpenAI(oracle(dict(zip(df["text"], df["label"])))) as server:
        # stages off: the two-operator pipeline (a voting pool, then a pool of two controller actors that draw
        # on one budget, held by an actor of its own)
        spec = spec_for(server, budget={"max_llm_calls": 30}, seed={"size": 40}, stages={"enabled": False},
                        runtime={"controller_actors": 2})
        report = annotate(path, spec=spec, output=tmp_path / "o.parquet")
        assert server.chat_calls <= 30  # every row reserves its call as it starts, across both actors
    res = pd.read_parquet(tmp_path / "o.parquet")
    assert len(report["stages"]["stages"]) == 1 and res["stage"].dropna().eq(0).all()
    assert report["llm"]["calls"] == server.chat_calls
    assert report["seed"]["rows"] == 15  # the seed cut to half the budget (40 asked for), the rest for hard rows
    # past the budget, or kept for the least confident hard rows
    budget_rows = res[res["reason"].fillna("").str.contains("LLM budget", regex=False)]
    assert len(budget_rows) > 0 and budget_rows["label"].isna().all()
    assert budget_rows["specialists_label"].notna().all()  # the specialists' guess is still there
    assert budget_rows["retryable"].all()  # a re-run with budget left may ask them (--retry-unresolved)
    block = report["budget"]
    assert block["max_llm_calls"] == 30
    assert block["rows_past_budget"] + block["rows_kept_for_less_confident"] == len(budget_rows)


def test_a_specialist_replica_killed_mid_run_loses_no_row_and_no_vote(ray_cluster, movie, tmp_path):
    """Kill one of the TF-IDF specialist's Serve replicas once the job has written its first shard: the voting
    actors ask a lost replica's batch again through the handle (Serve routes it to the replica it starts in the
    old one's place), and the job ends with every row once, each voted by both specialists."""
    from tests.conftest import kill_a_replica_after_first_part

    path, df = movie
    out, parts = tmp_path / "o.parquet", tmp_path / "o.run" / "parts"
    with FakeOpenAI(slow(0.3, oracle(dict(zip(df["text"], df["label"]))))) as server:
        spec = spec_for(server, stages={"enabled": False}, controller={"concurrency": 2},
                        runtime={"shard_rows": 20, "vote_batch_size": 10})
        killer, killed = kill_a_replica_after_first_part(parts, "#specialist-tfidf#")
        annotate(path, spec=spec, output=out)
        killer.join(timeout=60)
    assert killed and max(p.stat().st_mtime for p in parts.glob("part-*.parquet")) > killed[0]  # mid-run
    res = pd.read_parquet(out)
    assert res["row"].tolist() == list(range(len(df)))
    voted = res[~res["seed"]]
    assert voted["vote_tfidf"].notna().all() and voted["vote_probe"].notna().all()


def test_retry_unresolved_asks_again_only_the_rows_that_failed_for_a_transient_reason(ray_cluster, movie, tmp_path):
    path, df = movie
    good = oracle(dict(zip(df["text"], df["label"])))
    texts = list(df["text"])
    flaky = set(texts[1::3])  # HTTP 503 on every try of the first run, answered afterwards
    broken = set(texts[2::7]) - flaky  # never a valid label: not transient, so never asked again
    state = {"up": False}

    def responder(request):
        text = last_fenced_text(request)
        if text in broken:
            return garbage()(request)
        if text in flaky and not state["up"]:
            return HTTPError(503, "overloaded")
        return good(request)

    with FakeOpenAI(responder) as server:
        out = tmp_path / "out.parquet"
        annotate(path, spec=spec_for(server), output=out)
        first = pd.read_parquet(out)
        unresolved = first[first["decided_by"] == "unresolved"]
        transient = unresolved[unresolved["retryable"]]
        kept = unresolved[~unresolved["retryable"]]
        assert len(transient) > 0 and transient["text"].isin(flaky).all()
        assert transient["reason"].str.contains("gave up after 2 attempts").all()
        assert len(kept) > 0 and kept["text"].isin(broken).all()

        state["up"] = True
        calls = server.chat_calls
        report = annotate(path, spec=spec_for(server), output=out, retry_unresolved=True)
        asked = server.chat_calls - calls
    again = pd.read_parquet(out)
    assert len(again) == len(df) and again["row"].tolist() == list(range(len(df)))
    assert report["retried"] == {"rows": len(transient), "resolved": len(transient), "still_unresolved": 0}
    assert 0 < asked <= len(transient)  # only those rows (a later stage may settle some without the controller)
    redone = again.set_index("row").loc[transient["row"]]
    assert redone["decided_by"].ne("unresolved").all()
    ctrl = redone[redone["decided_by"] == "controller"]
    assert (ctrl["label"] == ctrl["gold"]).all()
    assert (redone["llm_calls"] >= transient.set_index("row")["llm_calls"]).all()  # the failed calls still count
    assert report["llm"]["calls"] == calls + asked  # every request of both runs counted once
    others = again[~again["row"].isin(transient["row"])].reset_index(drop=True)
    before = first[~first["row"].isin(transient["row"])].reset_index(drop=True)
    # the same values (a part written again may store its strings as another dtype)
    pd.testing.assert_series_equal(others["label"], before["label"], check_dtype=False)
    pd.testing.assert_series_equal(others["reason"], before["reason"], check_dtype=False)  # the garbage rows keep theirs


def test_calibrated_threshold_decides_which_agreeing_rows_are_settled(ray_cluster, movie, tmp_path):
    path, df = movie
    with FakeOpenAI(oracle(dict(zip(df["text"], df["label"])))) as server:
        spec = spec_for(server, voting={"target_accuracy": 0.8}, stages={"enabled": False})
        report = annotate(path, spec=spec, output=tmp_path / "o.parquet")
    res = pd.read_parquet(tmp_path / "o.parquet")
    fit = report["stages"]["stages"][0]["check"]["gate"]
    assert fit["target_accuracy"] == 0.8 and fit["rows"] >= 20
    voted = res[~res["seed"] & res["decided_by"].isin(["consensus", "controller"])]
    agree = voted["vote_tfidf"] == voted["vote_probe"]
    support = (voted["prob_tfidf"] + voted["prob_probe"]) / 2
    settled = voted["decided_by"] == "consensus"
    if fit["threshold"] is None:
        assert not settled.any()
    else:  # consensus exactly where the two agree with enough support: the gate reached the voters
        assert (settled == (agree & (support >= fit["threshold"] - 1e-9))).all()
        assert settled.any() and (agree & ~settled).any()  # it settled some, and sent some agreeing rows on


def test_routing_by_gold_reference_rows_settles_where_the_specialists_beat_the_controller(ray_cluster, movie,
                                                                                            tmp_path):
    """A controller wrong on every third row: the gold reference rows show the specialists winning where
    they are sure, so the fitted threshold settles those; the reference rows keep the controller's answers (in
    controller_label, and as the label unless the out-of-fold decision changed it), count in the LLM share and
    are not asked again on resume."""
    path, df = movie
    flipped = {t: (("negative" if g == "positive" else "positive") if i % 3 == 0 else g)
               for i, (t, g) in enumerate(zip(df["text"], df["label"]))}
    with FakeOpenAI(oracle(flipped)) as server:
        spec = spec_for(server, voting={"route": "measured", "rule": "confidence_weighted", "max_loss": 0.1},
                        stages={"enabled": False, "min_check_rows": 10})
        out = tmp_path / "o.parquet"
        report = annotate(path, spec=spec, output=out, report_path=tmp_path / "r.json")
        calls = server.chat_calls
        res = pd.read_parquet(out)
        ref = report["reference"]
        assert ref["source"] == "gold" and ref["asked"] == ref["rows"] == res["reference"].sum() >= 10
        assert ref["llm_calls"] == res.loc[res["reference"], "llm_calls"].sum()
        refs = res[res["reference"]]
        # the controller's answers stay in controller_label; a reference row's label is the controller's unless the
        # out-of-fold decision at the end (stages.final_vote: routing, combination) changed it, as the report counts
        assert (refs["controller_label"] == refs["text"].map(flipped)).all()
        kept = refs["decided_by"] == "controller"
        assert (refs.loc[kept, "label"] == refs.loc[kept, "controller_label"]).all()
        assert set(refs["decided_by"]) <= {"controller", "combined", "specialists"}
        assert int((refs["label"] != refs["controller_label"]).sum()) == (ref.get("decided") or {}).get("changed", 0)
        gate = report["stages"]["stages"][0]["check"]["gate"]
        assert gate["kind"] == "route" and gate["reference"] == "gold" and gate["rows"] == ref["rows"]
        assert gate["controller_accuracy_all"] == pytest.approx((refs["controller_label"] == refs["gold"]).mean())
        # every gold check row taught the linear specialists, and is voted on out of fold (the replica answers
        # its text with the fold model that never saw it), so the votes above are not in-sample
        assert ref["trained_on"] == report["stages"]["stages"][0]["check"]["rows"] >= ref["rows"]
        voted = res[~res["seed"] & ~res["reference"] & res["decided_by"].isin(["consensus", "controller"])]
        support = (voted["prob_tfidf"].where(voted["vote_tfidf"] == voted["specialists_label"],
                                             1 - voted["prob_tfidf"])
                   + voted["prob_probe"].where(voted["vote_probe"] == voted["specialists_label"],
                                               1 - voted["prob_probe"])) / 2
        settled = voted["decided_by"] == "consensus"
        if gate["threshold"] is None:
            assert not settled.any()
        else:  # consensus exactly where the mean support reaches the fitted threshold
            assert (settled == (support >= gate["threshold"] - 1e-6)).all()
        assert report["llm_share"] == pytest.approx((res["llm_calls"].gt(0) | res["decided_by"].eq("controller")
                                                    ).mean())
        # the gold rows join the demonstrations with their gold labels (not the controller's flipped ones),
        # and no row is shown its own
        gold = dict(zip(refs["text"], refs["gold"]))
        shown = [(last_fenced_text(r), demonstrations(r)) for r in server.requests]
        assert all(q not in {t for t, _ in demos} for q, demos in shown)
        gold_shown = [(t, lab) for _, demos in shown for t, lab in demos if t in gold]
        assert gold_shown and all(gold[t] == lab for t, lab in gold_shown)
        # resume after losing a shard: its reference rows come from the run directory, not the endpoint
        (tmp_path / "o.run" / "parts" / "part-00001.parquet").unlink()
        lost = res[(res["row"] >= 50) & (res["row"] < 100)]
        annotate(path, spec=spec, output=out)
        asked_again = (lost["decided_by"].isin(["controller", "combined"]) & ~lost["seed"] & ~lost["reference"]).sum()
        assert server.chat_calls - calls == asked_again


def test_final_vote_redecides_untrained_controller_rows_with_the_last_stage(ray_cluster, movie, tmp_path):
    """Stage 1 finishes; the controller's rows voted at stage 0 that it never trained on (the held-out gold
    rows that are not reference rows, among them) are voted again: labels change only there, to the final
    specialists' label where the routing settles them, and the controller's own answer is kept."""
    path, df = movie
    flipped = {t: (("negative" if g == "positive" else "positive") if i % 3 == 0 else g)
               for i, (t, g) in enumerate(zip(df["text"], df["label"]))}
    with FakeOpenAI(oracle(flipped)) as server:
        spec = spec_for(server, voting={"route": "measured", "max_loss": 0.2, "reference_rows": 20},
                        runtime={"vote_batch_size": 20},
                        stages={"every_rows": 25, "max_stages": 1, "wait": True, "min_check_rows": 10})
        report = annotate(path, spec=spec, output=tmp_path / "o.parquet", report_path=tmp_path / "r.json")
    res = pd.read_parquet(tmp_path / "o.parquet")
    assert res["row"].tolist() == list(range(len(df)))
    fv = report["stages"]["final_vote"]
    assert fv["stage"] == 1 == report["stages"]["stages"][-1]["stage"] and fv["rows"] > 0
    buffer = pd.concat([pd.read_parquet(p) for p in (tmp_path / "o.run" / "buffer").glob("*.parquet")])
    upto = report["stages"]["stages"][-1]["upto_seq"]  # rows buffered later, or held out, were never trained on
    trained = set(buffer.loc[(buffer["seq"] <= upto) & ~buffer["holdout"].astype(bool), "row"])
    mine = res[res["decided_by"] == "specialists"]
    # the counts are of labels the final vote changed; a row the combination had already moved to the same label
    # at stage 0 is now decided by the specialists without a change
    assert fv["decided_by"].get("specialists", 0) <= len(mine) and len(mine) <= fv["settled"]
    # a change may also take a stage-0 combined row back to the controller's answer; how many change is the
    # specialists' business (0 on some runs), what may change is checked here
    assert fv["changed"] <= fv["rows"]
    moved = res[res["controller_label"].notna() & (res["label"] != res["controller_label"])]
    assert moved["decided_by"].isin(["specialists", "combined", "consensus"]).all()
    assert moved.loc[moved["decided_by"] == "consensus", "reference"].all()  # settled reference rows, below
    assert not mine["row"].isin(trained).any() and not (mine["seed"] | mine["reference"]).any()
    assert (mine["label"] == mine["specialists_label"]).all() and (mine["label"] != mine["controller_label"]).all()
    assert (mine["controller_label"] == mine["text"].map(flipped)).all()
    assert (mine["stage"] == 1).all()
    kept = res[res["seed"] | res["reference"] | res["row"].isin(trained)]
    assert not (kept["decided_by"] == "specialists").any()  # the final vote leaves them alone
    own = res[res["seed"]]
    assert (own["label"] == own["text"].map(flipped)).all()  # the controller's answers there stand
    # the gold reference rows are decided like the others, out of fold, by the last stage; never by their gold
    ref, dec = res[res["reference"]], report["reference"]["decided"]
    assert dec["stage"] == 1 and dec["rows"] == len(ref) == 20
    assert ref["decided_by"].value_counts().to_dict() == dec["decided_by"]
    assert dec["changed"] == (ref["label"] != ref["controller_label"]).sum()
    asked = ref[ref["decided_by"] == "controller"]
    assert (asked["label"] == asked["text"].map(flipped)).all()
    assert report["llm_share"] == pytest.approx((res["llm_calls"].gt(0) | res["cached"]).mean())


def test_without_gold_an_audit_of_random_rows_is_the_reference(ray_cluster, movie, tmp_path):
    path, df = movie
    with FakeOpenAI(oracle(dict(zip(df["text"], df["label"])))) as server:
        spec = spec_for(server, gold_column=None, voting={"route": "measured", "reference_rows": 30},
                        stages={"enabled": False})
        report = annotate(path, spec=spec, output=tmp_path / "o.parquet")
    res = pd.read_parquet(tmp_path / "o.parquet")
    ref = report["reference"]
    assert ref["source"] == "audit" and ref["asked"] == 30 == res["reference"].sum()
    assert not (res["reference"] & res["seed"]).any()
    gate = report["stages"]["stages"][0]["check"]["gate"]
    assert gate["reference"] == "audit" and gate["rows"] == 30 and gate["controller_accuracy"] is None
    # an oracle controller and 30 rows: no disagreement rate can be shown within 2%, nothing is settled
    assert gate["threshold"] is None and not (res["decided_by"] == "consensus").any()
    assert ref["trained_on"] == 30  # the audit's answers teach the linear specialists, cross-fitted


def test_a_gold_file_is_the_reference_and_its_rows_are_not_output_rows(ray_cluster, movie, datasets_dir, tmp_path):
    path, df = movie
    extra = pd.read_csv(datasets_dir / "movie_sentiment" / "train.csv").head(40)
    gold_file = tmp_path / "gold.csv"
    extra.rename(columns={"text": "review", "label": "sentiment"}).to_csv(gold_file, index=False)
    truth = dict(zip(df["text"], df["label"])) | dict(zip(extra["text"], extra["label"]))
    with FakeOpenAI(oracle(truth)) as server:
        spec = spec_for(server, gold_column=None, stages={"enabled": False},
                        voting={"route": "measured", "gold_file": str(gold_file), "gold_text_column": "review",
                                "gold_label_column": "sentiment"})
        report = annotate(path, spec=spec, output=tmp_path / "o.parquet")
        bad = tmp_path / "bad.csv"
        extra.assign(label=["positive"] * 39 + ["meh"]).to_csv(bad, index=False)
        with pytest.raises(InputDataError, match=r"gold file .*bad.csv: row 39 has label 'meh'"):
            annotate(path, spec=spec_for(server, gold_column=None, voting={"route": "measured", "gold_file": str(bad)}),
                     output=tmp_path / "b.parquet")
    res = pd.read_parquet(tmp_path / "o.parquet")
    ref = report["reference"]
    assert ref["source"] == "gold file" and ref["asked"] == 40 and ref["in_input"] is False
    assert len(res) == len(df) and not res["reference"].any()  # the file's rows are not labelled output rows
    gate = report["stages"]["stages"][0]["check"]["gate"]
    assert gate["reference"] == "gold" and gate["rows"] == 40 and gate["controller_accuracy_all"] == 1.0
    assert report["stages"]["stages"][0]["check"]["rows"] == 40  # the file's rows check the stages too
    # the linear specialists learned from the file's rows too, each row judged by a fold model that never saw it
    assert ref["trained_on"] == 40
    for name in ("tfidf", "probe"):
        path = Path(report["specialists"][name])
        assert path.name == "stage-0-reference" and len(np.load(path / "out_of_fold.npz")["keys"]) == 40


def test_failing_endpoint_is_a_clear_error(ray_cluster, movie, tmp_path):
    path, _ = movie
    with FakeOpenAI(http_error(500)) as server:
        with pytest.raises(ControllerError, match="labelled none of the seed rows"):
            annotate(path, spec=spec_for(server), output=tmp_path / "o.parquet")


def test_unreachable_endpoint_is_a_clear_error(ray_cluster, movie, tmp_path):
    path, _ = movie
    spec = load_task(None, {"labels": "positive,negative", "controller": {"base_url": "http://127.0.0.1:9/v1",
                                                                            "max_retries": 0}})
    with pytest.raises(ControllerError):
        annotate(path, spec=spec, output=tmp_path / "o.parquet")


def test_cli_jsonl_with_empty_rows_and_bad_flags_and_a_quiet_console(ray_cluster, tmp_path, capsys, movie):
    """The real command in a process of its own, on the session's cluster. Without --verbose its stderr holds
    labelwright's lines only (its progress as plain lines: stderr is a pipe here); Ray's lines are in the run's
    log file."""
    import os
    import re
    import subprocess
    import sys

    import ray

    _, df = movie
    big = "a wonderful, moving film " * 42_000  # about 1 MB of text in one row
    rows = [{"text": t} for t in df["text"].head(60)] + [{"text": big}, {"text": ""}, {"text": "   "}]
    src = tmp_path / "in.jsonl"
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(5, b'{"text": "caf\xe9 au lait, a fine film"}')  # Latin-1 byte, not UTF-8
    src.write_bytes(b"\n".join(lines))
    truth = dict(zip(df["text"], df["label"]))
    with FakeOpenAI(script(oracle(truth, default="positive"))) as server:
        task = tmp_path / "task.yaml"
        task.write_text(
            "labels:\n  positive: the reviewer liked the film\n  negative: the reviewer disliked it\n"
            f"controller:\n  base_url: {server.base_url}\n  model: {server.model}\n  cache: false\n"
            "seed:\n  size: 30\n"
            "specialists:\n  - {name: tfidf, kind: tfidf_linear}\n  - {name: probe, kind: embedding_linear}\n"
        )
        out = tmp_path / "o.jsonl"
        proc = subprocess.run(
            [sys.executable, "-m", "labelwright.orchestrator.cli", "annotate", str(src), "--task", str(task),
             "--output", str(out), "--voting-rule", "majority", "--address", ray.get_runtime_context().gcs_address],
            capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = pd.read_json(out, lines=True)
    assert len(res) == 64 and res["row"].tolist() == list(range(64))
    assert "not valid UTF-8" in res.loc[5, "note"] and res.loc[5, "text"] == "caf\ufffd au lait, a fine film"
    assert res.loc[5, "label"] in ("positive", "negative")
    assert len(res.loc[61, "text"]) == len(big) and res.loc[61, "label"] in ("positive", "negative")
    assert res.iloc[-2:]["decided_by"].tolist() == ["unresolved", "unresolved"]
    assert res.iloc[-2:]["reason"].tolist() == ["empty text", "empty text"]
    # the console
    said = proc.stderr.splitlines()
    assert said[0].startswith("run directory:") and any(line.startswith("labelled 64/64 rows") for line in said)
    ray_like = re.compile(r"\((raylet|MapWorker|ServeController|ServeReplica|ProxyActor)|core_worker|"
                          r"streaming_executor|Loading weights| INFO | WARNING ")
    assert not [line for line in said if ray_like.search(line)], proc.stderr
    assert proc.stdout == ""
    log = (tmp_path / "o.run" / "logs" / "run.log").read_text()
    assert "labelwright: run directory:" in log and "labelwright: labelled 64/64 rows" in log
    assert ray_like.search(log), "Ray's own lines belong in the run's log"
    # bad input: a clear message and exit code 2, not a traceback
    assert main(["annotate", str(src), "--labels", "only", "--output", str(tmp_path / "x.parquet")]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert main(["annotate", str(src), "--labels", "a,b", "--text-column", "body",
                 "--output", str(tmp_path / "y.parquet")]) == 2
    assert "--text-column" in capsys.readouterr().err


def test_controller_plan_is_checked_on_the_seed_and_saved_next_to_the_output(ray_cluster, movie, tmp_path):
    """No specialists in the task: the controller plans, the zero-shot one fails the sample check and is
    dropped before deployment, the plan file lands next to the output; a broken plan file is refused."""
    path, df = movie
    label_oracle = oracle(dict(zip(df["text"], df["label"])))
    plan_json = json.dumps({"voting_rule": "majority", "specialists": [
        {"zoo_id": z, "label_map": [], "reason": "test"} for z in ("tfidf", "minilm-probe", "minilm-zeroshot")]})

    def responder(request):
        if request["messages"][0]["content"].startswith("You plan which small models"):
            return plan_json
        return label_oracle(request)

    with FakeOpenAI(responder) as server:
        data = spec_for(server).model_dump(exclude={"specialists", "voting"}, exclude_unset=True)
        data["planning"] = {"min_agreement": 0.99}  # no zero-shot scorer agrees with 99% of the seed
        data["budget"] = {"max_llm_calls": 400}  # enough for the seed and reference rows uncut; the plan pays too
        spec = load_task(None, data)
        out = tmp_path / "out.parquet"
        report = annotate(path, spec=spec, output=out, report_path=tmp_path / "r.json", limit=60)
        plan = report["plan"]
        assert plan["source"] == "controller" and plan["voting_rule"] == "majority"
        assert plan["llm"]["calls"] == 1 and plan["llm_in_budget"]
        # the ledger the hard rows draw on started from the seed's, the reference rows' and the plan's calls
        spent = report["budget"]["spent_before_labelling"]["llm_calls"]
        assert spent == report["seed"]["llm_calls"] + report["reference"]["llm_calls"] + 1
        assert server.chat_calls <= 400
        # with gold reference rows the rule is learned on them (voting.rule auto); the plan's is the fallback
        assert report["voting"]["rule"] == "stacked"
        assert plan["check"]["dropped"] == ["minilm-zeroshot"] and plan["kept"] == ["tfidf", "minilm-probe"]
        assert 0.0 <= plan["check"]["specialists"]["minilm-zeroshot"]["agreement"] < 0.99
        saved = load_plan(tmp_path / "out.plan.yaml")
        assert saved.check["dropped"] == ["minilm-zeroshot"] and plan["file"] == str(tmp_path / "out.plan.yaml")
        res = pd.read_parquet(out)
        assert len(res) == 60 and "vote_minilm-probe" in res and "vote_minilm-zeroshot" not in res

        bad = tmp_path / "bad.yaml"
        bad.write_text("labels: [positive, negative]\nvoting_rule: unanimity\n"
                       "specialists: [{zoo_id: tfidf}, {zoo_id: /etc/passwd}]\n")
        with pytest.raises(ConfigError, match="'/etc/passwd' is not in the zoo"):
            annotate(path, spec=spec, output=tmp_path / "o2.parquet", plan_path=bad, limit=60)


def test_candidate_sets_distilled_into_a_student_on_ray_train_then_resume(ray_cluster, movie, tmp_path, tiny_bert):
    """controller.mode: candidates against the fake endpoint: a third of the rows get a set whose first label
    is wrong; the student (distilled on Ray Train) chooses within every set of several candidates, and decides
    them where the gold reference rows among them show it beats the first candidate."""
    path, df = movie
    labels = ["positive", "negative"]
    sets = {t: ([g] if i % 3 else [next(x for x in labels if x != g), g]) for i, (t, g) in
            enumerate(zip(df["text"], df["label"]))}
    student = {"name": "student", "kind": "transformer_classifier", "model": tiny_bert, "max_length": 32,
               "epochs": 3, "lr": 3e-3}
    with FakeOpenAI(candidate_oracle(sets)) as server:
        spec = spec_for(server, controller={"mode": "candidates"}, distill={"student": student, "min_rows": 10},
                        voting={"route": "measured", "combine": "never"})  # gold reference rows check the student
        out = tmp_path / "out.parquet"
        report = annotate(path, spec=spec, output=out)
        res = pd.read_parquet(out)
        calls = server.chat_calls
        assert len(res) == len(df) and res["row"].is_unique
        asked = res[res["candidates"].notna()]
        several = asked[asked["candidates"].map(len) > 1]
        check = report["candidates"]["student"]["check"]
        assert check["reference_rows"] > 0 and check["used"] == (check["won"] > check["lost"])
        assert len(several) > 0 and (several["decided_by"] == ("student" if check["used"] else "controller")).all()
        assert all(lab in set(c) for lab, c in zip(several["student_label"], several["candidates"]))
        assert (several["label"] == (several["student_label"] if check["used"] else several["candidates"].str[0])).all()
        ones = asked[asked["candidates"].map(len) == 1]
        assert (ones["decided_by"] == "controller").all() and (ones["label"] == ones["gold"]).all()
        block = report["candidates"]
        assert block["rows"] == len(asked) and block["coverage"] == 1.0
        assert block["mean_size"] == pytest.approx(asked["candidates"].map(len).mean(), abs=1e-3)
        assert block["single_label_accuracy"] < 1.0 and block["student"]["rows_decided"] == (len(several) if check["used"] else 0)
        assert block["student"]["train_rows"] == int(res["label"].notna().sum() - res["reference"].sum())

        again = annotate(path, spec=spec, output=out)  # everything done: the student is reused, nobody asked
        assert server.chat_calls == calls
        pd.testing.assert_series_equal(pd.read_parquet(out)["label"], res["label"])
        assert again["candidates"]["student"]["version"] == block["student"]["version"]


def test_the_api_key_is_in_no_file_the_run_or_ray_wrote(ray_cluster, datasets_dir, tmp_path, monkeypatch):
    """The key comes from the environment variable the task names and is sent to the endpoint; no output, report,
    plan, checkpoint, cache, task file or Ray session log holds it."""
    import ray

    canary = "sk-labelwright-canary-7f3a9c1e5b"
    monkeypatch.setenv("LW_CANARY_KEY", canary)
    path, df = movie_slice(datasets_dir, tmp_path, 60)
    with FakeOpenAI(oracle(dict(zip(df["text"], df["label"])))) as server:
        spec = spec_for(server, controller={"api_key_env": "LW_CANARY_KEY", "cache": True,
                                            "cache_path": str(tmp_path / "cache.sqlite")},
                        seed={"size": 20}, stages={"enabled": False})
        annotate(path, spec=spec, output=tmp_path / "out.parquet", report_path=tmp_path / "report.json")
    assert f"Bearer {canary}" in server.authorizations  # the configured key was the one sent (the seed's calls)
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    files = [p for root in (tmp_path, session) for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name == "task.json" for p in files) and any(p.suffix == ".sqlite" for p in files)
    holding = [str(p) for p in files if canary.encode() in bytes_of(p)]
    assert holding == []


def bytes_of(path):
    """A file's bytes, or none where it went between listing and reading: sqlite's -wal and -shm files go when the
    last connection to the cache closes (what they held is in the .sqlite file, read too), Ray rotates its logs."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def test_active_mode_buys_within_budget_labels_every_row_and_goes_on_with_a_larger_budget(ray_cluster, movie,
                                                                                        tmp_path, capsys, monkeypatch):
    """``--mode active``: the controller is asked about exactly the budget's rows, picked in rounds; the task model
    labels the rest; the bought rows are reweighted against a gold file; a second run of the same command with a
    larger budget buys only new rows."""
    path, df = movie
    truth = dict(zip(df["text"], df["label"]))
    monkeypatch.setenv("LABELWRIGHT_CACHE", str(tmp_path / "cache"))  # not the user's cache: every answer is bought
    with FakeOpenAI(oracle(truth)) as server:
        out = tmp_path / "active.parquet"
        args = ["annotate", str(path), "-o", str(out), "--labels", "positive,negative", "--gold-column", "label",
                "--base-url", server.base_url, "--model", server.model, "--mode", "active", "--rounds", "4",
                "--acquisition", "hybrid", "--report", str(tmp_path / "r.json")]
        assert main(args) == 2  # no budget: active mode has nothing to spend
        assert "--max-llm-calls" in capsys.readouterr().err
        assert main(args + ["--max-llm-calls", "24", "--reweight"]) == 2  # reweighting needs gold rows
        assert "--gold-file" in capsys.readouterr().err
        gold_file = tmp_path / "gold.csv"
        df.tail(20)[["text", "label"]].to_csv(gold_file, index=False)
        args += ["--gold-file", str(gold_file), "--reweight"]
        assert main(args + ["--max-llm-calls", "24"]) == 0
        res = pd.read_parquet(out)
        assert len(res) == len(df) and res["row"].tolist() == list(range(len(df)))
        assert set(res["decided_by"]) == {"controller", "model"}
        bought = res[res["decided_by"] == "controller"]
        assert len(bought) == 24 == server.chat_calls == res["llm_calls"].sum()
        assert (bought["label"] == bought["gold"]).all()
        assert sorted(bought["round"].unique().tolist()) == [1, 2, 3, 4]
        assert res.loc[res["decided_by"] == "model", "round"].isna().all()
        assert res["model_label"].isin(["positive", "negative"]).all()
        assert bought["weight"].notna().all() and (bought["weight"] >= 0).all()
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["mode"] == "active" and report["active"]["spent"] == 24 and report["llm_share"] == 24 / len(df)
        assert report["active"]["reweight"]["reference_rows"] == 20 and report["active"]["reweight"]["rows"] == 24
        assert Path(report["active"]["plot"]).is_file()  # the learning curve, measured on the gold file's rows
        assert any(r.get("check_accuracy") is not None for r in report["active"]["rounds"])
        assert report["gold"]["accuracy"] > 0.5
        page = page_of(tmp_path / "r.html")  # the HTML report: the rounds in place of the stages; no price, no cost plot
        assert "Active mode: rounds (no stages in this mode)" in page.h2 and len(page.images) == 4

        first = set(bought["row"])
        assert main(args + ["--max-llm-calls", "36"]) == 0  # same run directory: the rounds go on
        again = pd.read_parquet(out)
        assert server.chat_calls == 36  # 12 new answers, none bought twice
        now = set(again.loc[again["decided_by"] == "controller", "row"])
        assert first < now and len(now) == 36 and again["row"].is_unique


def test_reviews_from_label_studio_decide_their_rows_and_are_gold_rows_of_the_next_run(ray_cluster, movie, tmp_path,
                                                                                      capsys):
    """People review hard rows in Label Studio (issue 19, item 4). The same command again writes their labels
    (decided_by: human, labelwright's answers kept beside them) without asking the controller anything; the run
    started over (--fresh keeps the reviews) takes them as gold reference rows, like a gold file's."""
    path, df = movie
    truth = dict(zip(df["text"], df["label"]))
    flip = {"positive": "negative", "negative": "positive"}
    with FakeOpenAI(oracle(truth)) as server:
        spec = spec_for(server, gold_column=None, seed={"size": 20}, stages={"enabled": False, "min_check_rows": 10},
                        voting={"route": "measured", "reference_rows": 20})  # an audit: no gold column
        out = tmp_path / "out.parquet"
        annotate(path, spec=spec, output=out, limit=80)
        review = tmp_path / "review.json"
        assert main(["export-review", str(out), "--format", "label-studio", "--rows", "hard", "--limit", "13",
                     "--output", str(review)]) == 0
        tasks = json.loads(review.read_text())
        assert len(tasks) == 13 and (tmp_path / "review.label_config.xml").is_file()
        # Label Studio's JSON export once people answered: the first three against the controller, one skipped
        said = {}
        for n, task in enumerate(tasks, start=1):
            gold = truth[task["data"]["text"]]
            label = said[task["data"]["labelwright_id"]] = flip[gold] if n <= 3 else gold
            task.update(id=n, annotations=[{
                "id": n, "completed_by": 1, "was_cancelled": n == 13, "created_at": "2024-05-02T10:00:00Z",
                "updated_at": "2024-05-02T10:00:00Z", "lead_time": 3.1, "task": n,
                "result": [] if n == 13 else [{"id": f"r{n}", "from_name": "label", "to_name": "text",
                                               "type": "choices", "value": {"choices": [label]}, "origin": "manual"}]}])
        said.pop(tasks[-1]["data"]["labelwright_id"])
        exported = tmp_path / "project-1-at-2024-05-02.json"
        exported.write_text(json.dumps(tasks))
        assert main(["import-review", str(exported), "--run-dir", str(tmp_path / "out.run")]) == 0
        assert "12 reviewed" in capsys.readouterr().out

        calls = server.chat_calls
        report = annotate(path, spec=spec, output=out, limit=80)  # the same command: the output takes the reviews
        assert server.chat_calls == calls
        res = pd.read_parquet(out).set_index("id")
        human = res[res["decided_by"] == "human"]
        assert human["label"].to_dict() == said and report["decided_by"]["human"] == 12
        assert (human["machine_label"] == human["text"].map(truth)).all()  # the oracle controller's answers
        assert set(human["machine_decided_by"]) <= {"controller", "consensus", "combined", "specialists"}
        assert report["reviews"]["rows"] == 12 and report["reviews"]["changed"] == 3
        assert report["reference"]["source"] == "audit"  # a resumed run keeps the reference it routed by

        # started over: the reviews are gold rows now
        report = annotate(path, spec=spec, output=out, limit=80, fresh=True)
    assert (tmp_path / "out.run" / "reviews.parquet").is_file()
    ref = report["reference"]
    assert ref["source"] == "gold file" and ref["asked"] == 12 and ref["in_input"] is False
    assert ref["trained_on"] == 12  # the linear specialists learned from them, cross-fitted
    res = pd.read_parquet(out).set_index("id")
    assert res.loc[res["decided_by"] == "human", "label"].to_dict() == said
    assert len(res) == 80 and report["decided_by"]["human"] == 12
