"""The MiniLM classifier specialist on a GPU against the CPU, in one run, without Ray: the code a Serve
replica (predict) and a Ray Train worker (train_loop) run, placed on each device.

    python benchmarks/gpu_specialist.py --data ../shared/datasets/movie_sentiment/train.csv --rows 1024

Prints, per device: fine-tuning rows/s (one epoch), prediction rows/s, held-out accuracy, and the
GPU/CPU ratios. ``--model`` takes a local model directory (default: the bundled MiniLM).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
import torch

from labelwright.specialists.base import SpecialistConfig
from labelwright.specialists.transformer_classifier import TransformerClassifierSpecialist
from labelwright.specialists.transformer_classifier import train_loop


def measure(device: str, model: str, train: pd.DataFrame, test: pd.DataFrame, labels: list[str], threads: int) -> dict:
    torch.set_num_threads(threads)
    config = SpecialistConfig(name="minilm_ft", kind="transformer_classifier", model=model, batch_size=32)
    spec = TransformerClassifierSpecialist(config, labels, seed=0, device=device)
    spec.module.float()  # the carried weights may be stored in half precision
    y = np.array([labels.index(v) for v in train["label"]])
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t = time.perf_counter()
    train_loop(spec, train["text"].tolist(), y, epochs=1)
    sync()
    train_s = time.perf_counter() - t
    spec.predict_proba(test["text"].tolist()[:64])  # warm-up
    t = time.perf_counter()
    probs = spec.predict_proba(test["text"].tolist())
    sync()
    predict_s = time.perf_counter() - t
    acc = float(np.mean(np.array(labels)[probs.argmax(1)] == test["label"].to_numpy()))
    return {"device": str(spec.device), "train_rows_per_s": len(train) / train_s,
            "predict_rows_per_s": len(test) / predict_s, "accuracy": acc, "train_s": train_s, "predict_s": predict_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="CSV with text,label")
    ap.add_argument("--rows", type=int, default=1024, help="training rows (as many held-out rows are predicted)")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--cpu-threads", type=int, default=max(1, (torch.get_num_threads())))
    args = ap.parse_args()
    df = pd.read_csv(args.data).dropna(subset=["text", "label"])
    df["label"] = df["label"].astype(str)
    train, test = df.iloc[: args.rows], df.iloc[args.rows : 2 * args.rows]
    labels = sorted(df["label"].unique())
    results = [measure("cpu", args.model, train, test, labels, args.cpu_threads)]
    if torch.cuda.is_available():
        results.append(measure("cuda", args.model, train, test, labels, args.cpu_threads))
        results.append({"device": "ratio cuda/cpu",
                        "train_rows_per_s": results[1]["train_rows_per_s"] / results[0]["train_rows_per_s"],
                        "predict_rows_per_s": results[1]["predict_rows_per_s"] / results[0]["predict_rows_per_s"]})
    print(json.dumps({"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                      "cpu_threads": args.cpu_threads, "rows": len(train), "results": results}, indent=2))


if __name__ == "__main__":
    main()
