import pandas as pd
import pytest

from labelwright.orchestrator.report import accuracy, build_report, macro_f1, sent_to_llm, summary


def frame():
    return pd.DataFrame({
        "label": ["a", "b", "a", None],
        "gold": ["a", "a", "a", "b"],
        "decided_by": ["consensus", "controller", "controller", "unresolved"],
        "vote_s1": ["a", "b", "b", "b"],
        "llm_calls": [0, 1, 2, 1],
        "cached": [False, False, True, False],
        "prompt_tokens": [0, 100, 0, 120],
        "completion_tokens": [0, 5, 0, 7],
    })


def test_accuracy_and_macro_f1_count_unresolved_as_miss():
    assert accuracy(["a", None], ["a", "b"]) == 0.5
    # label a: tp=1 fp=0 fn=0 -> 1.0; label b: tp=0 fp=0 fn=1 -> 0.0
    assert macro_f1(["a", None], ["a", "b"], ["a", "b"]) == pytest.approx(0.5)
    assert accuracy([], []) is None
    # missing labels of every kind pandas produces count as misses, never raise
    assert accuracy(pd.array(["a", pd.NA], dtype="string"), ["a", "b"]) == 0.5
    assert accuracy(pd.Series(["a", float("nan")]), ["a", "b"]) == 0.5


def test_report_counts_cost_and_gold():
    r = build_report(frame(), labels=["a", "b"], specialists=["s1"], rows_in=4, wall_s=2.0, label_s=1.0,
                     price_prompt_per_1k=1.0, price_completion_per_1k=2.0)
    assert r["rows_in"] == r["rows_out"] == 4
    assert r["decided_by"] == {"consensus": 1, "controller": 2, "unresolved": 1}
    assert r["llm_share"] == 0.75  # three rows went to the LLM
    assert r["llm"]["calls"] == 4 and r["llm"]["cache_hits"] == 1
    assert r["llm"]["cost_usd"] == pytest.approx((220 * 1.0 + 12 * 2.0) / 1000)
    # the two non-cached asked rows average 110 prompt + 6 completion tokens
    assert r["all_rows_by_llm_estimate"]["tokens"] == 4 * 116
    g = r["gold"]
    assert g["accuracy"] == 0.5
    assert g["accuracy_by_decided_by"]["controller"]["accuracy"] == 0.5
    assert g["specialist_accuracy"]["s1"] == 0.5  # rows 0 and 3
    assert "accuracy 0.500" in summary(r)


def test_the_report_puts_the_cost_against_people():
    """budget.human_cost_per_row times the rows, against what the LLM cost; an LLM without a price says so."""
    r = build_report(frame(), labels=["a", "b"], specialists=["s1"], rows_in=4, wall_s=2.0, label_s=1.0,
                     price_prompt_per_1k=1.0, price_completion_per_1k=2.0, human_cost_per_row=0.5)
    llm = (220 * 1.0 + 12 * 2.0) / 1000
    assert r["people"]["cost_usd"] == 2.0 and r["people"]["llm_cost_usd"] == pytest.approx(llm)
    assert r["people"]["times_cheaper"] == pytest.approx(2.0 / llm, abs=0.05)
    assert "people labelling all 4 rows at $0.5 a row" in summary(r)
    free = build_report(frame(), labels=["a", "b"], specialists=["s1"], rows_in=4, wall_s=2.0, label_s=1.0,
                        price_prompt_per_1k=0.0, price_completion_per_1k=0.0, human_cost_per_row=0.5)
    assert free["people"]["times_cheaper"] is None and "has no price" in summary(free)
    assert "people" not in build_report(frame(), labels=["a", "b"], specialists=["s1"], rows_in=4, wall_s=2.0,
                                        label_s=1.0, price_prompt_per_1k=1.0, price_completion_per_1k=2.0)


def test_rows_answered_from_the_cache_count_as_sent_to_the_llm():
    """The LLM share (report and progress line) counts every row the controller was asked about: a
    cached answer costs no call (llm_calls 0) but the row still needed the controller."""
    df = pd.DataFrame({"decided_by": ["consensus", "controller", "unresolved", "unresolved"],
                       "llm_calls": [0, 0, 0, 1], "cached": [False, True, True, False]})
    assert sent_to_llm(df).tolist() == [False, True, True, True]
    r = build_report(df.assign(label=None, prompt_tokens=0, completion_tokens=0), labels=["a"], specialists=[],
                     rows_in=4, wall_s=1.0, label_s=1.0, price_prompt_per_1k=0.0, price_completion_per_1k=0.0)
    assert r["llm_share"] == 0.75


def test_summary_lists_each_stage_with_its_calibrated_threshold():
    r = build_report(frame(), labels=["a", "b"], specialists=["s1"], rows_in=4, wall_s=2.0, label_s=1.0,
                     price_prompt_per_1k=0.0, price_completion_per_1k=0.0)
    check = {"rows": 50, "source": "gold", "specialists": {"s1": 0.7}}
    stage = {"rows": 2, "hard_share": 0.5, "llm_calls": 1, "train_s": 3.0, "rolled_back": []}
    r["stages"] = {"buffer_rows": 1, "stages": [
        {**stage, "stage": 0, "check": {**check, "gate": {"threshold": None}}},
        {**stage, "stage": 1, "check": {**check, "gate": {"threshold": 0.8123}}, "rolled_back": ["s1"],
         "train_restarts": {"s1": 1}},
    ]}
    lines = summary(r).splitlines()
    assert "stage 0: voted 2 rows, LLM share 50%" in lines[-2] and "calibrated threshold none" in lines[-2]
    assert "restarted" not in lines[-2]
    assert "calibrated threshold 0.812" in lines[-1] and "rolled back s1" in lines[-1]
    assert "Ray Train workers restarted: s1 1x" in lines[-1]


def test_the_report_counts_what_the_combination_overruled():
    df = pd.DataFrame({
        "label": ["a", "b", "a", "b", "a"],
        "gold": ["a", "b", "b", "b", "a"],
        "decided_by": ["consensus", "combined", "combined", "controller", "controller"],
        "controller_label": [None, "a", "b", "b", "b"],
        "seed": [False, False, False, False, True],
        "reference": [False] * 5,
        "llm_calls": [0, 1, 1, 1, 1], "cached": [False] * 5, "prompt_tokens": [0, 9, 9, 9, 9],
        "completion_tokens": [0, 1, 1, 1, 1],
    })
    r = build_report(df, labels=["a", "b"], specialists=[], rows_in=5, wall_s=1.0, label_s=1.0,
                     price_prompt_per_1k=0.0, price_completion_per_1k=0.0)
    assert r["combined"] == {"controller_rows": 3, "overruled": 2, "gold_rows": 2, "accuracy": 0.5,
                             "controller_accuracy": 0.5}  # the seed row is not the controller's to be overruled on
    assert r["llm_share"] == 0.8  # overruled rows were still sent to the LLM
    assert "overruled the controller on 2 of its 3 rows" in summary(r)


def test_routing_text_says_which_specialists_the_stack_weighs_and_why():
    from labelwright.orchestrator.report import routing_text

    fit = {"rows": 100, "confidence_level": 0.95, "target_accuracy": None, "reference": "gold", "max_loss": 0.02,
           "threshold": 0.2, "settled_share": 0.5, "accuracy": 0.6, "controller_accuracy": 0.4,
           "stack_choice": {"best_single": "probe", "won": 3, "lost": 1, "p_value": 0.3125, "sources": ["probe"]}}
    text = routing_text(fit)
    assert "stacked on probe alone" in text and "right on 3 rows probe got wrong" in text and "p=0.31" in text
    fit["stack_choice"] |= {"sources": ["tfidf", "probe"], "won": 12, "lost": 1, "p_value": 0.0017}
    assert "the stack over tfidf, probe" in routing_text(fit)
    assert routing_text(fit | {"threshold": None}).endswith("p=0.0017)")  # settling nothing, it still says
    del fit["stack_choice"]
    assert "stack" not in routing_text(fit)
