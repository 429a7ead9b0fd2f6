"""Labels better than the LLM's own? The same rows labelled by: the controller alone (its nearest seed rows as
demonstrations, as the pipeline asks a hard row), each specialist alone, the previous default (unanimity,
no reference rows), and routing by measured correctness (``voting.route: measured``), over the default
rule (unanimity) or the stacked rule (``voting.rule: stacked``), with gold reference rows and with an audit (no gold used for routing: the controller's answers on random rows are the
reference), with and without the controller's answers combined with the specialists on the rows it answers
(``voting.combine``, fitted on the gold reference rows), and candidate annotation (``controller.mode:
candidates``: sets, a student distilled from them). Accuracy and macro-F1 against gold, LLM share (rows the
controller was asked about for any reason: reference rows and hard rows; the seed comes from the train split
and is reported apart), LLM calls, what the routing settled and what the combination overruled.

    python benchmarks/routing.py --datasets movie_sentiment --rows 1000
    python benchmarks/routing.py --datasets yahoo_topics,banking77 --rows 400
    python benchmarks/routing.py --datasets ""          # just print the table so far
    python benchmarks/routing.py --noisy-endpoint 0.85 --out runs/bench_noisy   # against an 85%-right endpoint

Every configuration of a dataset shares one controller cache (``<out>/<dataset>/cache.sqlite``): the seed and
the rows asked by an earlier configuration are not paid again, and the figures are the same as without the
cache (the cache only answers the identical prompt). Runs on the embedded local LLM unless --base-url is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import controller_alone  # noqa: E402
from common import add_common_args, annotate_config, base_task, config_dir, run_configs  # noqa: E402

HERE = Path(__file__).resolve().parent

CONFIGS = {
    "unanimity (previous default)": {"voting": {"rule": "unanimity", "route": "threshold"}},
    "routing, gold reference": {"voting": {"route": "measured"}},
    "routing + unanimity, gold reference": {"voting": {"route": "measured", "rule": "unanimity"}},
    "routing, gold reference, no combination": {"voting": {"route": "measured", "combine": "never"}},
    "routing, gold reference, reference rows not trained on": {"voting": {"route": "measured"},
                                                               "stages": {"train_on_reference": False}},
    "routing, gold reference, stages wait": {"voting": {"route": "measured"}, "stages": {"wait": True}},
    "routing, audit reference": {"voting": {"route": "measured"}, "stages": {"check_rows": 0}},
    "routing + stacked, gold reference": {"voting": {"route": "measured", "rule": "stacked"}},
    "routing + stacked, audit reference": {"voting": {"route": "measured", "rule": "stacked"},
                                           "stages": {"check_rows": 0}},
    "candidates mode, gold reference": {"voting": {"route": "measured"}, "controller": {"mode": "candidates"}},
    "routing, gold reference, + qwen probe": {"voting": {"route": "measured"}, "specialists": [
        {"name": "tfidf", "kind": "tfidf_linear"}, {"name": "minilm_probe", "kind": "embedding_linear"},
        {"name": "minilm_ft", "kind": "transformer_classifier"},
        {"name": "qwen_probe", "kind": "embedding_linear", "model": "qwen2.5-coder-0.5b-instruct", "torch_threads": 2,
         "batch_size": 16}]},
    "routing, gold reference, + smollm2 probe": {"voting": {"route": "measured"}, "specialists": [
        {"name": "tfidf", "kind": "tfidf_linear"}, {"name": "minilm_probe", "kind": "embedding_linear"},
        {"name": "minilm_ft", "kind": "transformer_classifier"},
        {"name": "smollm2_probe", "kind": "embedding_linear", "model": "smollm2-135m-instruct", "batch_size": 32}]},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


def run_config(name, extra, sample, work, labels, dataset, args) -> dict:
    from labelwright.orchestrator.report import accuracy, macro_f1

    task = _merge(base_task(dataset, labels, cache_path=str(work / "cache.sqlite"), args=args),
                  {"planning": {"mode": "never"}, **extra})
    if args.max_loss is not None:
        task = _merge(task, {"voting": {"max_loss": args.max_loss}})
    report = annotate_config(name, task, sample, work, resume=args.resume)
    df = pd.read_parquet(config_dir(work, name) / "labels.parquet")
    gold = df["gold"]
    stages = report["stages"]["stages"]
    fits = [s["check"]["gate"] for s in stages if (s.get("check") or {}).get("gate")]
    result = {
        "config": name, "dataset": dataset, "rows": len(df),
        "accuracy": accuracy(df["label"], gold), "macro_f1": macro_f1(df["label"], gold, labels),
        "llm_share": report["llm_share"], "llm_calls": report["llm"]["calls"],
        "reference": report.get("reference"), "decided_by": report["decided_by"],
        "accuracy_by_decided_by": report["gold"]["accuracy_by_decided_by"],
        "specialist_accuracy": report["gold"]["specialist_accuracy"],
        "routing": [{k: f.get(k) for k in ("kind", "threshold", "rows", "settled_share", "accuracy",
                                           "controller_accuracy", "bound")} for f in fits],
        "stage_hard_share": [s.get("hard_share") for s in stages], "wall_s": report["wall_s"],
        "controller": report["controller"], "seed": report["seed"], "candidates": report.get("candidates"),
        "combined": report.get("combined"),
    }
    print(json.dumps({k: result[k] for k in ("config", "dataset", "accuracy", "llm_share", "decided_by", "candidates")}),
          flush=True)
    if not args.skip_alone and not (work / "alone.json").is_file():
        _alone(work, name, df, labels, task, report, args)
    return result


def _alone(work: Path, name: str, df, labels, task, report, args) -> None:
    """The controller alone and each specialist alone, on the rows of the first configuration run."""
    from labelwright.orchestrator.report import accuracy, macro_f1
    from labelwright.orchestrator.spec import load_task

    spec = load_task(None, task)
    update = {"base_url": report["controller"]["base_url"], "model": report["controller"]["model"]}
    if not args.base_url:
        from labelwright.orchestrator.job import EMBEDDED_TIMEOUT_S

        update["timeout_s"] = EMBEDDED_TIMEOUT_S
    ctrl = spec.controller.model_copy(update=update)
    run = config_dir(work, name) / "labels.run"
    out = []
    bank = run / "reference" / "demonstrations.parquet"
    seeds = run / "seed"
    for what, demos in [("controller alone", None),
                        ("controller alone, gold demonstrations", bank if bank.is_file() else None)]:
        if (what != "controller alone" and demos is None) or (what == "controller alone" and args.gold_alone_only
                                                                and demos is not None):
            continue
        alone = controller_alone(df["text"], labels, spec.descriptions, spec.instruction, ctrl, seeds, bank=demos)
        out.append({"config": what, "dataset": work.name, "rows": len(df),
                    "accuracy": accuracy(alone["pred"], df["gold"]),
                    "macro_f1": macro_f1(alone["pred"], df["gold"], labels), "llm_share": 1.0, "llm_calls": len(df)})
    # the linear specialists may have trained on the reference rows (stages.train_on_reference): judged without them
    rows = df[~df["reference"].astype(bool)]
    for s in spec.specialists:
        col = rows[f"vote_{s.name}"]
        out.append({"config": f"specialist {s.name} alone (stage of each row; rows not reference rows)",
                    "dataset": work.name, "rows": len(rows), "accuracy": accuracy(col, rows["gold"]),
                    "macro_f1": macro_f1(col, rows["gold"], labels), "llm_share": 0.0, "llm_calls": 0})
    (work / "alone.json").write_text(json.dumps(out, indent=2))


def table(results: list[dict]) -> str:
    lines = ["| dataset | configuration | rows | accuracy | macro-F1 | LLM share | LLM calls | reference rows | "
             "settled by the specialists (accuracy) | overruled by the combination (accuracy / the controller's) | "
             "candidate sets: size, coverage, first label / final accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ref = r.get("reference") or {}
        cons = (r.get("accuracy_by_decided_by") or {}).get("consensus")
        settled = "" if cons is None else f"{cons['rows']} ({cons['accuracy']:.3f})"
        asked = f"{ref.get('asked', 0)} {ref.get('source', '')}" if ref.get("asked") else ""
        c = r.get("candidates") or {}
        sets = (f"{c['mean_size']:.2f}, {c['coverage']:.1%}, {c['single_label_accuracy']:.3f} / "
                f"{c['student_accuracy']:.3f}" if c.get("coverage") is not None else "")
        m = r.get("combined") or {}
        over = "" if not m.get("overruled") else (f"{m['overruled']}" + (
            f" ({m['accuracy']:.3f} / {m['controller_accuracy']:.3f})" if m.get("gold_rows") else ""))
        lines.append(f"| {r['dataset']} | {r['config']} | {r['rows']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
                     f"{r['llm_share']:.0%} | {r['llm_calls']} | {asked} | {settled} | {over} | {sets} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, datasets="movie_sentiment", rows=1000, out=Path("runs/bench_routing"))
    ap.add_argument("--configs", default="|".join(CONFIGS), help="'|'-separated, from: " + ", ".join(CONFIGS))
    ap.add_argument("--max-loss", type=float, default=None, help="voting.max_loss for the routing configurations")
    ap.add_argument("--skip-alone", action="store_true", help="do not measure the controller and specialists alone")
    ap.add_argument("--gold-alone-only", action="store_true",
                    help="with gold demonstrations, measure the controller alone only with them (the pipeline's "
                         "prompts), not also with the seed rows alone")
    args = ap.parse_args()
    results = run_configs(args, CONFIGS, run_config, "routing.json")
    out_dir = Path(args.out)
    alone = [r for p in sorted(out_dir.glob("*/alone.json")) for r in json.loads(p.read_text())]
    print(table(alone + results))


if __name__ == "__main__":
    main()
