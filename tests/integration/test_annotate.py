"""The labelling job end to end on the session's local Ray cluster: real MiniLM specialists on
Serve, Ray Data stages, and a deterministic fake OpenAI-compatible controller over HTTP."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from labelwright.orchestrator.cli import main
from labelwright.specialists.errors import ConfigError, ControllerError
from labelwright.orchestrator.job import annotate
from labelwright.orchestrator.plan import load_plan
from labelwright.orchestrator.spec import load_task
from tests.conftest import movie_slice
from tests.fake_openai import FakeOpenAI, HTTPError, garbage, http_error, oracle, script

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
    assert len(res) == len(df) and res["row"].is_unique
    assert (res["decided_by"] == "unresolved").sum() == 0
    assert report["rows_out"] == len(df)


def test_budget_caps_llm_calls(ray_cluster, movie, tmp_path):
    path, df = movie
    with FakeOpenAI(oracle(dict(zip(df["text"], df["label"])))) as server:
        # stages off: the two-operator pipeline (a voting pool, then a controller pool)
        spec = spec_for(server, budget={"max_llm_calls": 45}, seed={"size": 40}, stages={"enabled": False})
        report = annotate(path, spec=spec, output=tmp_path / "o.parquet")
    res = pd.read_parquet(tmp_path / "o.parquet")
    assert len(report["stages"]["stages"]) == 1 and res["stage"].dropna().eq(0).all()
    assert report["llm"]["calls"] <= 45 + 8  # one slice of overshoot at most
    budget_rows = res[res["reason"].fillna("").str.contains("budget exhausted")]
    assert len(budget_rows) > 0 and budget_rows["label"].isna().all()
    assert budget_rows["specialists_label"].notna().all()  # the specialists' guess is still there


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


def test_cli_jsonl_with_empty_rows_and_bad_flags(ray_cluster, tmp_path, capsys, movie):
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
        assert main(["annotate", str(src), "--task", str(task), "--output", str(out),
                     "--voting-rule", "majority"]) == 0
    res = pd.read_json(out, lines=True)
    assert len(res) == 64 and res["row"].tolist() == list(range(64))
    assert "not valid UTF-8" in res.loc[5, "note"] and res.loc[5, "text"] == "caf\ufffd au lait, a fine film"
    assert res.loc[5, "label"] in ("positive", "negative")
    assert len(res.loc[61, "text"]) == len(big) and res.loc[61, "label"] in ("positive", "negative")
    assert res.iloc[-2:]["decided_by"].tolist() == ["unresolved", "unresolved"]
    assert res.iloc[-2:]["reason"].tolist() == ["empty text", "empty text"]
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
        data = spec_for(server).model_dump(exclude={"specialists"}, exclude_unset=True)
        data["planning"] = {"min_agreement": 0.99}  # no zero-shot scorer agrees with 99% of the seed
        spec = load_task(None, data)
        out = tmp_path / "out.parquet"
        report = annotate(path, spec=spec, output=out, report_path=tmp_path / "r.json", limit=60)
        plan = report["plan"]
        assert plan["source"] == "controller" and plan["voting_rule"] == report["voting"]["rule"] == "majority"
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
