import pytest
import yaml

from labelwright.orchestrator.annotators import RULE, agreement, choose, load_annotators, select_annotator
from labelwright.orchestrator.spec import load_task
from labelwright.specialists.errors import ConfigError
from tests.fake_openai import FakeOpenAI, constant, oracle


def test_fleiss_kappa_matches_the_published_worked_example():
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories -> kappa 0.210
    counts = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
              [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    labels = list("abcde")
    per_subject = [[labels[c] for c, n in enumerate(row) for _ in range(n)] for row in counts]
    repeats = [[per_subject[j][k] for j in range(10)] for k in range(14)]
    out = agreement(repeats, ["a"] * 10, labels)
    assert out["fleiss_kappa"] == pytest.approx(0.210, abs=5e-4)


def test_krippendorff_alpha_matches_the_published_worked_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 coders, 12 units, missing values,
    # nominal alpha 0.743
    n = None
    coders = [[1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n], [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
              [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n], [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n]]
    labels = ["1", "2", "3", "4", "5"]
    repeats = [[None if x is None else str(x) for x in c] for c in coders]
    out = agreement(repeats, ["1"] * 12, labels)
    assert out["krippendorff_alpha"] == pytest.approx(0.743, abs=5e-4)
    assert out["unanswered"] == pytest.approx(7 / 48)


def test_agreement_against_gold_and_a_perfectly_consistent_annotator():
    gold = ["y"] * 25 + ["n"] * 25
    said = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15  # the worked example of Cohen's kappa: 0.4
    out = agreement([said, said, said], gold, ["y", "n"])
    assert out["accuracy"] == pytest.approx(0.7) and out["cohen_kappa"] == pytest.approx(0.4)
    assert out["fleiss_kappa"] == 1.0 and out["krippendorff_alpha"] == 1.0  # the same answers every time
    assert agreement([said], gold, ["y", "n"])["fleiss_kappa"] is None  # one repeat: nothing to agree with


def test_the_rule_prefers_f1_then_consistency_then_cost():
    def r(name, f1, fk, cost=0.0, s=1.0):
        return {"name": name, "macro_f1": f1, "fleiss_kappa": fk, "cost_per_row_usd": cost, "seconds_per_row": s}

    assert choose([r("a", 0.80, 1.0), r("b", 0.85, 0.5)])["name"] == "b"
    assert choose([r("a", 0.845, 0.9), r("b", 0.85, 0.5)])["name"] == "a"  # a near tie: the consistent one
    assert choose([r("a", 0.85, 0.9, cost=0.01), r("b", 0.85, 0.9, cost=0.001)])["name"] == "b"
    assert "macro-F1" in RULE


def test_a_bad_annotators_file_is_named(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump({"annotators": [{"name": "x", "base_url": "http://h/v1", "model": "m",
                                                    "temperature": 5}]}))
    with pytest.raises(ConfigError, match=r"annotators.0.temperature"):
        load_annotators(path)
    path.write_text(yaml.safe_dump({"annotators": [{"name": "x", "base_url": "http://h/v1", "model": "m"}] * 2}))
    with pytest.raises(ConfigError, match=r"repeats the name"):
        load_annotators(path)


def test_select_annotator_picks_the_one_that_agrees_with_gold_and_writes_the_task(tmp_path):
    import pandas as pd

    texts = [f"review number {i}: {'great' if i % 2 else 'awful'} film" for i in range(12)]
    gold = ["positive" if i % 2 else "negative" for i in range(12)]
    pd.DataFrame({"text": texts, "label": gold}).to_csv(tmp_path / "gold.csv", index=False)
    task = tmp_path / "task.yaml"
    task.write_text(yaml.safe_dump({"labels": ["positive", "negative"], "instruction": "Sentiment.",
                                    "controller": {"concurrency": 2}, "seed": {"size": 40}}))
    with FakeOpenAI(oracle(dict(zip(texts, gold)))) as good, FakeOpenAI(constant("positive")) as bad:
        (tmp_path / "annotators.yaml").write_text(yaml.safe_dump({"annotators": [
            {"name": "always-positive", "base_url": bad.base_url, "model": bad.model, "shots": 0},
            {"name": "oracle", "base_url": good.base_url, "model": good.model, "shots": 2, "temperature": 0.7},
        ]}))
        record = select_annotator(tmp_path / "gold.csv", tmp_path / "annotators.yaml", spec=load_task(task),
                                  repeats=2, output=tmp_path / "chosen.yaml", task_path=task, log=lambda m: None)
        assert good.chat_calls == 24 and bad.chat_calls == 24  # every row, twice, nothing from a cache
    assert record["chosen"] == "oracle"
    by = {a["name"]: a for a in record["annotators"]}
    assert by["oracle"]["accuracy"] == 1.0 and by["always-positive"]["accuracy"] == 0.5
    assert by["always-positive"]["cohen_kappa"] == pytest.approx(0.0)
    duel = record["versus_runner_up"]  # only the oracle right on the 6 negative rows: McNemar p = 2 * 0.5^6
    assert duel["runner_up"] == "always-positive" and duel["rows_only_chosen_right"] == 6
    assert duel["rows_only_runner_up_right"] == 0 and duel["p_value"] == pytest.approx(2 * 0.5**6)
    written = yaml.safe_load((tmp_path / "chosen.yaml").read_text())
    assert written["controller"]["base_url"] == good.base_url and written["controller"]["concurrency"] == 2
    assert written["controller"]["num_demonstrations"] == 2 and written["controller"]["temperature"] == 0.7
    assert written["seed"] == {"size": 40}  # the rest of the task is kept
    assert load_task(tmp_path / "chosen.yaml").controller.model == good.model  # a task file annotate accepts
    assert (tmp_path / "chosen.annotators.json").is_file()
