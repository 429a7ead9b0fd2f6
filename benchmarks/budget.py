"""What a budget buys across several controller actors (issue 18, item 4).

The same rows are labelled with ``budget.max_llm_calls`` set, by one controller actor and by several (one ledger
for all of them, ``orchestrator/budget.py``), against a local OpenAI-compatible endpoint that answers with the gold
label: fault-free, and with the hosted-API fault mix of ``benchmarks/faults.py`` (retries then spend calls too).
Prints, for each run, the HTTP requests the endpoint received against the budget (the overshoot may only be the
retries in flight), the calls the report counts, the rows past the budget and kept for less confident rows, the
LLM share and accuracy. Stages are off, so that only the controller spends.

    python benchmarks/budget.py --rows 1000 --budget 250 --actors 1,3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import gold_labels, write_sample  # noqa: E402
from benchmarks.faults import faulty, label_against  # noqa: E402
from tests.fake_openai import oracle  # noqa: E402


def run(name: str, responder, sample: Path, labels: list[str], args, work: Path, actors: int) -> dict:
    report, requests = label_against(responder, name, sample, labels, args, work, stages={"enabled": False},
                                     budget={"max_llm_calls": args.budget}, runtime={"controller_actors": actors})
    block = report["budget"]
    return {"config": name, "controller_actors": actors, "rows": report["rows_in"], "budget": args.budget,
            "http_requests": requests, "overshoot": requests - args.budget, "calls": report["llm"]["calls"],
            "rows_past_budget": block["rows_past_budget"],
            "rows_kept_for_less_confident": block["rows_kept_for_less_confident"],
            "llm_share": round(report["llm_share"], 3), "accuracy": report["gold"]["accuracy"],
            "labelling_rows_per_s": report["labelling_rows_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="movie_sentiment")
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--budget", type=int, default=250, help="budget.max_llm_calls")
    ap.add_argument("--actors", default="1,3", help="runtime.controller_actors to compare, comma-separated")
    ap.add_argument("--timeout", type=float, default=5.0, help="controller.timeout_s; a hanging request waits this")
    ap.add_argument("--out", default="runs/bench_budget")
    args = ap.parse_args()
    work = Path(args.out)
    sample, labels = write_sample(args.dataset, args.rows, work)
    good = oracle(gold_labels(args.dataset))
    results = []
    for actors in (int(a) for a in args.actors.split(",")):
        results.append(run(f"fault-free-{actors}", good, sample, labels, args, work, actors))
        print(json.dumps(results[-1]), flush=True)
        responder, _ = faulty(good, hang_s=max(30.0, 4 * args.timeout), retry_after=1.0)
        results.append(run(f"faults-{actors}", responder, sample, labels, args, work, actors))
        print(json.dumps(results[-1]), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
