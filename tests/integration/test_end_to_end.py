"""End to end with the real embedded LLM (Qwen2.5-Coder-0.5B-Instruct) on a small real slice."""

import pandas as pd

from labelwright.orchestrator.job import annotate
from labelwright.orchestrator.spec import load_task


def test_annotate_movie_slice_with_embedded_llm(embedded_llm, datasets_dir, tmp_path):
    _, llm = embedded_llm
    df = pd.read_csv(datasets_dir / "movie_sentiment" / "test.csv").head(40)
    src = tmp_path / "slice.csv"
    df.to_csv(src, index=False)
    spec = load_task(None, {
        "labels": "positive,negative",
        "instruction": "Classify the sentiment of this movie review sentence.",
        "gold_column": "label",
        # base_url null: the job starts the embedded LLM itself (here it finds the session's one running)
        "embedded_llm": {"port": llm.port},
        "controller": {"cache_path": str(tmp_path / "cache.sqlite")},
        "seed": {"size": 12},
        "specialists": [{"name": "tfidf", "kind": "tfidf_linear"}, {"name": "probe", "kind": "embedding_linear"}],
    })
    report = annotate(src, spec=spec, output=tmp_path / "out.parquet")
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert len(out) == 40 and out["row"].tolist() == list(range(40))
    # The served name carries the precision the replica runs in, so cached answers never mix backends.
    assert report["controller"]["model"].startswith("qwen2.5-coder-0.5b-instruct@")
    asked = out[out["llm_calls"] > 0]
    assert len(asked) >= 12  # the seed at least
    assert asked["prompt_tokens"].gt(0).all()
    ctrl = out[out["decided_by"] == "controller"]
    assert ctrl["controller_confidence"].between(0, 1).all()  # from the endpoint's logprobs
    # A real model on real data: well above chance on the rows it settled (the README reports ~80-86%).
    assert (ctrl["label"] == ctrl["gold"]).mean() >= 0.6
    assert report["gold"]["accuracy"] >= 0.55


def test_the_embedded_llm_plans_a_task_and_the_plan_validates(embedded_llm, tmp_path):
    """The real planner path against the embedded LLM: it refuses the plan's JSON schema (it constrains
    only label enums), so the plan is asked again without it; whatever the small model writes, the result
    is a valid plan (the controller's, repaired, or the fallback) and says which."""
    from labelwright.orchestrator.controller import Controller, ControllerConfig
    from labelwright.orchestrator.plan import make_plan, validate_plan
    from labelwright.orchestrator.spec import PlanningConfig
    from labelwright.specialists.encoder import Encoder
    from labelwright.specialists.zoo import load_zoo

    base_url, llm = embedded_llm
    labels = ["positive", "negative"]
    config = ControllerConfig(base_url=base_url, model=llm.model, timeout_s=900, max_retries=0, cache=False)
    controller = Controller(config, labels=labels)
    zoo, cfg = load_zoo(), PlanningConfig(max_tokens=300)
    plan = make_plan(controller, zoo, labels=labels, descriptions={}, instruction="Classify the sentiment of this "
                     "movie review sentence.", cfg=cfg, samples=["a gorgeous, witty film"],
                     encode=Encoder("minilm").encode, log=print)
    print(plan.model_dump())
    assert plan.source in ("controller", "repaired", "fallback")
    assert validate_plan(plan, zoo, labels=labels, cfg=cfg) == []
    assert 1 <= plan.usage["calls"] <= 8 and (plan.source == "fallback") == any("fell back" in n for n in plan.notes)


def test_the_embedded_llms_replica_killed_mid_run_loses_no_row(embedded_llm, datasets_dir, tmp_path):
    """Kill the embedded LLM's Serve replica while the controller labels the hard rows. Serve starts another in
    its place (loading the cached weights): a request lost with the old one is tried again (Serve holds it until
    the new replica is up) or, its retries spent, leaves its row unresolved and retryable. The job ends with every
    row once, and the same command with ``retry_unresolved`` resolves what is left and changes no other row.
    Last of the tests that use the session's embedded LLM, on purpose; it is back (a new replica) when it ends."""
    from ray import serve

    from labelwright.cluster.embedded_llm import APP_NAME
    from tests.conftest import kill_a_replica_after_first_part, wait_until

    _, llm = embedded_llm
    df = pd.read_csv(datasets_dir / "movie_sentiment" / "test.csv").iloc[100:120]
    src, out = tmp_path / "slice.csv", tmp_path / "out.parquet"
    df.to_csv(src, index=False)
    parts = tmp_path / "out.run" / "parts"
    spec = load_task(None, {
        "labels": "positive,negative",
        "gold_column": "label",
        "embedded_llm": {"port": llm.port},
        "controller": {"cache_path": str(tmp_path / "cache.sqlite"), "max_retries": 1, "backoff_s": 0.2},
        "seed": {"size": 6},
        "specialists": [{"name": "tfidf", "kind": "tfidf_linear"}],
        # every voted row to the controller: one specialist trained on 6 rows is never this sure
        "voting": {"route": "threshold", "rule": "unanimity", "threshold": 0.999},
        "stages": {"enabled": False},
        "runtime": {"shard_rows": 4, "vote_batch_size": 2},
    })
    killer, killed = kill_a_replica_after_first_part(parts, f"::{APP_NAME}#")
    annotate(src, spec=spec, output=out)
    killer.join(timeout=60)
    assert killed and max(p.stat().st_mtime for p in parts.glob("part-*.parquet")) > killed[0]  # mid-run
    first = pd.read_parquet(out)
    assert first["row"].tolist() == list(range(len(df)))
    lost = first[first["decided_by"] == "unresolved"]
    print(f"{len(lost)} rows unresolved by the kill: {lost['reason'].tolist()}")
    assert lost["retryable"].all()  # kept for a retry
    assert first["label"].isin(["positive", "negative"]).sum() == len(first) - len(lost)

    wait_until(lambda: serve.status().applications[APP_NAME].status == "RUNNING", timeout_s=300)
    if lost.empty:  # every request lost with the replica was answered on a retry (measured so here)
        return
    annotate(src, spec=spec, output=out, retry_unresolved=True)
    again = pd.read_parquet(out)
    assert again["row"].tolist() == list(range(len(df)))
    assert (again["decided_by"] != "unresolved").all()
    untouched = ~first["row"].isin(lost["row"])
    pd.testing.assert_frame_equal(again[untouched].reset_index(drop=True)[["row", "label", "decided_by"]],
                                  first[untouched].reset_index(drop=True)[["row", "label", "decided_by"]])
