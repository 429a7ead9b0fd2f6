"""Baselines on the same rows: the controller alone, each specialist alone, plain majority vote, and
the full pipeline. Prints a table (accuracy, LLM share, tokens, rows/s) and writes JSON.

    python benchmarks/baselines.py --rows 200                       # all three shared datasets
    python benchmarks/baselines.py --datasets banking77 --rows 200 --seed-size 154
    python benchmarks/baselines.py --datasets ""                    # just print the table so far
    python benchmarks/baselines.py --datasets yahoo_topics --rows 40 --reuse-pipeline   # redo the rest only

Runs on the embedded local LLM unless --base-url is given. Each dataset's test split is sampled by
taking its first --rows rows (the shared splits are already shuffled). The seed set is picked from
the train split's texts and labelled by the controller; its LLM calls are reported apart. The
controller's cache is a fresh file per run so no figure is a cache hit (unless --cache names one,
e.g. to reuse the seed answers of a run that was killed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common import add_common_args, base_task, load_results, write_sample
from labelwright.orchestrator.report import accuracy, macro_f1

HERE = Path(__file__).resolve().parent


def majority_vote(df: pd.DataFrame, names: list[str]) -> pd.Series:
    """Plain majority of the specialists' top labels; ties go to the highest summed probability."""
    out = []
    for _, r in df.iterrows():
        votes: dict[str, list[float]] = {}
        for n in names:
            if isinstance(r[f"vote_{n}"], str):
                votes.setdefault(r[f"vote_{n}"], []).append(r[f"prob_{n}"])
        out.append(max(votes, key=lambda k: (len(votes[k]), sum(votes[k]))) if votes else None)
    return pd.Series(out, index=df.index)


def controller_alone(texts, labels, descriptions, instruction, controller_cfg, seed_dir: Path,
                     bank: Path | None = None) -> dict:
    """Every row to the controller, with the same k-nearest seed demonstrations as the pipeline; with
    ``bank`` (a run's ``reference/demonstrations.parquet``: the seed and gold rows), drawn from that bank,
    leaving out a row's own text, as the pipeline does with ``controller.gold_demonstrations``."""
    from labelwright.orchestrator.bootstrap import label_choices, verbalise
    from labelwright.orchestrator.controller import Controller
    from labelwright.orchestrator.acquisition import nearest
    from labelwright.specialists.encoder import Encoder

    enc = Encoder("minilm")
    if bank is not None:
        seed = pd.read_parquet(bank)
        emb = enc.encode(seed["text"].tolist())
    else:
        seed = pd.read_parquet(seed_dir / "seed.parquet")
        emb = np.load(seed_dir / "embeddings.npy")
        ok = seed["label"].notna().to_numpy()
        seed, emb = seed[ok].reset_index(drop=True), emb[ok]
    controller = Controller(controller_cfg, labels=labels, descriptions=descriptions, instruction=instruction)
    q = enc.encode(list(texts))
    demos = None
    if controller_cfg.num_demonstrations > 0 and len(seed):
        idx = nearest(q, emb, controller_cfg.num_demonstrations, query_texts=list(texts),
                      bank_texts=seed["text"].tolist())
        demos = [[(seed["text"][j], seed["label"][j]) for j in row[::-1]] for row in idx]
    choices = None
    if len(labels) > controller_cfg.max_choices:
        label_emb = enc.encode([verbalise(lab, descriptions.get(lab)) for lab in labels])
        choices = label_choices(q, label_emb, labels, controller_cfg.max_choices)
    t = time.monotonic()
    answers = controller.label_many(list(texts), demonstrations=demos, choices=choices)
    wall = time.monotonic() - t
    return {
        "pred": [a.label for a in answers],
        "reasons": [a.reason for a in answers],
        "tokens": sum(a.prompt_tokens + a.completion_tokens for a in answers),
        "calls": sum(a.calls for a in answers),
        "wall_s": wall,
    }


def run_dataset(name: str, rows: int, out_dir: Path, args) -> list[dict]:
    from labelwright.orchestrator.job import annotate
    from labelwright.orchestrator.spec import load_task

    work = out_dir / name
    reuse = args.reuse_pipeline and (work / "report.json").is_file() and (work / "labels.parquet").is_file()
    if not reuse:
        shutil.rmtree(work, ignore_errors=True)
    sample, labels = write_sample(name, rows, work)
    task = {**base_task(name, labels, cache_path=args.cache or str(work / "cache.sqlite"), args=args),
            "voting": {"rule": args.rule},
            "planning": {"mode": "never"}}  # the default specialists, as measured before plans existed
    spec = load_task(None, task)
    if reuse:  # the pipeline's finished run: measure only what is missing (e.g. the controller alone)
        report = json.loads((work / "report.json").read_text())
        if not args.base_url:  # the embedded LLM the controller-alone column needs (annotate would start it)
            from labelwright.cluster import runtime
            from labelwright.orchestrator.job import start_controller

            runtime.connect(spec.runtime.address, num_cpus=spec.runtime.num_cpus)
            report["controller"]["base_url"] = start_controller(spec)[0].base_url
    else:
        report = annotate(sample, spec=spec, output=work / "labels.parquet", report_path=work / "report.json")
    df = pd.read_parquet(work / "labels.parquet")
    gold = df["gold"]
    names = [s.name for s in spec.specialists]
    results = []
    rows_n = len(df)

    update = {"base_url": report["controller"]["base_url"], "model": report["controller"]["model"], "cache": False}
    if not args.base_url:  # the embedded LLM queues requests: give them the job's embedded timeout
        from labelwright.orchestrator.job import EMBEDDED_TIMEOUT_S

        update["timeout_s"] = EMBEDDED_TIMEOUT_S
    ctrl_cfg = spec.controller.model_copy(update=update)
    alone = controller_alone(df["text"], labels, spec.descriptions, spec.instruction, ctrl_cfg, work / "labels.run" / "seed")
    if all(p is None for p in alone["pred"]):
        raise SystemExit(f"controller alone: no row got an answer (first reason: {alone['reasons'][0]}); "
                         f"is the controller at {ctrl_cfg.base_url} up?")
    results.append({"dataset": name, "method": "controller alone", "rows": rows_n,
                    "accuracy": accuracy(alone["pred"], gold), "macro_f1": macro_f1(alone["pred"], gold, labels),
                    "llm_share": 1.0, "tokens": alone["tokens"], "rows_per_s": rows_n / alone["wall_s"]})
    for n in names:
        results.append({"dataset": name, "method": f"specialist {n} alone", "rows": rows_n,
                        "accuracy": accuracy(df[f"vote_{n}"], gold), "macro_f1": macro_f1(df[f"vote_{n}"], gold, labels),
                        "llm_share": 0.0, "tokens": 0, "rows_per_s": None})
    mv = majority_vote(df, names)
    results.append({"dataset": name, "method": "plain majority vote", "rows": rows_n,
                    "accuracy": accuracy(mv, gold), "macro_f1": macro_f1(mv, gold, labels),
                    "llm_share": 0.0, "tokens": 0, "rows_per_s": None})
    results.append({"dataset": name, "method": f"pipeline ({args.rule})", "rows": rows_n,
                    "accuracy": report["gold"]["accuracy"], "macro_f1": report["gold"]["macro_f1"],
                    "llm_share": report["llm_share"],
                    "tokens": report["llm"]["prompt_tokens"] + report["llm"]["completion_tokens"],
                    "rows_per_s": report["rows_per_s"], "labelling_rows_per_s": report["labelling_rows_per_s"],
                    "seed": report["seed"], "timings_s": report["timings_s"],
                    "decided_by": report["decided_by"]})
    (work / "baselines.json").write_text(json.dumps(results, indent=2))
    return results


def table(results: list[dict]) -> str:
    lines = ["| dataset | method | rows | accuracy | macro-F1 | LLM share | LLM tokens | rows/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rps = "" if r.get("rows_per_s") is None else f"{r['rows_per_s']:.2f}"
        lines.append(f"| {r['dataset']} | {r['method']} | {r['rows']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
                     f"{r['llm_share']:.0%} | {r['tokens']} | {rps} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, datasets="movie_sentiment,yahoo_topics,banking77", rows=200, out=HERE / "results")
    ap.add_argument("--rule", default="unanimity")
    ap.add_argument("--cache", help="controller cache file for the pipeline (default: a fresh one per run); "
                                    "the controller-alone column never uses a cache")
    ap.add_argument("--reuse-pipeline", action="store_true",
                    help="reuse a finished pipeline run in --out (its report and labels) and measure the rest")
    args = ap.parse_args()
    out_dir = Path(args.out)
    for name in [d for d in args.datasets.split(",") if d]:
        run_dataset(name, args.rows, out_dir, args)
    # The table covers every dataset measured into --out so far (datasets can be run separately).
    print(table(load_results(out_dir, "baselines.json")))


if __name__ == "__main__":
    main()
