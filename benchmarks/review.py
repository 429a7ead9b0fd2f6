"""People in the loop, measured: how much a run's accuracy gains when people review N of its rows, chosen by
``labelwright export-review --rows hard|low-confidence|disagreement`` or at random.

The people are the dataset's own annotators: a row's answer is its human gold label (the input's gold column),
written as Label Studio's JSON export of the tasks ``export-review`` wrote, read back by ``import-review`` into a
copy of the run directory, and put into the output by the function a re-run of the same command uses
(``apply_reviews``). No model runs and nothing is asked of an LLM, so a finished run is all it needs::

    python benchmarks/review.py --output runs/report_demo/labels.parquet --shares 0.05,0.1,0.2
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from labelwright.orchestrator.report import accuracy
from labelwright.orchestrator.review import (
    apply_reviews, export_review, import_review, label_studio_tasks, select_rows,
)

SELECTIONS = ("hard", "low-confidence", "disagreement", "random")


def answered(tasks: list[dict], gold: dict[str, str]) -> list[dict]:
    """Label Studio's JSON export of ``tasks`` after one person answered each with the row's gold label."""
    out = []
    for n, task in enumerate(tasks, start=1):
        label = gold[str(task["data"]["labelwright_id"])]
        out.append({**task, "id": n, "annotations": [{
            "id": n, "completed_by": 1, "was_cancelled": False, "created_at": "2026-12-07T10:00:00Z",
            "updated_at": "2026-12-07T10:00:00Z", "task": n,
            "result": [{"id": f"r{n}", "from_name": "label", "to_name": "text", "type": "choices",
                        "value": {"choices": [label]}, "origin": "manual"}]}]})
    return out


def measure(output: Path, run_dir: Path, selection: str, n: int, *, seed: int = 0) -> dict:
    df = pd.read_parquet(output)
    gold = dict(zip(df["id"].astype(str), df["gold"]))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        copy = tmp / "run"
        copy.mkdir()
        shutil.copy(run_dir / "task.json", copy / "task.json")
        shutil.copytree(run_dir / "input", copy / "input")
        export = tmp / "review.json"
        if selection == "random":
            picked = select_rows(df, rows="all").sample(n=min(n, len(df)), random_state=seed)
            export.write_text(json.dumps(label_studio_tasks(picked)))
        else:
            export_review(output, tool="label-studio", dest=export, run_dir=copy, rows=selection, limit=n)
        tasks = json.loads(export.read_text())
        reviewed = tmp / "project-1-at-2026-12-07.json"
        reviewed.write_text(json.dumps(answered(tasks, gold)))
        import_review(reviewed, run_dir=copy, log=lambda _: None)
        after, block = apply_reviews(df, copy, log=lambda _: None)
    wrong_before = int((df["label"] != df["gold"]).sum())
    return {"selection": selection, "asked": n, "reviewed": len(tasks),
            "accuracy_before": accuracy(df["label"], df["gold"]), "accuracy_after": accuracy(after["label"], after["gold"]),
            "fixed": wrong_before - int((after["label"] != after["gold"]).sum()),
            "fixed_per_reviewed_row": None if not tasks else
            (wrong_before - int((after["label"] != after["gold"]).sum())) / len(tasks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, required=True, help="a finished run's output (with a gold column)")
    ap.add_argument("--run-dir", type=Path, help="its run directory (default: OUTPUT.run)")
    ap.add_argument("--shares", default="0.05,0.1,0.2", help="shares of the rows people review")
    ap.add_argument("--selections", default=",".join(SELECTIONS))
    args = ap.parse_args()
    run_dir = args.run_dir or args.output.with_name(args.output.stem + ".run")
    rows = len(pd.read_parquet(args.output, columns=["row"]))
    print(f"{'selection':15} {'people rows':>11} {'reviewed':>8} {'accuracy':>17} {'fixed':>6} {'per row':>8}")
    for share in [float(s) for s in args.shares.split(",")]:
        for selection in args.selections.split(","):
            r = measure(args.output, run_dir, selection, max(1, round(share * rows)))
            per = "-" if r["fixed_per_reviewed_row"] is None else f"{r['fixed_per_reviewed_row']:.2f}"
            print(f"{selection:15} {r['asked']:>5} ({share:.0%}) {r['reviewed']:>8} "
                  f"{r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f} {r['fixed']:>6} {per:>8}", flush=True)


if __name__ == "__main__":
    main()
