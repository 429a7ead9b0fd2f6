import json

import pytest

from labelwright.specialists.errors import ConfigError
from labelwright.orchestrator.spec import TaskSpec, load_task


def test_labels_from_flag_file_and_mapping(tmp_path):
    assert load_task(None, {"labels": "pos, neg"}).label_names == ["pos", "neg"]
    f = tmp_path / "task.yaml"
    f.write_text("labels:\n  pos: liked it\n  neg: did not\ninstruction: Sentiment.\nvoting: {rule: majority}\n")
    spec = load_task(f, {"text_column": "body"})
    assert spec.label_names == ["pos", "neg"]
    assert spec.descriptions == {"pos": "liked it", "neg": "did not"}
    assert spec.text_column == "body" and spec.voting.rule == "majority"
    j = tmp_path / "task.json"
    j.write_text(json.dumps({"labels": [{"name": "x"}, "y"], "seed": {"size": 10}}))
    assert load_task(j).seed.resolved_size(2) == 10
    assert load_task(j, {"seed": {"pool_size": 5}}).seed.size == 10  # nested flags merge, not replace


def test_seed_size_default_scales_with_labels():
    spec = load_task(None, {"labels": "a,b"})
    assert spec.seed.resolved_size(2) == 64
    assert spec.seed.resolved_size(20) == 160
    assert spec.seed.resolved_size(500) == 512


@pytest.mark.parametrize(
    "data, match",
    [
        ({"labels": "only"}, "at least 2"),
        ({"labels": "a,a"}, "repeats"),
        ({"labels": "a,b", "voting": {"rule": "plurality"}}, r"voting.rule: unknown voting rule 'plurality'"),
        ({"labels": "a,b", "voting": {"threshold": 1.5}}, r"voting.threshold"),
        ({"labels": "a,b", "colour": "red"}, r"colour: Extra inputs"),
        ({"labels": "a,b", "specialists": [{"name": "x y", "kind": "tfidf_linear"}]}, "letters, digits"),
        ({"labels": "a,b", "specialists": [{"name": "x", "kind": "tfidf_linear"}] * 2}, "repeats the name"),
        ({"labels": "a,b", "specialists": [{"name": "x", "kind": "magic"}]}, r"specialists.0.kind"),
        ({"labels": "a,b", "voting": {"weights": {"ghost": 2}}}, "unknown specialists"),
        ({"labels": "a,b", "budget": {"max_llm_calls": -1}}, r"budget.max_llm_calls"),
        ({"text_column": "t"}, "no labels given"),
    ],
)
def test_bad_settings_name_the_field(data, match):
    with pytest.raises(ConfigError, match=match):
        load_task(None, data)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_task(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("labels: [a, b\n")
    with pytest.raises(ConfigError, match="not valid"):
        load_task(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_task(lst)


def test_stage_settings():
    spec = load_task(None, {"labels": "a,b"})
    assert spec.stages.enabled and spec.stages.every_rows == 200 and spec.stages.replay_ratio == 1.0
    with pytest.raises(ConfigError, match=r"stages: .*every_rows or stages.every_fraction"):
        load_task(None, {"labels": "a,b", "stages": {"every_rows": None}})
    with pytest.raises(ConfigError, match=r"stages.replay_ratio"):
        load_task(None, {"labels": "a,b", "stages": {"replay_ratio": -1}})
    off = load_task(None, {"labels": "a,b", "stages": {"enabled": False, "every_rows": None}})
    assert not off.stages.enabled


def test_settings_added_at_their_default_leave_a_runs_fingerprint_as_it_was(tmp_path):
    """A run started before voting.combine and controller.gold_demonstrations existed still resumes; a run
    that changes either does not (its labels would come from other prompts or rules)."""
    from labelwright.orchestrator.job import _task_fingerprint

    def fingerprint(**over):
        return _task_fingerprint(load_task(None, {"labels": "a,b", **over}), tmp_path / "in.csv", None)

    base = fingerprint()
    assert "combine" not in base["task"]["voting"] and "gold_demonstrations" not in base["task"]["controller"]
    assert fingerprint(controller={"gold_demonstrations": False}) != base
    assert fingerprint(voting={"combine": "never"}) != base
    assert "mode" not in base["task"] and "active" not in base["task"]  # the pipeline's runs resume as before
    active = fingerprint(mode="active", budget={"max_llm_calls": 9})
    assert active != base and active["task"]["active"]["acquisition"] == "hybrid"
    assert fingerprint(mode="active", budget={"max_llm_calls": 9}, active={"acquisition": "random"}) != active


def test_active_settings_are_checked():
    spec = load_task(None, {"labels": "a,b", "mode": "active", "active": {"acquisition": "kcenter", "rounds": 3},
                            "budget": {"max_llm_calls": 10}})
    assert spec.mode == "active" and spec.active.acquisition == "kcenter" and spec.active.rounds == 3
    with pytest.raises(ConfigError, match=r"active.acquisition"):
        load_task(None, {"labels": "a,b", "active": {"acquisition": "best"}})
    with pytest.raises(ConfigError, match=r"mode"):
        load_task(None, {"labels": "a,b", "mode": "passive"})
    with pytest.raises(ConfigError, match=r"active.rounds"):
        load_task(None, {"labels": "a,b", "active": {"rounds": 0}})
    # Before any run directory is made: a corrected command is not refused as another task.
    with pytest.raises(ConfigError, match=r"--max-llm-calls"):
        load_task(None, {"labels": "a,b", "mode": "active"})
    with pytest.raises(ConfigError, match=r"--gold-file"):
        load_task(None, {"labels": "a,b", "mode": "active", "budget": {"max_llm_calls": 5}, "active": {"reweight": True}})


def test_the_rows_asked_up_front_are_cut_to_half_the_budget():
    """A budget too small for the seed and the reference rows: both cut in proportion to half of it; a seed
    from a gold file costs nothing and is left alone; without a budget, or with one large enough, nothing changes."""
    spec = TaskSpec(labels=["a", "b"], budget={"max_llm_calls": 100})  # seed 64 + reference 150 > 50
    cut, note = spec.within_budget()
    assert (cut.seed.size, cut.voting.reference_rows) == (14, 35)
    assert cut.seed.size + cut.voting.reference_rows <= 50 and "max_llm_calls=100" in note
    assert spec.seed.size is None and spec.voting.reference_rows == 150  # the original untouched
    gold_seed = TaskSpec(labels=["a", "b"], budget={"max_llm_calls": 100}, seed={"gold_file": "seed.csv"})
    cut, note = gold_seed.within_budget()
    assert (cut.seed.size, cut.voting.reference_rows) == (None, 50) and "seed" not in note
    for roomy in (TaskSpec(labels=["a", "b"]), TaskSpec(labels=["a", "b"], budget={"max_llm_calls": 428})):
        assert roomy.within_budget() == (roomy, None)


def test_a_dollar_budget_needs_prices_and_the_pipeline():
    with pytest.raises(ValueError, match=r"price_prompt_per_1k"):
        TaskSpec(labels=["a", "b"], budget={"max_cost_usd": 5})
    priced = {"price_prompt_per_1k": 0.001}
    assert TaskSpec(labels=["a", "b"], budget={"max_cost_usd": 5}, controller=priced).budget.max_cost_usd == 5
    with pytest.raises(ValueError, match=r"active mode spends budget.max_llm_calls"):
        TaskSpec(labels=["a", "b"], mode="active", budget={"max_llm_calls": 9, "max_cost_usd": 5}, controller=priced)


def test_attempts_at_a_run_directory_count_the_stopped_ones_and_the_rows_they_lost(tmp_path):
    from labelwright.orchestrator.job import _attempt_ended, _attempt_started, _rows_in_flight

    _attempt_started(tmp_path)
    _rows_in_flight(tmp_path, 64)
    _rows_in_flight(tmp_path, 30)  # a shard was written: its rows are safe
    # killed here: the next attempt votes the 30 rows again
    _attempt_started(tmp_path)
    _rows_in_flight(tmp_path, 10)
    assert _attempt_ended(tmp_path) == {"attempts": 2, "interrupted": 1, "rows_revoted": 30}
    _attempt_started(tmp_path)  # the same command once more: nothing stopped since
    assert _attempt_ended(tmp_path) == {"attempts": 3, "interrupted": 1, "rows_revoted": 30}
