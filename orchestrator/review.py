"""People in the loop: rows of a run out to a labelling tool, and the people's answers back as gold rows.

``labelwright export-review`` writes the rows people should look at (the hard ones, the least confident, those
the models disagree on, or all) with labelwright's answer as a pre-annotation, in the import format of

- **Label Studio**: a JSON list of tasks, each ``{"data": {"text": ...}, "predictions": [{"model_version",
  "score", "result": [a choices result]}]}``, and the labeling config (``<Text name="text">`` and
  ``<Choices name="label">``) beside it to create the project with;
- **Argilla 2.x**: a JSON list of records as ``rg.Record.to_dict`` writes them and ``rg.Record.from_dict``
  reads them (``fields``, ``metadata``, ``suggestions`` with ``score`` and ``agent``), and the dataset
  settings as ``rg.Settings.to_json`` writes them (a ``TextField`` text, a ``LabelQuestion`` label).

``labelwright import-review`` reads the tool's own export back (Label Studio's JSON export; Argilla's
``records.to_json`` or ``records.to_list(flatten=True)``): one label a row, from the answers people submitted
(several: the majority, a tie going to the newest), checked against the run's label set and input. The answers
are kept in ``<run_dir>/reviews.parquet``, merged with earlier imports (the newer answer wins per id); ``--fresh``
keeps that file, it is people's work.

On the next run of the task the reviews are used twice (:func:`reviews_as_gold`, :func:`apply_reviews`): a run that
starts over takes them as gold reference rows, the way ``voting.gold_file`` rows are taken (the controller is
measured on them, the linear specialists learn from them, the controller is shown them as demonstrations); and every
run writes the people's label on their rows (``decided_by: human``), labelwright's own answer staying beside it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable
from xml.sax.saxutils import quoteattr

import numpy as np
import pandas as pd

from labelwright.orchestrator.dataset_io import read_frame, write_frame
from labelwright.specialists.errors import ConfigError, InputDataError

TOOLS = ("label-studio", "argilla")
SELECTIONS = ("hard", "low-confidence", "disagreement", "all")
REVIEWS_FILE = "reviews.parquet"
HUMAN = "human"  # decided_by of a row people reviewed
# decided_by values of rows the models settled without the controller's doubt: not "hard"
SETTLED = ("consensus", "model")
QUESTION, FIELD = "label", "text"  # Label Studio's control and object tag names; Argilla's question and field
AGENT = "labelwright"  # Label Studio's model_version, Argilla's suggestion agent
REVIEW_COLUMNS = ["id", "row", "text", "label", "tool", "reviewer", "n_annotations", "agreement", "file",
                  "imported_at"]


def _log(msg: str) -> None:  # the export and import commands' own report, on stdout
    print(msg, flush=True)


@dataclass(frozen=True)
class RunTask:
    """What a run labels with: its label set, their descriptions and the instruction (from ``task.json``)."""

    labels: list[str]
    descriptions: dict[str, str]
    instruction: str | None


def run_task(run_dir: str | Path, *, labels: list[str] | None = None) -> RunTask:
    """The task of the run in ``run_dir`` (its ``task.json``); ``labels`` when there is none."""
    path = Path(run_dir) / "task.json"
    if path.is_file():
        task = json.loads(path.read_text())["task"]
        return RunTask([x["name"] for x in task["labels"]],
                       {x["name"]: x["description"] for x in task["labels"] if x.get("description")},
                       task.get("instruction"))
    if labels:
        return RunTask(list(labels), {}, None)
    raise ConfigError(f"{path} does not exist, so the run's label set is unknown: pass --run-dir with the run "
                      "directory of the output (OUTPUT.run by default), or --labels a,b,c")


# ---------------------------------------------------------------- which rows people see


def _blank(values: pd.Series) -> pd.Series:
    """Labels with every kind of missing value (None, NaN, the empty cell of a CSV) as None."""
    s = values.astype(object)
    return s.where(s.notna() & (s.astype(str) != ""), None)


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    """An output file as read back (CSV and JSONL cells come as text): labels with None for missing, numbers
    as numbers."""
    df = df.copy()
    for col in ["label", "specialists_label", "controller_label", "decided_by"] + \
            [c for c in df.columns if c.startswith("vote_")]:
        if col in df.columns:
            df[col] = _blank(df[col])
    df["confidence"] = pd.to_numeric(df["confidence"], errors="coerce") if "confidence" in df.columns else np.nan
    df["row"] = pd.to_numeric(df["row"], errors="coerce").astype("Int64")
    df["id"] = df["id"].astype(str)
    df["text"] = df["text"].fillna("").astype(str)
    return df


def disagreeing(df: pd.DataFrame) -> pd.Series:
    """Rows whose specialists voted for different labels, or whose controller answered other than the
    specialists' label."""
    votes = [c for c in df.columns if c.startswith("vote_")]
    split = df[votes].nunique(axis=1, dropna=True) > 1 if votes else pd.Series(False, index=df.index)
    if {"controller_label", "specialists_label"} <= set(df.columns):
        c, s = df["controller_label"], df["specialists_label"]
        split |= c.notna() & s.notna() & (c != s)
    return split.astype(bool)


def select_rows(df: pd.DataFrame, *, rows: str = "hard", limit: int | None = None) -> pd.DataFrame:
    """The rows of an output frame to review, the most doubtful first (missing confidence, then the lowest).

    ``hard``: rows the specialists did not settle (decided by the controller, the combination, the final vote,
    the student, or unresolved); ``low-confidence``: every row, for ``limit`` to cut (it requires one);
    ``disagreement``: rows whose specialists disagree, or whose controller answered otherwise (:func:`disagreeing`);
    ``all``. Rows with an empty text are never sent, and rows people already reviewed only with ``all``."""
    if rows not in SELECTIONS:
        raise ConfigError(f"--rows {rows!r} is unknown; use one of {', '.join(SELECTIONS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} must be at least 1")
    if rows == "low-confidence" and limit is None:
        raise ConfigError("--rows low-confidence needs --limit N: the N least confident rows")
    df = _plain(df)
    keep = df["text"].str.strip() != ""
    if rows != "all":
        keep &= df["decided_by"] != HUMAN
    if rows == "hard":
        keep &= ~df["decided_by"].isin(SETTLED)
    elif rows == "disagreement":
        keep &= disagreeing(df)
    picked = df[keep]
    order = np.lexsort((picked["row"].fillna(-1).to_numpy(), picked["confidence"].fillna(-1.0).to_numpy()))
    picked = picked.iloc[order]
    return (picked.head(limit) if limit is not None else picked).reset_index(drop=True)


def _suggestion(row) -> tuple[str | None, float | None]:
    """labelwright's answer on a row to show people: its label and confidence; an unresolved row's
    specialists' label, with no score."""
    if row["label"] is not None:
        return row["label"], (None if pd.isna(row["confidence"]) else float(row["confidence"]))
    return row.get("specialists_label"), None


# ---------------------------------------------------------------- out: Label Studio


def label_studio_tasks(rows: pd.DataFrame) -> list[dict]:
    """Label Studio tasks (basic JSON import format) with labelwright's answer as a prediction."""
    tasks = []
    for _, r in rows.iterrows():
        data = {FIELD: r["text"], "labelwright_id": r["id"],
                "labelwright_row": None if pd.isna(r["row"]) else int(r["row"]),
                "labelwright_decided_by": r["decided_by"],
                "labelwright_confidence": None if pd.isna(r["confidence"]) else float(r["confidence"])}
        task = {"data": {k: v for k, v in data.items() if v is not None}}
        label, score = _suggestion(r)
        if label is not None:
            prediction = {"model_version": AGENT,
                          "result": [{"id": f"labelwright-{r['id']}", "from_name": QUESTION, "to_name": FIELD,
                                      "type": "choices", "value": {"choices": [label]}}]}
            if score is not None:
                prediction["score"] = score
            task["predictions"] = [prediction]
        tasks.append(task)
    return tasks


def label_studio_config(task: RunTask) -> str:
    """The labeling config of the review project: the text and one choice among the run's labels."""
    lines = ["<View>"]
    if task.instruction:
        lines.append(f"  <Header value={quoteattr(task.instruction)}/>")
    lines.append(f'  <Text name="{FIELD}" value="${FIELD}"/>')
    lines.append(f'  <Choices name="{QUESTION}" toName="{FIELD}" choice="single" showInLine="true">')
    for lab in task.labels:
        hint = f" hint={quoteattr(task.descriptions[lab])}" if lab in task.descriptions else ""
        lines.append(f"    <Choice value={quoteattr(lab)}{hint}/>")
    lines += ["  </Choices>", "</View>", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- out: Argilla


def argilla_records(rows: pd.DataFrame) -> list[dict]:
    """Argilla 2.x records as ``rg.Record.to_dict`` writes them (``rg.Record.from_dict`` reads them back), with
    labelwright's answer as the suggestion of the label question."""
    records = []
    for _, r in rows.iterrows():
        metadata = {"labelwright_row": None if pd.isna(r["row"]) else int(r["row"]), "decided_by": r["decided_by"],
                    "confidence": None if pd.isna(r["confidence"]) else float(r["confidence"])}
        label, score = _suggestion(r)
        records.append({
            "id": r["id"], "fields": {FIELD: r["text"]},
            "metadata": {k: v for k, v in metadata.items() if v is not None},
            "suggestions": {QUESTION: {"value": label, "score": score, "agent": AGENT}} if label is not None else {},
            "responses": {}, "vectors": {},
        })
    return records


def argilla_settings(task: RunTask) -> dict:
    """The review dataset's settings as ``rg.Settings.to_json`` writes them (``rg.Settings.from_json`` reads
    them): the text, one label among the run's, and labelwright's row, decider and confidence to filter by."""
    guide = [task.instruction] if task.instruction else []
    guide += [f"- **{lab}**: {task.descriptions[lab]}" for lab in task.labels if lab in task.descriptions]

    def meta(name: str, title: str, settings: dict) -> dict:
        return {"name": name, "title": title, "settings": {"visible_for_annotators": True, **settings},
                "visible_for_annotators": True}

    return {
        "guidelines": "\n\n".join(guide) or None,
        "fields": [{"name": FIELD, "title": "Text", "required": True, "description": None,
                    "settings": {"type": "text", "use_markdown": False}}],
        "questions": [{"name": QUESTION, "title": "Label", "description": None, "required": True,
                       "settings": {"type": "label_selection", "visible_options": None,
                                    "options": [{"value": lab, "text": lab, "description": task.descriptions.get(lab)}
                                                for lab in task.labels]}}],
        "vectors": [],
        "metadata": [meta("labelwright_row", "labelwright row", {"type": "integer", "min": None, "max": None}),
                     meta("decided_by", "decided by", {"type": "terms", "values": None}),
                     meta("confidence", "confidence", {"type": "float", "min": None, "max": None})],
        "allow_extra_metadata": False,
        "distribution": {"strategy": "overlap", "min_submitted": 1},
        "mapping": None,
    }


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def export_review(output: str | Path, *, tool: str, dest: str | Path, run_dir: str | Path, rows: str = "hard",
                  limit: int | None = None, labels: list[str] | None = None) -> dict:
    """Write the rows of the output file ``output`` chosen by ``rows`` (:func:`select_rows`) to ``dest`` in
    ``tool``'s import format, and the project's config (Label Studio) or settings (Argilla) beside it.
    Returns what was written."""
    if tool not in TOOLS:
        raise ConfigError(f"--format {tool!r} is unknown; use one of {', '.join(TOOLS)}")
    output, dest = Path(output), Path(dest)
    if not output.is_file():
        raise InputDataError(f"output file {output} does not exist; give the --output of an annotate run")
    df = read_frame(output)
    missing = {"row", "id", "text", "label", "decided_by"} - set(df.columns)
    if missing:
        raise InputDataError(f"{output} lacks the columns {sorted(missing)}: is it the output of labelwright annotate?")
    task = run_task(run_dir, labels=labels)
    picked = select_rows(df, rows=rows, limit=limit)
    if tool == "label-studio":
        side = dest.with_name(dest.stem + ".label_config.xml")
        _write_text(side, label_studio_config(task))
        payload = label_studio_tasks(picked)
    else:
        side = dest.with_name(dest.stem + ".settings.json")
        _write_text(side, json.dumps(argilla_settings(task), indent=1, ensure_ascii=False))
        payload = argilla_records(picked)
    _write_text(dest, json.dumps(payload, indent=1, ensure_ascii=False))
    return {"tool": tool, "rows": rows, "written": len(picked), "of": len(df), "file": str(dest), "beside": str(side),
            "limit": limit}


# ---------------------------------------------------------------- back: the tools' exports


@dataclass(frozen=True)
class Answer:
    label: str
    reviewer: str
    order: tuple  # sorts the answers of a record oldest first


@dataclass(frozen=True)
class Review:
    """One record's reviewed label: the majority of its answers, a tie going to the newest."""

    id: str
    text: str
    label: str
    reviewer: str
    n_annotations: int
    agreement: float
    tie: bool


def decide(answers: list[Answer]) -> tuple[str, int, bool]:
    """The label most answers give, a tie broken by the newest answer among the tied labels: (label, its
    answers, whether there was a tie)."""
    counts = Counter(a.label for a in answers)
    top = max(counts.values())
    tied = [lab for lab, n in counts.items() if n == top]
    if len(tied) == 1:
        return tied[0], top, False
    newest = max((a for a in answers if a.label in tied), key=lambda a: a.order)
    return newest.label, top, True


def _time(value) -> float:
    """An ISO time of Label Studio's (``2021-03-09T22:16:08.728353Z``) as seconds; -inf when there is none."""
    if not value:
        return float("-inf")
    try:
        t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return float("-inf")
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def _review(rid: str, text: str, answers: list[Answer]) -> Review:
    label, votes, tie = decide(answers)
    reviewers = list(dict.fromkeys(a.reviewer for a in answers if a.reviewer))
    return Review(rid, text, label, ",".join(reviewers), len(answers), votes / len(answers), tie)


def _check_label(label, allowed: set[str], *, where: str, what: str) -> str:
    if not isinstance(label, str) or label not in allowed:
        raise InputDataError(f"{where} has the label {label!r}, not in the run's label set {sorted(allowed)}; {what}")
    return label


def parse_label_studio(items: list, *, allowed: set[str], path: Path) -> tuple[list[Review], Counter]:
    """Reviews from Label Studio's JSON export (tasks with ``annotations``): cancelled (skipped) annotations and
    those without a choice are left out; several annotations give the majority label, a tie the newest."""
    reviews, counts = [], Counter()
    for n, task in enumerate(items):
        where = f"{path}: task {task.get('id', f'#{n}')}" if isinstance(task, dict) else f"{path}: item #{n}"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise InputDataError(f"{where} is not a Label Studio task (an object with 'data'); export the project "
                                 "as JSON (not JSON-MIN or CSV) and import that file")
        data = task["data"]
        if "labelwright_id" not in data:
            raise InputDataError(f"{where} has no data.labelwright_id: only tasks written by labelwright export-review "
                                 "can be imported; export the rows with it and review those")
        annotations = task.get("annotations", task.get("completions")) or []
        answers = []
        for k, a in enumerate(annotations):
            if a.get("was_cancelled") or a.get("skipped"):
                counts["cancelled"] += 1
                continue
            choices = [r for r in a.get("result") or [] if r.get("type") == "choices"]
            ours = [r for r in choices if r.get("from_name") == QUESTION] or choices
            if not ours:
                counts["empty"] += 1
                continue
            picked = ours[0].get("value", {}).get("choices") or []
            if len(ours) > 1 or len(picked) != 1:
                raise InputDataError(f"{where}, annotation {a.get('id', k)}: {len(picked)} labels chosen; labelwright "
                                     "takes one label a row: keep choice=\"single\" in the labeling config and fix it")
            label = _check_label(picked[0], allowed, where=f"{where}, annotation {a.get('id', k)}",
                                 what="use the labeling config labelwright export-review wrote, or fix the choice")
            by = a.get("completed_by")
            reviewer = str(by.get("email") or by.get("id")) if isinstance(by, dict) else ("" if by is None else str(by))
            answers.append(Answer(label, reviewer, (_time(a.get("updated_at") or a.get("created_at")), k)))
        if answers:
            reviews.append(_review(str(data["labelwright_id"]), str(data.get(FIELD, "")), answers))
        else:
            counts["unreviewed"] += 1
    return reviews, counts


def parse_argilla(items: list, *, allowed: set[str], path: Path) -> tuple[list[Review], Counter]:
    """Reviews from an Argilla 2.x export: ``records.to_list(flatten=True)`` (each response's status given: only
    ``submitted`` ones count) or ``records.to_json`` / ``to_list()`` (which give no response its status: the
    responses of records whose status is ``completed`` count). Several responses give the majority label; a tie goes to the
    one listed last (the export carries no times)."""
    reviews, counts = [], Counter()
    for n, rec in enumerate(items):
        if not isinstance(rec, dict) or "id" not in rec:
            raise InputDataError(f"{path}: item #{n} is not an Argilla record (an object with 'id'); export with "
                                 "dataset.records.to_json(PATH) or json.dump(dataset.records.to_list(flatten=True))")
        where = f"{path}: record {rec['id']!r}"
        if isinstance(rec.get("fields"), dict):  # nested: Record.to_dict
            text = rec["fields"].get(FIELD)
            given = (rec.get("responses") or {}).get(QUESTION) or []
            responses = [(r.get("value"), r.get("user_id"), r.get("status")) for r in given]
            if responses and all(s is None for _, _, s in responses) and rec.get("status") != "completed":
                counts["pending"] += 1  # drafts and submissions cannot be told apart: wait for completion
                continue
        else:  # flat: to_list(flatten=True), to_datasets()
            text = rec.get(FIELD)
            values = rec.get(f"{QUESTION}.responses") or []
            users = rec.get(f"{QUESTION}.responses.users") or [None] * len(values)
            status = rec.get(f"{QUESTION}.responses.status") or [None] * len(values)
            responses = list(zip(values, users, status))
        answers = []
        for k, (value, user, status) in enumerate(responses):
            if status not in (None, "submitted"):
                counts[str(status)] += 1
                continue
            if value is None:
                counts["empty"] += 1
                continue
            label = _check_label(value, allowed, where=f"{where}, response {k} (user {user})",
                                 what="create the dataset with the settings labelwright export-review wrote, or "
                                      "fix the response")
            answers.append(Answer(label, "" if user is None else str(user), (k,)))
        if answers:
            reviews.append(_review(str(rec["id"]), "" if text is None else str(text), answers))
        else:
            counts["unreviewed"] += 1
    return reviews, counts


def _load(path: Path) -> list:
    """The items of a JSON file (a list; an object of objects, as Argilla's ``to_dict(orient="index")``) or of a
    JSON Lines file."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise InputDataError(f"{path} is neither JSON nor JSON Lines ({exc.msg} at line {exc.lineno}); give the "
                                 "file the tool exported") from None
    if isinstance(data, dict):
        data = list(data.values()) if data and all(isinstance(v, dict) for v in data.values()) else [data]
    if not isinstance(data, list):
        raise InputDataError(f"{path} holds no list of tasks or records; give the file the tool exported")
    return data


def detect_tool(items: list, path: Path) -> str:
    first = next((x for x in items if isinstance(x, dict)), {})
    if "data" in first and ("annotations" in first or "completions" in first or "predictions" in first):
        return "label-studio"
    if "fields" in first or any(k.endswith(".responses") or k.endswith(".suggestion") for k in first):
        return "argilla"
    raise InputDataError(f"{path} looks like neither a Label Studio JSON export nor an Argilla export: export "
                         "the Label Studio project as JSON (not JSON-MIN or CSV: tasks with 'data' and "
                         "'annotations'), or the Argilla records with records.to_json or to_list(flatten=True); or "
                         "pass --format")


def _input_rows(run_dir: Path, ids: set[str]) -> dict[str, tuple[int, str]]:
    """The staged input's rows with one of ``ids``: id -> (row, text)."""
    manifest = run_dir / "input" / "manifest.json"
    if not manifest.is_file():
        raise InputDataError(f"{run_dir} holds no staged input ({manifest} is missing): import reviews into the run "
                             "directory of the run whose output was exported")
    found: dict[str, tuple[int, str]] = {}
    for shard in json.loads(manifest.read_text())["shards"]:
        d = pd.read_parquet(run_dir / "input" / shard["file"], columns=["row", "id", "text"])
        d = d[d["id"].astype(str).isin(ids)]
        found.update({str(i): (int(r), t) for i, r, t in zip(d["id"], d["row"], d["text"])})
    return found


def read_reviews(run_dir: str | Path) -> pd.DataFrame | None:
    """The reviews imported into ``run_dir`` (None: none)."""
    path = Path(run_dir) / REVIEWS_FILE
    return pd.read_parquet(path) if path.is_file() else None


def import_review(path: str | Path, *, run_dir: str | Path, tool: str | None = None,
                  log: Callable[[str], None] = _log) -> dict:
    """Read a tool's export of reviewed rows into ``<run_dir>/reviews.parquet`` (newer answers replace earlier
    ones, per id). Every reviewed record must be a row of the run's input (same id, same text) with a label of
    its label set. Returns what was read."""
    path, run_dir = Path(path), Path(run_dir)
    if not path.is_file():
        raise InputDataError(f"review file {path} does not exist")
    if tool is not None and tool not in TOOLS:
        raise ConfigError(f"--format {tool!r} is unknown; use one of {', '.join(TOOLS)}")
    task = run_task(run_dir)
    items = _load(path)
    tool = tool or detect_tool(items, path)
    parse = parse_label_studio if tool == "label-studio" else parse_argilla
    reviews, counts = parse(items, allowed=set(task.labels), path=path)
    rows = _input_rows(run_dir, {r.id for r in reviews})
    for r in reviews:
        if r.id not in rows:
            raise InputDataError(f"{path}: reviewed record {r.id!r} is not a row of the input of {run_dir}; import "
                                 "reviews into the run directory of the run whose output was exported")
        if r.text and rows[r.id][1] != r.text:
            raise InputDataError(f"{path}: reviewed record {r.id!r} has another text than row {rows[r.id][0]} of the "
                                 f"input of {run_dir}; import reviews into the run directory they were exported from")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    new = pd.DataFrame({"id": [r.id for r in reviews], "row": [rows[r.id][0] for r in reviews],
                        "text": [rows[r.id][1] for r in reviews], "label": [r.label for r in reviews], "tool": tool,
                        "reviewer": [r.reviewer for r in reviews], "n_annotations": [r.n_annotations for r in reviews],
                        "agreement": [r.agreement for r in reviews], "file": str(path), "imported_at": now},
                       columns=REVIEW_COLUMNS)
    old = read_reviews(run_dir)
    replaced = 0
    if old is not None:
        replaced = int(old["id"].isin(new["id"]).sum())
        new = pd.concat([old[~old["id"].isin(new["id"])], new], ignore_index=True)
    new = new.astype({"row": "int64", "n_annotations": "int64", "agreement": "float64"})
    write_frame(new.sort_values(["row", "id"]).reset_index(drop=True), run_dir / REVIEWS_FILE, "parquet")
    out = {"file": str(path), "tool": tool, "items": len(items), "reviewed": len(reviews),
           "several": sum(1 for r in reviews if r.n_annotations > 1), "ties": sum(1 for r in reviews if r.tie),
           "skipped": dict(counts), "replaced": replaced, "total": len(new), "reviews": str(run_dir / REVIEWS_FILE)}
    log(review_text(out))
    return out


def review_text(out: dict) -> str:
    """What an import read, in words."""
    tie = "the newest answer" if out["tool"] == "label-studio" else "the response listed last"
    lines = [f"read {out['items']} {out['tool']} records from {out['file']}: {out['reviewed']} reviewed"]
    if out["several"]:
        lines.append(f"  {out['several']} with several answers: the majority label, a tie going to {tie} "
                     f"({out['ties']} ties)")
    skipped = out["skipped"]
    for key, what in (("cancelled", "cancelled (skipped) annotations left out"),
                      ("discarded", "discarded responses left out"), ("draft", "draft responses left out"),
                      ("empty", "answers without a label left out"), ("unreviewed", "records with no answer to take"),
                      ("pending", "pending records left out (this export does not say which responses were "
                                  "submitted: export with records.to_list(flatten=True) to take them now)")):
        if skipped.get(key):
            lines.append(f"  {skipped[key]} {what}")
    lines.append(f"{out['reviews']} now holds {out['total']} reviewed rows ({out['replaced']} replaced earlier "
                 "reviews); run the same annotate command to write them into the output (decided_by: human), or "
                 "with --fresh to also learn from them")
    return "\n".join(lines)


# ---------------------------------------------------------------- the next run


def reviews_as_gold(gold_file_rows: pd.DataFrame | None, run_dir: Path, *, staged, spec, resumed: bool,
                    log: Callable[[str], None] = _log) -> tuple[pd.DataFrame | None, set[int]]:
    """The gold rows of ``voting.gold_file`` with the run's reviews added (text, label, id, source ``review``), and
    the input rows reviewed (the stages never train on them: they are the rows the stages are checked on).

    The reviews join when the run starts from nothing (not ``resumed``: a resumed run keeps the reference its
    labelled rows were routed by), when there is no gold column in the input (a random sample, which reviewed
    rows, chosen by doubt, are not) unless a gold file replaces it, and when they are enough to check the
    stages on (``stages.min_check_rows``) or join a gold file. A people's label wins over the gold file's on the
    same text."""
    reviews = read_reviews(run_dir)
    if reviews is None or reviews.empty:
        return gold_file_rows, set()
    where = Path(run_dir) / REVIEWS_FILE
    head = f"reviews: {len(reviews)} reviewed rows in {where} decide their rows of the output (decided_by: human)"
    measured = spec.mode == "active" or (spec.voting.route == "measured" and spec.voting.reference_rows > 0)
    why = None
    if resumed:
        why = "this run resumes: its reference rows stay those its labelled rows were routed by (--fresh starts over)"
    elif not measured:
        why = "routing is by the rule's threshold (voting.route), so no reference rows are asked"
    elif spec.gold_column and gold_file_rows is None:
        why = "the input's gold column stays the reference (random rows; reviewed rows were chosen by doubt)"
    elif gold_file_rows is None and len(reviews) < spec.stages.min_check_rows:
        why = (f"they are too few to check the stages on (stages.min_check_rows={spec.stages.min_check_rows}); "
               "review more rows")
    if why:
        log(f"{head}; they are not reference rows: {why}")
        return gold_file_rows, set()
    allowed = set(spec.label_names)
    bad = reviews[~reviews["label"].isin(allowed)]
    if len(bad):
        raise InputDataError(f"{where}: reviewed row {bad['id'].iloc[0]!r} has the label {bad['label'].iloc[0]!r}, not "
                             f"in the label set {sorted(allowed)} ({len(bad)} such rows); import the reviews again "
                             f"after fixing them, or delete {where}")
    rows = pd.DataFrame({"text": reviews["text"].astype(str), "label": reviews["label"].astype(str),
                         "id": [f"review-{i}" for i in reviews["id"]], "source": "review"})
    joined = rows if gold_file_rows is None else pd.concat([gold_file_rows, rows], ignore_index=True)
    joined = joined.drop_duplicates("text", keep="last").reset_index(drop=True)
    found = _input_rows(Path(run_dir), set(reviews["id"].astype(str)))
    texts = dict(zip(reviews["id"].astype(str), reviews["text"]))
    reviewed = {row for rid, (row, text) in found.items() if texts.get(rid) == text}
    log(f"{head}, and join the reference rows the way voting.gold_file rows do ({len(joined)} rows in all): the "
        "controller is measured on them and shown them as demonstrations, the linear specialists learn from them "
        f"(cross-fitted), and the stages never train on the {len(reviewed)} of them in the input")
    return joined, reviewed


def apply_reviews(df: pd.DataFrame, run_dir: Path, *, log: Callable[[str], None] = _log
                  ) -> tuple[pd.DataFrame, dict | None]:
    """The output ``df`` with the people's label on every row they reviewed (same id and text): ``label`` the
    reviewed one, ``decided_by`` human, ``confidence`` the share of answers that gave it, ``reviewer``;
    labelwright's own answer stays in ``machine_label`` and ``machine_decided_by`` (and in the vote and controller
    columns). Returns the frame and the report's ``reviews`` block (None without reviews)."""
    from labelwright.orchestrator.report import accuracy

    reviews = read_reviews(run_dir)
    if reviews is None or reviews.empty:
        return df, None
    by_id = reviews.drop_duplicates("id", keep="last").set_index("id")
    ids = df["id"].astype(str)
    known = ids.isin(by_id.index)
    hit = known.copy()
    hit[known] = (df.loc[known, "text"].to_numpy() == by_id.loc[ids[known], "text"].to_numpy())
    idx = df.index[hit]
    r = by_id.loc[ids[idx]]
    df = df.assign(machine_label=pd.Series(None, index=df.index, dtype=object),
                   machine_decided_by=pd.Series(None, index=df.index, dtype=object),
                   reviewer=pd.Series(None, index=df.index, dtype=object))
    df.loc[idx, "machine_label"] = df.loc[idx, "label"].to_numpy()
    df.loc[idx, "machine_decided_by"] = df.loc[idx, "decided_by"].to_numpy()
    df.loc[idx, "reviewer"] = r["reviewer"].to_numpy()
    df["label"] = df["label"].astype(object)
    df.loc[idx, "label"] = r["label"].to_numpy()
    df.loc[idx, "decided_by"] = HUMAN
    df.loc[idx, "confidence"] = r["agreement"].to_numpy()
    df.loc[idx, "reason"] = None
    if "retryable" in df.columns:
        df.loc[idx, "retryable"] = False
    for col in ("machine_label", "machine_decided_by", "reviewer"):
        df[col] = _blank(df[col])
    machine = df.loc[idx, "machine_label"]
    changed = machine != df.loc[idx, "label"]
    block = {"file": str(Path(run_dir) / REVIEWS_FILE), "reviewed": int(len(reviews)), "rows": int(len(idx)),
             "not_in_output": int(len(reviews) - len(idx)), "changed": int(changed.sum()),
             "changed_by_decided_by": {str(k): int(v) for k, v in
                                       df.loc[idx[changed.to_numpy()], "machine_decided_by"].value_counts().items()}}
    if "gold" in df.columns and df.loc[idx, "gold"].notna().any():
        g = idx[df.loc[idx, "gold"].notna().to_numpy()]
        block.update(gold_rows=int(len(g)), accuracy=accuracy(df.loc[g, "label"], df.loc[g, "gold"]),
                     machine_accuracy=accuracy(df.loc[g, "machine_label"], df.loc[g, "gold"]))
    log(f"reviews: {block['rows']} rows decided by people (decided_by: human), {block['changed']} of them with "
        "another label than labelwright's (kept in machine_label)"
        + (f"; {block['not_in_output']} reviewed rows are not in this output" if block["not_in_output"] else ""))
    return df, block
