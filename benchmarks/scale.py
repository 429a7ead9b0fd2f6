"""Labelling throughput and memory as the input grows, against the specialists' own forward work.

Real texts of a dataset, resampled to each size (``--sizes``), labelled with an instant local endpoint as the
controller (right 85% of the time: the specialists and the pipeline are what is measured), stages off (the voting
stage alone), the rule's own routing. While a job runs, the resident memory of the driver and of each kind of Ray
worker (the labelling actors, each specialist's Serve replicas) is sampled every second. After the jobs, each
specialist's checkpoint is loaded in this process and asked about the same texts in batches of
``runtime.vote_batch_size`` (plain scikit-learn / torch, one process): the forward work every row needs, the limit.

    python benchmarks/scale.py --datasets movie_sentiment --sizes 2000,10000

Figures: labelling rows/s (the job's own ``labelling_rows_per_s``), its ratio to the plain forward, LLM share, and
the peak memory per kind at each size. Results in ``OUT/<dataset>/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import DATASETS, base_task, noisy_responder, plain_forward  # noqa: E402


def kind_of(cmdline: str) -> str | None:
    """The kind of a Ray worker process from its title, or None for processes not measured."""
    if "ServeReplica:" in cmdline:
        # the title is ServeReplica:<app>:<deployment>[.<method it runs now>]
        return "replica " + cmdline.split("ServeReplica:", 1)[1].split()[0].rsplit(":", 1)[-1].split(".")[0]
    if "MapBatches" in cmdline or "MapWorker" in cmdline:
        return "labelling actor"
    return None


class Memory:
    """Peak resident memory per process kind, sampled every ``every_s`` seconds while running."""

    def __init__(self, every_s: float = 1.0):
        self.peak: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def _run(self, every_s: float) -> None:
        import psutil

        me = os.getpid()
        while not self.stop.is_set():
            now: dict[str, float] = {}
            for proc in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                try:
                    line = " ".join(proc.info["cmdline"] or [])
                    kind = "driver" if proc.info["pid"] == me else kind_of(line)
                    if kind is not None:
                        mb = proc.info["memory_info"].rss / 2**20
                        now[kind] = max(now.get(kind, 0.0), mb)
                except (psutil.Error, TypeError):
                    continue
            for k, v in now.items():
                self.peak[k] = max(self.peak.get(k, 0.0), v)
            self.stop.wait(every_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="movie_sentiment")
    ap.add_argument("--sizes", default="2000,10000", help="input rows per job, comma-separated")
    ap.add_argument("--specialists", choices=["default", "fast", "tfidf"], default="fast",
                    help="fast: TF-IDF and the MiniLM probe; default: those and the fine-tuned MiniLM; tfidf: TF-IDF "
                         "alone (the pipeline's own costs, for sizes where the MiniLM forward would take hours)")
    ap.add_argument("--plain-rows", type=int, default=2000, help="texts the plain forward is timed on")
    ap.add_argument("--vote-actors", type=int, default=None,
                    help="runtime.vote_actors (batches voted at once; default: the job's default)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_scale"))
    args = ap.parse_args()
    args.seed_size, args.base_url, args.model = None, None, None

    from labelwright.orchestrator.job import annotate
    from labelwright.orchestrator.service import load_service
    from labelwright.orchestrator.spec import load_task
    from tests.fake_openai import FakeOpenAI

    for dataset in args.datasets.split(","):
        work = args.out / dataset
        work.mkdir(parents=True, exist_ok=True)
        pool = pd.concat([pd.read_csv(DATASETS / dataset / f"{s}.csv") for s in ("train", "test")])
        labels = sorted(pool["label"].astype(str).unique())
        rng = np.random.default_rng(0)
        rows, checkpoints = [], None
        with FakeOpenAI(noisy_responder(dataset, labels, 0.85), model="noisy-0.85") as server:
            args.base_url, args.model = server.base_url, server.model
            for n in [int(s) for s in args.sizes.split(",")]:
                sample = work / f"sample-{n}.parquet"
                pool.iloc[rng.integers(0, len(pool), n)][["text"]].to_parquet(sample, index=False)
                task = base_task(dataset, labels, cache_path=str(work / "cache.sqlite"), args=args)
                task.pop("gold_column")
                task["stages"] = {"enabled": False}
                task["voting"] = {"route": "threshold", "reference_rows": 0}
                if args.vote_actors:
                    task.setdefault("runtime", {})["vote_actors"] = args.vote_actors
                if args.specialists != "default":
                    task["specialists"] = [{"name": "tfidf", "kind": "tfidf_linear"}] + (
                        [{"name": "minilm_probe", "kind": "embedding_linear"}] if args.specialists == "fast" else [])
                out = work / f"run-{n}" / "labels.parquet"
                with Memory() as mem:
                    report = annotate(sample, spec=load_task(None, task), output=out, fresh=True)
                checkpoints = load_service(out.with_name("labels.run")).checkpoints
                rows.append({"rows": n, "labelling_rows_per_s": report["labelling_rows_per_s"],
                             "llm_share": report["decided_by"].get("controller", 0) / n,
                             "label_s": report["timings_s"].get("label"),
                             "peak_rss_mb": {k: round(v) for k, v in sorted(mem.peak.items())}})
                print(json.dumps(rows[-1]), flush=True)
        texts = pool["text"].astype(str).sample(n=min(args.plain_rows, len(pool)), random_state=0).tolist()
        plain = plain_forward(checkpoints, texts, 128)["rows_per_s"]
        for r in rows:
            r["ratio_to_plain"] = round(r["labelling_rows_per_s"] / plain, 2)
        result = {"dataset": dataset, "specialists": list(checkpoints), "plain_forward_rows_per_s": round(plain, 1),
                  "cpus": os.cpu_count(), "sizes": rows}
        (work / "scale.json").write_text(json.dumps(result, indent=1))
        kinds = sorted({k for r in rows for k in r["peak_rss_mb"]})
        print(f"\n{dataset}: plain forward of {', '.join(checkpoints)}: {plain:.1f} rows/s")
        print("| rows | labelling rows/s | x plain | LLM share | " + " | ".join(f"peak MB {k}" for k in kinds) + " |")
        print("|---" * (4 + len(kinds)) + "|")
        for r in rows:
            print(f"| {r['rows']} | {r['labelling_rows_per_s']:.1f} | {r['ratio_to_plain']} | {r['llm_share']:.0%} | "
                  + " | ".join(str(r["peak_rss_mb"].get(k, "-")) for k in kinds) + " |")


if __name__ == "__main__":
    main()
