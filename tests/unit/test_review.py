"""People in the loop: rows out to Label Studio / Argilla, the reviewed answers back as gold rows.

The tools' exports below have the shapes the tools write: Label Studio's JSON export as its task-format page
documents it (tasks with ``annotations``, ``was_cancelled``, ``completed_by`` as a user id or, from the API of some
versions, a user object); Argilla's are what argilla 2.8's ``Record.to_dict`` (``records.to_json``) and
``records.to_list(flatten=True)`` printed for these records, pasted as they came.
"""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest

from labelwright.orchestrator.cli import main
from labelwright.orchestrator.dataset_io import stage_input, write_frame
from labelwright.orchestrator.job import _prepare_run_dir, _task_fingerprint
from labelwright.orchestrator.review import (
    REVIEWS_FILE, Answer, apply_reviews, decide, export_review, import_review, read_reviews, reviews_as_gold,
    select_rows,
)
from labelwright.orchestrator.spec import load_task
from labelwright.specialists.errors import ConfigError, InputDataError

TEXTS = ["a wonderful film", "a dull, lifeless film", "not sure what to make of it",
         "the plot drags but the acting shines", "an instant classic", "", "I walked out halfway", "fine, I guess"]
LABELS = {"positive": "the reviewer liked the film", "negative": "the reviewer disliked the film"}


def output_frame() -> pd.DataFrame:
    """An output as `labelwright annotate` writes it (the columns that matter here)."""
    return pd.DataFrame({
        "row": range(8), "id": [f"r{i}" for i in range(8)], "text": TEXTS,
        "label": ["positive", "negative", None, "positive", "positive", None, "negative", "positive"],
        "decided_by": ["consensus", "controller", "unresolved", "combined", "consensus", "unresolved", "specialists",
                       "controller"],
        "reason": [None, None, "answer outside the label set", None, None, "empty text", None, None],
        "confidence": [0.97, 0.55, None, 0.62, 0.91, None, 0.7, 0.8],
        "specialists_label": ["positive", "positive", "negative", "negative", "positive", None, "negative", "positive"],
        "vote_tfidf": ["positive", "positive", "negative", "negative", "positive", None, "negative", "positive"],
        "vote_probe": ["positive", "positive", "negative", "positive", "positive", None, "positive", "positive"],
        "controller_label": [None, "negative", None, "positive", None, None, "positive", "positive"],
        "retryable": [False, False, False, False, False, False, False, False],
        "gold": ["positive", "negative", "positive", "positive", "positive", None, "negative", "negative"],
    })


def spec(**extra):
    data = {"labels": LABELS, "instruction": "Classify the sentiment of this movie review sentence.",
            "id_column": "id", "controller": {"base_url": "http://127.0.0.1:9/v1"}, **extra}
    return load_task(None, data)


@pytest.fixture
def run(tmp_path):
    """A run directory as annotate leaves it (task.json, the staged input) and its output file."""
    src = tmp_path / "in.csv"
    pd.DataFrame({"id": [f"r{i}" for i in range(8)], "text": TEXTS}).to_csv(src, index=False)
    run_dir = tmp_path / "out.run"
    s = spec()
    _prepare_run_dir(run_dir, _task_fingerprint(s, src, None), fresh=False)
    staged = stage_input(src, run_dir=run_dir, text_column="text", id_column="id", labels=s.label_names)
    out = write_frame(output_frame(), tmp_path / "out.parquet")
    return run_dir, out, staged


# ---------------------------------------------------------------- selection


def test_rows_selected_most_doubtful_first():
    df = output_frame()
    # hard: not settled by consensus; the empty text never goes; no confidence first, then the lowest
    assert select_rows(df, rows="hard")["id"].tolist() == ["r2", "r1", "r3", "r6", "r7"]
    assert select_rows(df, rows="hard", limit=2)["id"].tolist() == ["r2", "r1"]
    # votes split (r3, r6) or the controller against the specialists (r1)
    assert select_rows(df, rows="disagreement")["id"].tolist() == ["r1", "r3", "r6"]
    assert select_rows(df, rows="low-confidence", limit=3)["id"].tolist() == ["r2", "r1", "r3"]
    assert select_rows(df, rows="all")["id"].tolist() == ["r2", "r1", "r3", "r6", "r7", "r4", "r0"]
    with pytest.raises(ConfigError, match="needs --limit"):
        select_rows(df, rows="low-confidence")
    # rows people reviewed already are not sent again, but for `all`
    reviewed = df.assign(decided_by=df["decided_by"].where(df["id"] != "r2", "human"))
    assert "r2" not in select_rows(reviewed, rows="hard")["id"].tolist()
    assert "r2" in select_rows(reviewed, rows="all")["id"].tolist()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_outputs_in_csv_and_jsonl_select_the_same_rows(tmp_path, suffix):
    from labelwright.orchestrator.dataset_io import read_frame

    path = write_frame(output_frame(), tmp_path / f"o{suffix}")
    assert select_rows(read_frame(path), rows="hard")["id"].tolist() == ["r2", "r1", "r3", "r6", "r7"]


def test_decide_takes_the_majority_and_a_tie_the_newest():
    a = [Answer("x", "u1", (1.0, 0)), Answer("y", "u2", (3.0, 1)), Answer("x", "u3", (2.0, 2))]
    assert decide(a) == ("x", 2, False)
    assert decide(a[:2]) == ("y", 1, True)
    assert decide([Answer("x", "u1", (5.0, 0)), Answer("y", "u2", (3.0, 1))]) == ("x", 1, True)


# ---------------------------------------------------------------- Label Studio


def label_studio_export(tasks: list[dict], answers: dict[str, list[dict]]) -> list[dict]:
    """What Label Studio's JSON export gives for the imported ``tasks`` once people annotated them: ``answers``
    per labelwright id, each ``{"choice", "by", "at", "cancelled"}``."""
    out = []
    for n, task in enumerate(tasks, start=1):
        annotations = []
        for k, a in enumerate(answers.get(task["data"]["labelwright_id"], []), start=1):
            result = [] if a.get("cancelled") else [{
                "value": {"choices": [a["choice"]]}, "id": f"res{n}{k}", "from_name": "label", "to_name": "text",
                "type": "choices", "origin": "manual"}]
            annotations.append({
                "id": 100 * n + k, "completed_by": a["by"], "result": result,
                "was_cancelled": bool(a.get("cancelled")), "ground_truth": False,
                "created_at": a["at"], "updated_at": a["at"], "draft_created_at": None, "lead_time": 4.288,
                "prediction": {}, "result_count": len(result), "unique_id": f"u{n}{k}", "import_id": None,
                "last_action": None, "bulk_created": False, "task": n, "project": 3, "updated_by": None,
                "parent_prediction": 7 * n, "parent_annotation": None, "last_created_by": None})
        out.append({"id": n, "annotations": annotations, "file_upload": "review.json", "drafts": [],
                    "predictions": [7 * n], "data": task["data"], "meta": {},
                    "created_at": "2024-05-02T10:00:00.000000Z", "updated_at": "2024-05-02T11:00:00.000000Z",
                    "inner_id": n, "total_annotations": len(annotations),
                    "cancelled_annotations": sum(1 for a in annotations if a["was_cancelled"]),
                    "total_predictions": 1, "comment_count": 0, "unresolved_comment_count": 0,
                    "last_comment_updated_at": None, "project": 3, "updated_by": None, "comment_authors": []})
    return out


def test_label_studio_round_trip(run, tmp_path, capsys):
    run_dir, out, _ = run
    dest = tmp_path / "review.json"
    assert main(["export-review", str(out), "--format", "label-studio", "--output", str(dest)]) == 0
    printed = capsys.readouterr().out
    assert "5 of 8 rows (hard) written" in printed and f"--run-dir {run_dir}" in printed
    config = ET.fromstring((tmp_path / "review.label_config.xml").read_text())
    choices = config.find("Choices")
    assert config.find("Text").attrib == {"name": "text", "value": "$text"}
    assert choices.attrib["name"] == "label" and choices.attrib["toName"] == "text"
    assert [c.attrib["value"] for c in choices] == ["positive", "negative"]
    assert choices[0].attrib["hint"] == LABELS["positive"]
    tasks = json.loads(dest.read_text())
    assert [t["data"]["labelwright_id"] for t in tasks] == ["r2", "r1", "r3", "r6", "r7"]
    first, second = tasks[0], tasks[1]
    assert second["data"] == {"text": TEXTS[1], "labelwright_id": "r1", "labelwright_row": 1,
                              "labelwright_decided_by": "controller", "labelwright_confidence": 0.55}
    assert second["predictions"] == [{"model_version": "labelwright", "score": 0.55, "result": [
        {"id": "labelwright-r1", "from_name": "label", "to_name": "text", "type": "choices",
         "value": {"choices": ["negative"]}}]}]
    # an unresolved row: the specialists' label as the pre-annotation, without a score
    assert "score" not in first["predictions"][0] and first["predictions"][0]["result"][0]["value"] == {
        "choices": ["negative"]}

    people = {
        "r2": [{"choice": "positive", "by": 10, "at": "2024-05-02T10:05:00.000000Z"},
               {"choice": "negative", "by": 11, "at": "2024-05-02T10:06:00.000000Z"}],  # a tie: the newer wins
        "r1": [{"choice": "negative", "by": {"id": 10, "email": "ann@example.com", "first_name": "", "last_name": ""},
                "at": "2024-05-02T10:01:00Z"},
               {"choice": "positive", "by": 11, "at": "2024-05-02T10:09:00Z"},
               {"choice": "negative", "by": 12, "at": "2024-05-02T10:03:00Z"}],
        "r3": [{"cancelled": True, "by": 10, "at": "2024-05-02T10:02:00Z"}],
        "r6": [{"cancelled": True, "by": 10, "at": "2024-05-02T10:02:00Z"},
               {"choice": "positive", "by": 11, "at": "2024-05-02T10:04:00Z"}],
    }
    export = tmp_path / "project-3-at-2024-05-02.json"
    export.write_text(json.dumps(label_studio_export(tasks, people), indent=2))
    assert main(["import-review", str(export), "--run-dir", str(run_dir)]) == 0
    said = capsys.readouterr().out
    assert "3 reviewed" in said and "2 with several answers" in said and "1 ties" in said
    assert "2 cancelled" in said and "2 records with no answer" in said
    reviews = read_reviews(run_dir).set_index("id")
    assert reviews["label"].to_dict() == {"r1": "negative", "r2": "negative", "r6": "positive"}
    assert reviews.loc["r1", "reviewer"] == "ann@example.com,11,12"
    assert reviews.loc["r1", "n_annotations"] == 3 and reviews.loc["r1", "agreement"] == pytest.approx(2 / 3)
    assert reviews.loc["r6", "n_annotations"] == 1  # the cancelled annotation is not counted
    assert reviews["row"].to_dict() == {"r1": 1, "r2": 2, "r6": 6} and (reviews["tool"] == "label-studio").all()
    assert reviews.loc["r2", "text"] == TEXTS[2]

    # a later import of the same rows: the newer answer wins, the others stay
    again = label_studio_export([t for t in tasks if t["data"]["labelwright_id"] == "r6"],
                                {"r6": [{"choice": "negative", "by": 13, "at": "2024-05-03T09:00:00Z"}]})
    (tmp_path / "later.json").write_text(json.dumps(again))
    done = import_review(tmp_path / "later.json", run_dir=run_dir, log=lambda _: None)
    assert done["replaced"] == 1 and done["total"] == 3
    assert read_reviews(run_dir).set_index("id")["label"].to_dict() == {"r1": "negative", "r2": "negative",
                                                                        "r6": "negative"}


def test_label_studio_exports_that_cannot_be_taken_say_why(run, tmp_path):
    run_dir, out, _ = run
    export_review(out, tool="label-studio", dest=tmp_path / "r.json", run_dir=run_dir)
    tasks = json.loads((tmp_path / "r.json").read_text())
    bad = tmp_path / "bad.json"

    def import_with(answers, items=None):
        bad.write_text(json.dumps(items if items is not None else label_studio_export(tasks, answers)))
        import_review(bad, run_dir=run_dir, log=lambda _: None)

    with pytest.raises(InputDataError, match=r"task 1, annotation 101 has the label 'meh', not in the run's label set"):
        import_with({"r2": [{"choice": "meh", "by": 1, "at": "2024-05-02T10:00:00Z"}]})
    with pytest.raises(InputDataError, match="2 labels chosen"):
        two = label_studio_export(tasks, {"r2": [{"choice": "positive", "by": 1, "at": "2024-05-02T10:00:00Z"}]})
        two[0]["annotations"][0]["result"][0]["value"]["choices"] = ["positive", "negative"]
        import_with(None, two)
    with pytest.raises(InputDataError, match="no data.labelwright_id"):
        import_with(None, [{"id": 4, "data": {"text": "x"}, "annotations": []}])
    with pytest.raises(InputDataError, match="not JSON-MIN or CSV"):  # one of Label Studio's other export formats
        import_with(None, [{"id": 4, "text": "x", "label": "positive", "annotator": 1, "annotation_id": 9}])
    moved = [dict(t, data={**t["data"], "text": "another text"}) for t in tasks]
    with pytest.raises(InputDataError, match="another text than row 2"):
        import_with(None, label_studio_export(moved, {"r2": [{"choice": "positive", "by": 1,
                                                              "at": "2024-05-02T10:00:00Z"}]}))
    foreign = [dict(t, data={**t["data"], "labelwright_id": "zz"}) for t in tasks]
    with pytest.raises(InputDataError, match="'zz' is not a row of the input"):
        import_with(None, label_studio_export(foreign, {"zz": [{"choice": "positive", "by": 1,
                                                               "at": "2024-05-02T10:00:00Z"}]}))
    assert read_reviews(run_dir) is None  # nothing half-written


# ---------------------------------------------------------------- Argilla

# argilla 2.8: records.to_list(flatten=True) of the four records the Argilla test reviews (response statuses given)
ARGILLA_FLAT = [json.loads(line) for line in """
{"id": "r1", "status": "completed", "_server_id": null, "text": "a dull, lifeless film", "labelwright_row": 1, "decided_by": "controller", "confidence": 0.55, "label.responses": ["negative", "negative", "positive"], "label.responses.users": ["00000000-0000-0000-0000-000000000001", "00000000-0000-0000-0000-000000000002", "00000000-0000-0000-0000-000000000003"], "label.responses.status": ["submitted", "submitted", "draft"], "label.suggestion": "negative", "label.suggestion.score": 0.55, "label.suggestion.agent": "labelwright"}
{"id": "r2", "status": "completed", "_server_id": null, "text": "not sure what to make of it", "labelwright_row": 2, "decided_by": "unresolved", "label.responses": ["positive", "negative"], "label.responses.users": ["00000000-0000-0000-0000-000000000001", "00000000-0000-0000-0000-000000000002"], "label.responses.status": ["submitted", "submitted"], "label.suggestion": "negative", "label.suggestion.score": null, "label.suggestion.agent": "labelwright", "confidence": null}
{"id": "r3", "status": "pending", "_server_id": null, "text": "the plot drags but the acting shines", "labelwright_row": 3, "decided_by": "combined", "confidence": 0.62, "label.responses": [null], "label.responses.users": ["00000000-0000-0000-0000-000000000001"], "label.responses.status": ["discarded"], "label.suggestion": "positive", "label.suggestion.score": 0.62, "label.suggestion.agent": "labelwright"}
{"id": "r7", "status": "pending", "_server_id": null, "text": "fine, I guess", "labelwright_row": 7, "decided_by": "controller", "confidence": 0.8, "label.responses": ["negative"], "label.responses.users": ["00000000-0000-0000-0000-000000000001"], "label.responses.status": ["draft"], "label.suggestion": "positive", "label.suggestion.score": 0.8, "label.suggestion.agent": "labelwright"}
""".strip().splitlines()]
# argilla 2.8: records.to_json / Record.to_dict of the same records (which give no response its status)
ARGILLA_NESTED = [json.loads(line) for line in """
{"id": "r1", "fields": {"text": "a dull, lifeless film"}, "metadata": {"labelwright_row": 1, "decided_by": "controller", "confidence": 0.55}, "suggestions": {"label": {"value": "negative", "score": 0.55, "agent": "labelwright"}}, "responses": {"label": [{"value": "negative", "user_id": "00000000-0000-0000-0000-000000000001"}, {"value": "negative", "user_id": "00000000-0000-0000-0000-000000000002"}, {"value": "positive", "user_id": "00000000-0000-0000-0000-000000000003"}]}, "vectors": {}, "status": "completed", "_server_id": null}
{"id": "r2", "fields": {"text": "not sure what to make of it"}, "metadata": {"labelwright_row": 2, "decided_by": "unresolved"}, "suggestions": {"label": {"value": "negative", "score": null, "agent": "labelwright"}}, "responses": {"label": [{"value": "positive", "user_id": "00000000-0000-0000-0000-000000000001"}, {"value": "negative", "user_id": "00000000-0000-0000-0000-000000000002"}]}, "vectors": {}, "status": "completed", "_server_id": null}
{"id": "r3", "fields": {"text": "the plot drags but the acting shines"}, "metadata": {"labelwright_row": 3, "decided_by": "combined", "confidence": 0.62}, "suggestions": {"label": {"value": "positive", "score": 0.62, "agent": "labelwright"}}, "responses": {"label": [{"value": null, "user_id": "00000000-0000-0000-0000-000000000001"}]}, "vectors": {}, "status": "pending", "_server_id": null}
{"id": "r7", "fields": {"text": "fine, I guess"}, "metadata": {"labelwright_row": 7, "decided_by": "controller", "confidence": 0.8}, "suggestions": {"label": {"value": "positive", "score": 0.8, "agent": "labelwright"}}, "responses": {"label": [{"value": "negative", "user_id": "00000000-0000-0000-0000-000000000001"}]}, "vectors": {}, "status": "pending", "_server_id": null}
""".strip().splitlines()]


def test_argilla_export_is_what_argilla_writes_for_the_same_records(run, tmp_path):
    run_dir, out, _ = run
    done = export_review(out, tool="argilla", dest=tmp_path / "review.json", run_dir=run_dir)
    assert done["written"] == 5 and done["beside"] == str(tmp_path / "review.settings.json")
    ours = {r["id"]: r for r in json.loads((tmp_path / "review.json").read_text())}
    for theirs in ARGILLA_NESTED:  # Argilla's own Record.to_dict, less what people and the server add
        mine = ours[theirs["id"]]
        assert {k: mine[k] for k in ("id", "fields", "metadata", "suggestions")} == \
            {k: theirs[k] for k in ("id", "fields", "metadata", "suggestions")}
        assert mine["responses"] == {} and mine["vectors"] == {}
    settings = json.loads((tmp_path / "review.settings.json").read_text())
    assert [f["name"] for f in settings["fields"]] == ["text"] and settings["fields"][0]["settings"]["type"] == "text"
    (question,) = settings["questions"]
    assert question["name"] == "label" and question["settings"]["type"] == "label_selection"
    assert [o["value"] for o in question["settings"]["options"]] == ["positive", "negative"]
    assert [m["name"] for m in settings["metadata"]] == ["labelwright_row", "decided_by", "confidence"]
    assert settings["guidelines"].startswith("Classify the sentiment")


@pytest.mark.parametrize("shape", ["flat", "nested", "jsonl"])
def test_argilla_round_trip(run, tmp_path, shape, capsys):
    run_dir, _, _ = run
    path = tmp_path / ("export.jsonl" if shape == "jsonl" else "export.json")
    if shape == "jsonl":  # records.to_datasets().to_json(): one flat record a line
        path.write_text("\n".join(json.dumps(r) for r in ARGILLA_FLAT) + "\n")
    else:
        path.write_text(json.dumps(ARGILLA_FLAT if shape == "flat" else ARGILLA_NESTED))
    assert main(["import-review", str(path), "--run-dir", str(run_dir)]) == 0
    said = capsys.readouterr().out
    reviews = read_reviews(run_dir).set_index("id")
    # r2: a tie between two submitted responses, the one listed last wins
    assert reviews["label"].to_dict() == {"r1": "negative", "r2": "negative"}
    assert (reviews["tool"] == "argilla").all() and reviews.loc["r2", "agreement"] == 0.5
    if shape == "nested":  # no response's status: the completed records' responses count, the draft too
        assert reviews.loc["r1", "n_annotations"] == 3
        assert "2 pending records left out" in said and "to_list(flatten=True)" in said
    else:  # only submitted responses
        assert reviews.loc["r1", "n_annotations"] == 2 and reviews.loc["r1", "agreement"] == 1.0
        assert "1 discarded" in said and "2 draft" in said


def test_argilla_label_outside_the_set_names_the_record(run, tmp_path):
    run_dir, _, _ = run
    bad = [dict(ARGILLA_FLAT[0], **{"label.responses": ["neutral", "negative", "positive"]})]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(InputDataError, match=r"record 'r1', response 0 \(user [0-]+1\) has the label 'neutral'"):
        import_review(tmp_path / "bad.json", run_dir=run_dir, log=lambda _: None)
    (tmp_path / "odd.json").write_text(json.dumps([{"text": "x", "sentiment": "positive"}]))
    with pytest.raises(InputDataError, match="looks like neither a Label Studio JSON export nor"):
        import_review(tmp_path / "odd.json", run_dir=run_dir, log=lambda _: None)


# ---------------------------------------------------------------- the next run


def write_reviews(run_dir: Path, rows: dict[str, str]) -> None:
    ids = list(rows)
    pd.DataFrame({"id": ids, "row": [int(i[1:]) for i in ids], "text": [TEXTS[int(i[1:])] for i in ids],
                  "label": list(rows.values()), "tool": "argilla", "reviewer": "u1", "n_annotations": 1,
                  "agreement": 1.0, "file": "x.json", "imported_at": "2024-05-02T10:00:00+00:00"}
                 ).to_parquet(run_dir / REVIEWS_FILE, index=False)


def test_output_rows_people_reviewed_are_decided_by_human(tmp_path):
    write_reviews(tmp_path, {"r1": "positive", "r2": "positive", "r7": "positive"})
    lines = []
    df, block = apply_reviews(output_frame().assign(text=lambda d: d["text"].where(d["id"] != "r7", "edited")),
                              tmp_path, log=lines.append)
    human = df[df["decided_by"] == "human"]
    assert human["id"].tolist() == ["r1", "r2"]  # r7's text is not the one reviewed: left alone
    assert human["label"].tolist() == ["positive", "positive"]
    assert human["machine_label"].tolist() == ["negative", None]
    assert human["machine_decided_by"].tolist() == ["controller", "unresolved"]
    assert human["confidence"].tolist() == [1.0, 1.0] and human["reviewer"].tolist() == ["u1", "u1"]
    assert human["reason"].isna().all() and not human["retryable"].any()
    assert human["controller_label"].iloc[0] == "negative"  # the model's answers stay in their columns
    assert human["specialists_label"].tolist() == ["positive", "negative"]
    assert df.loc[df["id"] == "r7", "decided_by"].item() == "controller"
    assert block == {"file": str(tmp_path / REVIEWS_FILE), "reviewed": 3, "rows": 2, "not_in_output": 1,
                     "changed": 2, "changed_by_decided_by": {"controller": 1, "unresolved": 1}, "gold_rows": 2,
                     "accuracy": 0.5, "machine_accuracy": 0.5}
    assert "2 rows decided by people" in lines[0]
    same, none = apply_reviews(output_frame(), tmp_path / "none", log=lines.append)
    assert none is None
    pd.testing.assert_frame_equal(same, output_frame())


def test_reviews_join_the_gold_reference_rows_of_a_run_that_starts_over(run):
    run_dir, _, staged = run
    many = {f"r{i}": "positive" for i in (0, 1, 2, 3, 4, 6, 7)}
    write_reviews(run_dir, many)
    lines = []
    s = spec(stages={"min_check_rows": 5})
    rows, reviewed = reviews_as_gold(None, run_dir, staged=staged, spec=s, resumed=False, log=lines.append)
    assert rows["text"].tolist() == [TEXTS[i] for i in (0, 1, 2, 3, 4, 6, 7)] and set(rows["label"]) == {"positive"}
    assert rows["source"].eq("review").all() and rows["id"].tolist()[0] == "review-r0"
    assert reviewed == {0, 1, 2, 3, 4, 6, 7}
    assert "join the reference rows the way voting.gold_file rows do" in lines[-1]
    # with a gold file: both, the people's label winning on a text in both
    gold = pd.DataFrame({"text": [TEXTS[1], "another review"], "label": ["negative", "negative"],
                         "id": ["gold-0", "gold-1"], "source": "gold"})
    rows, _ = reviews_as_gold(gold, run_dir, staged=staged, spec=s, resumed=False, log=lines.append)
    assert dict(zip(rows["text"], rows["label"]))[TEXTS[1]] == "positive" and "another review" in set(rows["text"])
    # not taken: a resumed run, a gold column, too few, routing by the threshold
    for why, kwargs in (("this run resumes", {"spec": s, "resumed": True}),
                        ("gold column stays the reference", {"spec": spec(gold_column="label"), "resumed": False}),
                        ("too few to check the stages on", {"spec": spec(), "resumed": False}),
                        ("routing is by the rule's threshold", {"spec": spec(voting={"route": "threshold"},
                                                                             stages={"min_check_rows": 5}),
                                                                "resumed": False})):
        assert reviews_as_gold(None, run_dir, staged=staged, log=lines.append, **kwargs) == (None, set())
        assert why in lines[-1] and "decide their rows of the output" in lines[-1]


def test_fresh_keeps_the_reviews_and_nothing_else(run):
    run_dir, _, _ = run
    write_reviews(run_dir, {"r1": "positive"})
    (run_dir / "parts").mkdir()
    (run_dir / "parts" / "part-00000.parquet").write_bytes(b"x")
    _prepare_run_dir(run_dir, {"another": "task"}, fresh=True)
    assert sorted(p.name for p in run_dir.iterdir()) == ["reviews.parquet", "task.json"]
    assert read_reviews(run_dir)["label"].tolist() == ["positive"]


def test_export_needs_the_label_set(tmp_path, capsys):
    out = write_frame(output_frame(), tmp_path / "o.parquet")
    assert main(["export-review", str(out), "--format", "argilla", "--output", str(tmp_path / "r.json")]) == 2
    assert "--labels a,b,c" in capsys.readouterr().err
    assert main(["export-review", str(out), "--format", "argilla", "--labels", "positive,negative", "--rows",
                 "low-confidence", "--output", str(tmp_path / "r.json")]) == 2
    assert "needs --limit" in capsys.readouterr().err
    assert main(["export-review", str(out), "--format", "argilla", "--labels", "positive,negative", "--rows",
                 "low-confidence", "--limit", "2", "--output", str(tmp_path / "r.json")]) == 0
    assert [r["id"] for r in json.loads((tmp_path / "r.json").read_text())] == ["r2", "r1"]
