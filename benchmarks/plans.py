"""Plans, measured: the same rows labelled by the specialists the controller plans, by the deterministic
fallback plan (similarity between the task and the zoo, no LLM), and by the fixed default set.

    python benchmarks/plans.py --datasets movie_sentiment --rows 200
    python benchmarks/plans.py --datasets "" --out DIR            # just print the table so far

Stages are off, so the comparison is the choice of specialists alone. The seed set is picked from the
train split's texts and labelled by the controller; the configurations share one controller cache
(the seed is paid once; `cache hits` counts reused answers, and LLM share counts every row sent to
the controller, cached or not). The planning wall time and the planner's LLM calls are reported apart.
Runs on the embedded local LLM unless --base-url is given; --allow-hub lets plans use hub models.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import add_common_args, annotate_config, base_task, run_configs

HERE = Path(__file__).resolve().parent
DEFAULT_SET = [{"name": "tfidf", "kind": "tfidf_linear"}, {"name": "minilm_probe", "kind": "embedding_linear"},
               {"name": "minilm_ft", "kind": "transformer_classifier"}]
CONFIGS = {
    "controller plan": {"planning": {"mode": "always", "planner": "controller"}},
    "fallback plan": {"planning": {"mode": "always", "planner": "similarity"}},
    "default set": {"specialists": DEFAULT_SET},
}


def run_config(name: str, extra: dict, sample: Path, work: Path, labels: list[str], dataset: str, args) -> dict:
    task = {**base_task(dataset, labels, cache_path=str(work / "cache.sqlite"), args=args),
            "stages": {"enabled": False}, **json.loads(json.dumps(extra))}
    if "planning" in task:
        task["planning"]["allow_hub"] = args.allow_hub
    report = annotate_config(name, task, sample, work, resume=args.resume)
    plan = report.get("plan") or {}
    return {
        "dataset": dataset, "config": name, "rows": report["rows_in"],
        "specialists": plan.get("kept") or [s["name"] for s in DEFAULT_SET],
        "plan_source": plan.get("source", "-"), "dropped": (plan.get("check") or {}).get("dropped", []),
        "plan_notes": plan.get("notes", []), "plan_llm_calls": (plan.get("llm") or {}).get("calls", 0),
        "plan_s": report["timings_s"].get("plan", 0.0),
        "accuracy": report["gold"]["accuracy"], "macro_f1": report["gold"]["macro_f1"],
        "llm_share": report["llm_share"], "llm_calls": report["llm"]["calls"],
        "cache_hits": report["llm"]["cache_hits"], "wall_s": report["wall_s"],
        "label_s": report["timings_s"].get("label"),
    }


def table(results: list[dict]) -> str:
    lines = ["| dataset | configuration | rows | specialists (dropped by the check) | plan | accuracy | macro-F1 | "
             "LLM share | LLM calls | cache hits | plan s | labelling s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        chosen = ", ".join(r["specialists"]) + (f" (dropped {', '.join(r['dropped'])})" if r["dropped"] else "")
        lines.append(f"| {r['dataset']} | {r['config']} | {r['rows']} | {chosen} | {r['plan_source']} | "
                     f"{r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['llm_share']:.1%} | {r['llm_calls']} | "
                     f"{r['cache_hits']} | {r['plan_s']:.0f} | {r['label_s'] or 0:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, datasets="movie_sentiment,yahoo_topics,banking77", rows=200, out=HERE / "results-plans")
    ap.add_argument("--configs", default="|".join(CONFIGS), help="'|'-separated subset of: " + " | ".join(CONFIGS))
    ap.add_argument("--allow-hub", action="store_true", help="plans may choose hub models (needs hub access)")
    print(table(run_configs(ap.parse_args(), CONFIGS, run_config, "plans.json")))


if __name__ == "__main__":
    main()
