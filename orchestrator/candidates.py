"""Candidate annotation, second half: a student distilled from the candidate sets decides between them.

In ``controller.mode: candidates`` the controller answers each row it is asked about with a set of plausible
labels, most likely first (``candidates`` column). Once every row is labelled, a student classifier is
distilled on Ray Train (``training/distill.py``: the distribution refinery) from every settled row that is not
a reference row (specialist consensus as a set of one, the controller's sets as they are); then each row whose
set holds several labels is decided by the student restricted to that set (``decided_by: student``). A set of
one stays the controller's, and so does a row the combination (``voting.combine``) already decided. The
student's checkpoint is kept in the run directory, so a resumed job does not
distil again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from labelwright.orchestrator.report import accuracy


def candidate_sets(column: pd.Series) -> list[list[str]]:
    """The column's sets as lists (a row without one: empty); parquet gives arrays back."""
    return [[] if c is None or (isinstance(c, float) and np.isnan(c)) else [str(v) for v in c] for c in column]


def decide_with_student(df: pd.DataFrame, spec, *, run_dir: Path, gpu: bool, log: Callable[[str], None]
                        ) -> tuple[pd.DataFrame, dict]:
    """Distil the student (or reuse its checkpoint) and let it decide the rows with several candidates;
    return the frame and the report's ``candidates`` block."""
    from labelwright.specialists.registry import load_specialist
    from labelwright.training.distill import distil_student
    from labelwright.training.stage import is_complete

    df = df.copy()
    sets = candidate_sets(df["candidates"]) if "candidates" in df.columns else [[] for _ in range(len(df))]
    sizes = np.array([len(s) for s in sets])
    asked = sizes > 0
    block: dict = {"rows": int(asked.sum())}
    if not asked.any():
        return df, block
    block["mean_size"] = round(float(sizes[asked].mean()), 3)
    block["singleton_share"] = round(float((sizes[asked] == 1).mean()), 4)
    multi = np.flatnonzero((sizes > 1) & (df["decided_by"] == "controller").to_numpy())
    reference = df["reference"].fillna(False).astype(bool).to_numpy() if "reference" in df.columns else np.zeros(len(df), bool)
    trainable = np.flatnonzero(df["label"].notna().to_numpy() & ~reference)
    cfg = spec.distill
    student_dir = Path(run_dir) / "student"
    distilled = is_complete(student_dir)  # by an earlier run of this job
    block["student"] = {"name": cfg.student.name, "model": cfg.student.model, "train_rows": int(len(trainable)),
                        "refinery": cfg.refinery.model_dump()}
    if len(multi) == 0:
        block["student"]["note"] = "no row had several candidates: nothing for a student to decide"
    elif not distilled and len(trainable) < cfg.min_rows:
        block["student"]["note"] = (f"only {len(trainable)} settled rows to distil from (distill.min_rows="
                                    f"{cfg.min_rows}): the controller's first candidate stands")
        log(f"candidates: {block['student']['note']}")
    else:
        t = time.monotonic()
        if distilled:
            log(f"candidates: reusing the distilled student at {student_dir}")
        else:
            train_sets = [sets[i] or [df.at[i, "label"]] for i in trainable]
            log(f"candidates: distilling student {cfg.student.name!r} on {len(trainable)} rows "
                f"({sum(len(s) > 1 for s in train_sets)} with several candidates) on Ray Train")
            distil_student(cfg.student, [df.at[i, "text"] for i in trainable], train_sets,
                           label_names=spec.label_names, output_dir=str(student_dir),
                           storage_path=str(Path(run_dir) / "ray_train"), refinery=cfg.refinery,
                           num_workers=spec.runtime.train_workers, use_gpu=gpu)
        student = load_specialist(student_dir)
        probs = student.predict_proba([df.at[i, "text"] for i in multi])
        index = {label: j for j, label in enumerate(student.labels)}
        choice, conf = [], []
        for row, p in zip(multi, probs):
            inside = p[[index[label] for label in sets[row]]]
            best = int(np.argmax(inside))
            choice.append(sets[row][best])
            conf.append(float(inside[best] / max(inside.sum(), 1e-12)))
        df["student_label"] = None
        df.loc[multi, "student_label"] = pd.Series(choice, index=multi, dtype=object)
        gold = df["gold"].to_numpy() if "gold" in df.columns else np.full(len(df), None)
        decide, verdict = _where_the_student_decides(multi, sets, choice, gold, reference, len(spec.label_names))
        block["student"]["check"] = verdict
        for j in np.flatnonzero(decide):
            row = multi[j]
            df.at[row, "label"], df.at[row, "decided_by"], df.at[row, "confidence"] = choice[j], "student", conf[j]
        block["student"].update(rows_decided=int(decide.sum()), seconds=round(time.monotonic() - t, 1),
                                version=student.version, checkpoint=str(student_dir))
        log(f"candidates: the student decided {int(decide.sum())} of the {len(multi)} rows with several candidates "
            f"({verdict['why']})")
    if "gold" in df.columns:
        gold = df["gold"].to_numpy()
        rows = np.flatnonzero(asked & pd.notna(gold))
        if len(rows):
            block["gold_rows"] = int(len(rows))
            block["coverage"] = round(float(np.mean([gold[i] in sets[i] for i in rows])), 4)
            block["single_label_accuracy"] = accuracy([sets[i][0] for i in rows], gold[rows])
            block["student_accuracy"] = accuracy(df["label"].to_numpy()[rows], gold[rows])
            several = [i for i in rows if sizes[i] > 1]
            if several:  # where the student decided: the controller's first candidate against its choice
                block["several"] = {"rows": len(several),
                                    "single_label_accuracy": accuracy([sets[i][0] for i in several], gold[several]),
                                    "student_accuracy": accuracy(df["label"].to_numpy()[several], gold[several])}
    return df, block


def _where_the_student_decides(multi: np.ndarray, sets: list[list[str]], choice: list[str], gold: np.ndarray,
                               ref: np.ndarray, n_labels: int) -> tuple[np.ndarray, dict]:
    """Which of the rows with several candidates the student decides, and why. The gold reference rows
    among them (never trained on) measure it against the controller's first candidate: it decides where
    it won more of them than it lost. Without any, it decides only the rows whose set leaves some label out
    (a set of every label, all a binary task's sets of two, says nothing the student could choose within).
    ``gold`` and ``ref`` (the reference flag) are per row of the frame, ``choice`` per row of ``multi``."""
    checked = [j for j, row in enumerate(multi) if ref[row] and pd.notna(gold[row])]
    if checked:
        won = sum(choice[j] == gold[multi[j]] != sets[multi[j]][0] for j in checked)
        lost = sum(choice[j] != gold[multi[j]] == sets[multi[j]][0] for j in checked)
        used = won > lost
        why = (f"on {len(checked)} gold reference rows with several candidates it won {won} rows from the "
               f"controller's first candidate and lost {lost}: " + ("it decides" if used else "the first candidate stands"))
        return np.full(len(multi), used), {"reference_rows": len(checked), "won": int(won), "lost": int(lost),
                                           "used": bool(used), "why": why}
    informative = np.array([len(set(sets[row])) < n_labels for row in multi], dtype=bool)
    why = ("no gold reference rows to measure it on: it decides the rows whose set leaves some label out, "
           f"{int(informative.sum())} of {len(multi)}")
    return informative, {"reference_rows": 0, "used": bool(informative.any()), "why": why}
