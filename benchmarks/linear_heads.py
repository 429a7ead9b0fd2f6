"""The linear specialists (TF-IDF + logistic regression, MiniLM embeddings + logistic regression) on the
shared datasets: accuracy on the test split and fit time, at a few training sizes.

    python benchmarks/linear_heads.py --sizes 100,300,1000 --test-rows 1000 --out runs/bench_linear.json

Train rows are the first N of each dataset's train split (already shuffled), the labels their gold ones.
Run it on two checkouts (``PYTHONPATH=<snapshot site-packages>``) to compare implementations on the same rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    import numpy as np
    import pandas as pd
    import torch

    from labelwright.specialists.base import SpecialistConfig
    from labelwright.specialists.encoder import Encoder
    from labelwright.specialists.registry import build_specialist

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="movie_sentiment,yahoo_topics,banking77")
    ap.add_argument("--sizes", default="100,300,1000")
    ap.add_argument("--test-rows", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    encoder = Encoder("minilm")
    results = []
    for dataset in [d for d in args.datasets.split(",") if d]:
        train = pd.read_csv(DATASETS / dataset / "train.csv")
        test = pd.read_csv(DATASETS / dataset / "test.csv").head(args.test_rows)
        labels = sorted(train["label"].astype(str).unique())
        gold = test["label"].astype(str).to_numpy()
        sizes = [int(s) for s in args.sizes.split(",")]
        train_emb = encoder.encode(train["text"].head(max(sizes)).tolist())
        for size in sizes:
            texts, y = train["text"].head(size).tolist(), train["label"].astype(str).head(size).tolist()
            for kind in ("tfidf_linear", "embedding_linear"):
                spec = build_specialist(SpecialistConfig(name=kind, kind=kind), labels)
                start = time.perf_counter()
                if kind == "embedding_linear":  # the job fits the probe on embeddings it already has
                    spec.fit_embeddings(train_emb[:size], np.array([labels.index(v) for v in y]))
                else:
                    spec.fit(texts, y)
                fit_s = time.perf_counter() - start
                probs = spec.predict_proba(test["text"].tolist())
                acc = float(np.mean(np.array(labels, dtype=object)[probs.argmax(1)] == gold))
                results.append({"dataset": dataset, "train_rows": size, "kind": kind, "accuracy": round(acc, 4),
                                "fit_s": round(fit_s, 3)})
                print(json.dumps(results[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
