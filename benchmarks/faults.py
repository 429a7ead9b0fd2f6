"""Labelling throughput when the controller endpoint fails the way hosted APIs do (issue 18, item 2).

The same rows are labelled twice against a local OpenAI-compatible endpoint that answers at once with the gold
label: fault-free, then with each request drawn into the fault mix of hosted APIs: 15% HTTP 429 with a
Retry-After header, 10% HTTP 500, 2% hanging past ``controller.timeout_s``, 5% a body that is not the JSON
asked for, 3% a label outside the set. Prints, for both runs, the labelling rate (rows/s while labelling,
the report's ``labelling_rows_per_s``), HTTP requests, rows unresolved, and the ratio of the rates; the goal
is at least 0.5x.

    python benchmarks/faults.py --rows 3000 [--stages] [--timeout 5] [--retry-after 1]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATASETS, annotate_config, gold_labels, write_sample  # noqa: E402
from tests.fake_openai import FakeOpenAI, HTTPError, garbage, oracle, out_of_set, slow  # noqa: E402

MIX = (("429", 0.15), ("500", 0.10), ("hang", 0.02), ("garbage", 0.05), ("out of set", 0.03))


def faulty(good, *, hang_s: float, retry_after: float, seed: int = 0):
    """``good``'s answers, except each request falls into one of :data:`MIX` with its probability."""
    rng, lock = random.Random(seed), threading.Lock()
    counts = {name: 0 for name, _ in MIX} | {"ok": 0}
    hang, bad, outside = slow(hang_s, good), garbage(), out_of_set()

    def respond(request):
        with lock:
            u = rng.random()
        for name, p in MIX:
            if u < p:
                break
            u -= p
        else:
            name = "ok"
        with lock:
            counts[name] += 1
        if name == "429":
            return HTTPError(429, "rate limit reached", {"retry-after": f"{retry_after:g}"})
        if name == "500":
            return HTTPError(500, "internal error")
        return {"hang": hang, "garbage": bad, "out of set": outside}.get(name, good)(request)

    return respond, counts


def label_against(responder, name: str, sample: Path, labels: list[str], args, work: Path,
                  **task) -> tuple[dict, int]:
    """``sample`` labelled by the job (the gold column kept for the report, a seed drawn from the train split)
    against a local OpenAI-compatible endpoint answering with ``responder``: the report and the HTTP requests the
    endpoint received. ``task``: the task's other sections."""
    with FakeOpenAI(responder) as server:
        spec = {"labels": labels, "gold_column": "label",
                "controller": {"base_url": server.base_url, "model": server.model, "cache": False,
                               "timeout_s": args.timeout},
                "seed": {"pool_file": str(DATASETS / args.dataset / "train.csv")}, **task}
        return annotate_config(name, spec, sample, work), server.chat_calls


def run(name: str, responder, sample: Path, labels: list[str], args, work: Path, counts=None) -> dict:
    report, requests = label_against(responder, name, sample, labels, args, work,
                                     instruction="Classify the sentiment of this movie review sentence.",
                                     stages={"enabled": args.stages})
    return {"config": name, "rows": report["rows_in"], "labelling_rows_per_s": report["labelling_rows_per_s"],
            "label_s": report["timings_s"]["label"], "http_requests": requests,
            "llm_share": round(report["llm_share"], 3), "unresolved": report["decided_by"].get("unresolved", 0),
            "accuracy": report["gold"]["accuracy"], **({"faults": dict(counts)} if counts is not None else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="movie_sentiment")
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--stages", action="store_true", help="staged fine-tuning on (the default job); off by default, "
                    "so a stage training beside the labelling does not blur the rates")
    ap.add_argument("--timeout", type=float, default=5.0, help="controller.timeout_s; a hanging request waits this")
    ap.add_argument("--retry-after", type=float, default=1.0, help="seconds the 429 answers ask the client to wait")
    ap.add_argument("--out", default="runs/bench_faults")
    args = ap.parse_args()
    work = Path(args.out)
    sample, labels = write_sample(args.dataset, args.rows, work)
    good = oracle(gold_labels(args.dataset))
    results = [run("fault-free", good, sample, labels, args, work)]
    print(json.dumps(results[-1]), flush=True)
    responder, counts = faulty(good, hang_s=max(30.0, 4 * args.timeout), retry_after=args.retry_after)
    results.append(run("faults", responder, sample, labels, args, work, counts))
    print(json.dumps(results[-1]), flush=True)
    ratio = results[1]["labelling_rows_per_s"] / results[0]["labelling_rows_per_s"]
    summary = {"ratio": round(ratio, 3), "stages": args.stages, "timeout_s": args.timeout,
               "retry_after_s": args.retry_after, "results": results}
    (work / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"labelling under faults: {results[1]['labelling_rows_per_s']:.2f} rows/s against "
          f"{results[0]['labelling_rows_per_s']:.2f} fault-free: {ratio:.2f}x (goal: at least 0.5x)")


if __name__ == "__main__":
    main()
