"""Staged learning, measured: the same rows labelled without stages, with stages and replay, and with
stages but no replay (the AutoAnnotator reference: each stage trains on the newest hard rows only).

    python benchmarks/stages.py --datasets movie_sentiment --rows 2000 --every-rows 200
    python benchmarks/stages.py --datasets "" --out DIR          # just print the tables so far

For each configuration it prints the per-stage table (rows voted by that stage's specialists, their
LLM share, consensus accuracy on gold, each specialist's accuracy on the held-out gold slice, Ray
Train wall time) and the final accuracy, LLM share and tokens, and where a staged run's accuracy differs
from the run without stages: on the rows its specialists settled and on the rest. JSON and the stage
plots go to --out.

Runs on the embedded local LLM unless --base-url is given. The seed set is picked from the train
split's texts and labelled by the controller. The three configurations share one controller cache,
so a row asked the same question twice is paid once: the first configuration's timings are the
honest ones, and `cache_hits` says how many answers the later ones reused (their LLM share and
tokens count every row sent to the controller, cached or not).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from common import add_common_args, annotate_config, base_task, config_dir, run_configs

HERE = Path(__file__).resolve().parent
CONFIGS = {
    "no stages": {"enabled": False},
    "stages + replay": {"enabled": True, "replay_ratio": 1.0},
    "stages, no replay": {"enabled": True, "replay_ratio": 0.0},
    "stages + replay, wait": {"enabled": True, "replay_ratio": 1.0, "wait": True},
    # the voting threshold calibrated on the held-out gold rows at every stage (voting.target_accuracy)
    "no stages, calibrated": {"enabled": False, "calibrated": True},
    "stages + replay, wait, calibrated": {"enabled": True, "replay_ratio": 1.0, "wait": True, "calibrated": True},
    "stages, no replay, wait, calibrated": {"enabled": True, "replay_ratio": 0.0, "wait": True, "calibrated": True},
}
DEFAULT_CONFIGS = "no stages|stages + replay|stages, no replay"


def run_config(name: str, stages: dict, sample: Path, work: Path, labels: list[str], dataset: str, args) -> dict:
    stages = dict(stages)
    calibrated = stages.pop("calibrated", False)
    task = {
        **base_task(dataset, labels, cache_path=str(work / "cache.sqlite"), args=args),
        "voting": {"target_accuracy": args.target_accuracy if calibrated else None},
        "stages": {"every_rows": args.every_rows, "check_rows": args.check_rows, **stages},
        "runtime": {"vote_batch_size": args.batch_size},
        "planning": {"mode": "never"},  # the default specialists, as measured before plans existed
    }
    report = annotate_config(name, task, sample, work, resume=args.resume)
    st = report["stages"]["stages"]
    return {
        "dataset": dataset, "config": name, "rows": report["rows_in"],
        "accuracy": report["gold"]["accuracy"], "macro_f1": report["gold"]["macro_f1"],
        "llm_share": report["llm_share"], "llm_calls": report["llm"]["calls"],
        "tokens": report["llm"]["prompt_tokens"] + report["llm"]["completion_tokens"],
        "cache_hits": report["llm"]["cache_hits"], "wall_s": report["wall_s"],
        "label_s": report["timings_s"].get("label"), "stages": st, "plot": report["stages"].get("plot"),
        "seed": report["seed"], "target_accuracy": report["voting"]["target_accuracy"],
    }


def stage_table(result: dict) -> str:
    lines = [f"### {result['dataset']}: {result['config']} ({result['rows']} rows)", "",
             "| stage | rows voted | LLM share | consensus acc (gold) | held-out acc per specialist | "
             "hard share (held-out) | threshold | Ray Train / fit s | rolled back |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in result["stages"]:
        chk = s.get("check") or {}
        accs = ", ".join(f"{n} {a:.3f}" for n, a in (chk.get("specialists") or {}).items())
        share = "" if s["hard_share"] is None else f"{s['hard_share']:.0%}"
        cons = "" if s.get("consensus_accuracy") is None else f"{s['consensus_accuracy']:.3f}"
        held = "" if chk.get("hard_share") is None else f"{chk['hard_share']:.0%}"
        gate = chk.get("gate")
        threshold = "-" if gate is None else "none" if gate["threshold"] is None else f"{gate['threshold']:.3f}"
        lines.append(f"| {s['stage']} | {s['rows']} | {share} | {cons} | {accs} | {held} | {threshold} | "
                     f"{s.get('train_s') or 0:.0f} | {', '.join(s.get('rolled_back') or []) or '-'} |")
    return "\n".join(lines)


def summary_table(results: list[dict]) -> str:
    lines = ["| dataset | configuration | rows | stages | accuracy | macro-F1 | LLM share | LLM calls | tokens | "
             "cache hits | labelling s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['dataset']} | {r['config']} | {r['rows']} | {len(r['stages']) - 1} | {r['accuracy']:.3f} | "
                     f"{r['macro_f1']:.3f} | {r['llm_share']:.1%} | {r['llm_calls']} | {r['tokens']} | "
                     f"{r['cache_hits']} | {r['label_s'] or 0:.0f} |")
    return "\n".join(lines)


def settled_rows_table(results: list[dict], out_dir: Path) -> str:
    """Where a staged run's accuracy differs from the run without stages (same calibration), row by row:
    on the rows its specialists settled, and on the rest. A staged run can only lose accuracy on the
    rows it settles without the controller."""
    lines = ["| dataset | configuration | against | rows its specialists settled | their accuracy | the other run's "
             "accuracy on them | its other rows | its accuracy / the other run's on them |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["config"].startswith("no stages"):
            continue
        base = "no stages, calibrated" if "calibrated" in r["config"] else "no stages"
        if not any(b["config"] == base and b["dataset"] == r["dataset"] and b["rows"] == r["rows"] for b in results):
            continue
        work = out_dir / r["dataset"]
        a = pd.read_parquet(config_dir(work, r["config"]) / "labels.parquet").set_index("row")
        b = pd.read_parquet(config_dir(work, base) / "labels.parquet").set_index("row").loc[a.index]
        right_a, right_b = a["label"] == a["gold"], b["label"] == b["gold"]
        settled = a["decided_by"] == "consensus"
        lines.append(f"| {r['dataset']} | {r['config']} | {base} | {int(settled.sum())} | {right_a[settled].mean():.3f} | "
                     f"{right_b[settled].mean():.3f} | {int((~settled).sum())} | "
                     f"{right_a[~settled].mean():.3f} / {right_b[~settled].mean():.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, datasets="movie_sentiment,yahoo_topics", rows=2000, out=HERE / "results-stages")
    ap.add_argument("--every-rows", type=int, default=200, help="new controller rows that start a stage")
    ap.add_argument("--check-rows", type=int, default=300, help="held-out gold rows that check each stage")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--target-accuracy", type=float, default=0.8,
                    help="consensus accuracy the calibrated configurations hold the voting threshold to")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="'|'-separated subset of: " + " | ".join(CONFIGS))
    args = ap.parse_args()
    results = run_configs(args, CONFIGS, run_config, "stages.json")
    print(summary_table(results))
    print()
    print(settled_rows_table(results, Path(args.out)))
    for r in results:
        print()
        print(stage_table(r))


if __name__ == "__main__":
    main()
