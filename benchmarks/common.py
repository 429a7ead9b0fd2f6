"""What the benchmark scripts share: the shared datasets, their instructions, a fixed sample of a
test split, and a results file that configurations (or datasets) can be added to one run at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
INSTRUCTIONS = {
    "movie_sentiment": "Classify the sentiment of this movie review sentence.",
    "yahoo_topics": "Classify the topic of this question and answer from a Q&A site.",
    "banking77": "Classify the intent of this banking customer's message.",
}
GENERIC_INSTRUCTION = "Classify the text into exactly one of the labels."


def write_sample(dataset: str, rows: int, work: Path) -> tuple[Path, list[str]]:
    """The first ``rows`` rows of the test split (already shuffled) as ``work/sample.csv``, and the label set."""
    test = pd.read_csv(DATASETS / dataset / "test.csv").head(rows)
    labels = sorted(pd.read_csv(DATASETS / dataset / "train.csv")["label"].astype(str).unique())
    work.mkdir(parents=True, exist_ok=True)
    sample = work / "sample.csv"
    test[["text", "label"]].to_csv(sample, index=False)
    return sample, labels


def save_result(path: Path, result: dict, *, key: str = "config") -> None:
    """Add ``result`` to the JSON list in ``path``, replacing an earlier one of the same ``key`` and size."""
    old = json.loads(path.read_text()) if path.is_file() else []
    kept = [r for r in old if r[key] != result[key] or r["rows"] != result["rows"]]
    path.write_text(json.dumps(kept + [result], indent=2, default=str))


def load_results(out_dir: Path, name: str) -> list[dict]:
    """Every dataset's results under ``out_dir`` (``<dataset>/<name>``)."""
    results: list[dict] = []
    for path in sorted(out_dir.glob(f"*/{name}")):
        results += json.loads(path.read_text())
    return results
