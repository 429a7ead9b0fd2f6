"""How fast a run answers over HTTP (`labelwright serve`), against its specialists' own forward work.

Labels a sample (an instant local endpoint as the controller, right 85% of the time, so the specialists are what
is measured), serves the run at the root of Serve's port, and sends real texts the run never saw (the same
dataset's test rows after the sample) to ``POST /v1/label`` in requests of ``--batch`` texts, from 1 and from
``--clients`` callers at once. In the same process, before the service is up, each specialist's checkpoint is
loaded and asked about the same texts in the same batches (plain torch / scikit-learn, one process, every core):
the forward work a row needs, the limit the service is compared with.

    python benchmarks/serve.py --datasets movie_sentiment --rows 400 --texts 1024 --batch 64 --clients 4

Figures: rows/s and latency per request (median, 95th percentile) of each way; the ratio to the plain forward
(of every specialist for ``/v1/label``; of the MiniLM probe alone for its own predict route); the share of the
served texts that went to the controller. Results in ``OUT/serve.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import DATASETS, base_task, batches, noisy_responder, plain_forward, write_sample  # noqa: E402


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def served(url: str, texts: list[str], size: int, clients: int, route: str = "/v1/label") -> dict:
    work = batches(texts, size)
    lock, lat, hard, errors = threading.Lock(), [], [0], []
    post(url + route, {"texts": work[0]})  # warm

    def caller(mine: list[list[str]]):
        for chunk in mine:
            t = time.perf_counter()
            try:
                body = post(url + route, {"texts": chunk})
            except Exception as exc:  # noqa: BLE001 - counted and shown, the run goes on
                errors.append(str(exc))
                continue
            with lock:
                lat.append(time.perf_counter() - t)
                hard[0] += sum(r.get("decided_by", "consensus") != "consensus" for r in body["results"])

    threads = [threading.Thread(target=caller, args=(work[i::clients],)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    share = {"controller_share": hard[0] / len(texts)} if route == "/v1/label" else {}
    return {"rows_per_s": len(texts) / wall, "latency": lat, **share,
            "errors": len(errors), "first_error": errors[0] if errors else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="movie_sentiment")
    ap.add_argument("--rows", type=int, default=400, help="rows the run labels before it is served")
    ap.add_argument("--texts", type=int, default=1024, help="texts sent to the service (test rows after the run's)")
    ap.add_argument("--batch", type=int, default=64, help="texts per request, and the plain forward's batch")
    ap.add_argument("--clients", type=int, default=4, help="callers at once in the concurrent measurement")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--specialists", choices=["default", "fast"], default="default",
                    help="the default three (TF-IDF, MiniLM probe, MiniLM fine-tuned) or the two that fit in seconds")
    ap.add_argument("--route", choices=["measured", "threshold"], default="measured",
                    help="the run's voting.route: measured (the default) or the rule's own threshold")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_serve"))
    ap.add_argument("--seed-size", type=int, default=None)
    args = ap.parse_args()
    args.base_url = args.model = None

    import ray
    from ray import serve

    from labelwright.cluster import runtime
    from labelwright.orchestrator import service
    from labelwright.orchestrator.job import annotate
    from labelwright.orchestrator.spec import load_task
    from tests.fake_openai import FakeOpenAI

    results = []
    for dataset in args.datasets.split(","):
        work = args.out / dataset
        sample, labels = write_sample(dataset, args.rows, work)
        test = pd.read_csv(DATASETS / dataset / "test.csv")["text"].astype(str).tolist()
        texts = test[args.rows:args.rows + args.texts]
        with FakeOpenAI(noisy_responder(dataset, labels, 0.85), model="noisy-0.85") as server:
            args.base_url, args.model = server.base_url, server.model
            task = base_task(dataset, labels, cache_path=str(work / "cache.sqlite"), args=args)
            if args.specialists == "fast":
                task["specialists"] = [{"name": "tfidf", "kind": "tfidf_linear"},
                                       {"name": "minilm_probe", "kind": "embedding_linear"}]
            task["voting"] = {"route": args.route}
            runtime.connect(None)
            serve.start(http_options={"host": "127.0.0.1", "port": args.port})
            out = work / "run" / "labels.parquet"
            report = annotate(sample, spec=load_task(None, task), output=out, fresh=True)
            run_dir = out.with_name("labels.run")
            state = service.load_service(run_dir)
            plain = plain_forward(state.checkpoints, texts, args.batch)
            url = service.start_service(run_dir, host="127.0.0.1", port=args.port, log=print)
            one = served(url, texts, args.batch, 1)
            many = served(url, texts, args.batch, args.clients)
            probe = next((n for n in state.checkpoints if "probe" in n), None)
            alone = served(url, texts, args.batch, args.clients, f"/v1/specialists/{probe}/predict") if probe else None
            probe_plain = plain_forward({probe: state.checkpoints[probe]}, texts, args.batch) if probe else None
            serve.delete(service.APP_NAME)

        def row(name, m):
            lat = sorted(m["latency"])
            return {"way": name, "rows_per_s": round(m["rows_per_s"], 1),
                    "ratio_to_plain": round(m["rows_per_s"] / plain["rows_per_s"], 2),
                    "latency_p50_s": round(statistics.median(lat), 3),
                    "latency_p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3),
                    **{k: m[k] for k in ("controller_share", "errors", "first_error", "per_specialist_rows_per_s")
                       if k in m}}

        result = {"dataset": dataset, "run_rows": args.rows, "run_accuracy": (report.get("gold") or {}).get("accuracy"),
                  "texts": len(texts), "batch": args.batch, "clients": args.clients, "stage": state.stage,
                  "specialists": list(state.checkpoints), "cpus": ray.cluster_resources().get("CPU"),
                  "ways": [row("plain forward, one process", plain), row("POST /v1/label, 1 caller", one),
                           row(f"POST /v1/label, {args.clients} callers", many)]}
        if probe:
            plain = probe_plain
            result["ways"] += [row(f"plain forward of {probe} alone", probe_plain),
                               row(f"POST /v1/specialists/{probe}/predict, {args.clients} callers", alone)]
        results.append(result)
        (work / "serve.json").write_text(json.dumps(result, indent=1))
        print(f"\n{dataset}: {len(texts)} texts in requests of {args.batch}; run of {args.rows} rows at stage "
              f"{state.stage} ({', '.join(state.checkpoints)})")
        print("| way | rows/s | x plain | latency p50 / p95 (s) | to the controller |")
        print("|---|---|---|---|---|")
        for w in result["ways"]:
            share = f"{w['controller_share']:.0%}" if "controller_share" in w else "-"
            print(f"| {w['way']} | {w['rows_per_s']} | {w['ratio_to_plain']} | {w['latency_p50_s']} / "
                  f"{w['latency_p95_s']} | {share} |" + (f" errors {w['errors']}" if w.get("errors") else ""))
        print(f"plain forward per specialist, rows/s: {plain['per_specialist_rows_per_s']}")


if __name__ == "__main__":
    main()
