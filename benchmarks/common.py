"""What the benchmark scripts share: the shared datasets, their instructions, a fixed sample of a
test split, and a results file that configurations (or datasets) can be added to one run at a time."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pandas as pd

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
INSTRUCTIONS = {
    "movie_sentiment": "Classify the sentiment of this movie review sentence.",
    "yahoo_topics": "Classify the topic of this question and answer from a Q&A site.",
    "banking77": "Classify the intent of this banking customer's message.",
}
GENERIC_INSTRUCTION = "Classify the text into exactly one of the labels."


def write_sample(dataset: str, rows: int, work: Path) -> tuple[Path, list[str]]:
    """The first ``rows`` rows of the test split (already shuffled) as ``work/sample.csv``, and the label set."""
    test = pd.read_csv(DATASETS / dataset / "test.csv").head(rows)
    labels = sorted(pd.read_csv(DATASETS / dataset / "train.csv")["label"].astype(str).unique())
    work.mkdir(parents=True, exist_ok=True)
    sample = work / "sample.csv"
    test[["text", "label"]].to_csv(sample, index=False)
    return sample, labels


def save_result(path: Path, result: dict, *, key: str = "config") -> None:
    """Add ``result`` to the JSON list in ``path``, replacing an earlier one of the same ``key`` and size."""
    old = json.loads(path.read_text()) if path.is_file() else []
    kept = [r for r in old if r[key] != result[key] or r["rows"] != result["rows"]]
    path.write_text(json.dumps(kept + [result], indent=2, default=str))


def load_results(out_dir: Path, name: str) -> list[dict]:
    """Every dataset's results under ``out_dir`` (``<dataset>/<name>``)."""
    results: list[dict] = []
    for path in sorted(out_dir.glob(f"*/{name}")):
        results += json.loads(path.read_text())
    return results


def add_common_args(ap, *, datasets: str, rows: int, out: Path) -> None:
    """The flags every benchmark takes: which datasets, how many rows, the seed size, the controller, --out."""
    ap.add_argument("--datasets", default=datasets)
    ap.add_argument("--rows", type=int, default=rows)
    ap.add_argument("--seed-size", type=int, default=None)
    ap.add_argument("--base-url", default=None, help="OpenAI-compatible controller (default: the embedded LLM)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=str(out))
    ap.add_argument("--noisy-endpoint", type=float, default=None, metavar="ACCURACY",
                    help="label with a local OpenAI-compatible endpoint that answers the gold label with this "
                         "probability and a random other label otherwise (fixed per text), instead of an LLM")
    ap.add_argument("--resume", action="store_true",
                    help="go on with each configuration's run left in --out by a stopped benchmark (the job resumes "
                         "from its run directory) instead of starting it fresh; timings then cover the last process")


def base_task(dataset: str, labels: list[str], *, cache_path: str, args) -> dict:
    """The task every benchmark labels a dataset with: gold column, instruction, controller cache, and a seed
    picked from the train split's texts (their labels unused) and labelled by the controller."""
    task = {
        "labels": labels,
        "gold_column": "label",
        "instruction": INSTRUCTIONS.get(dataset, GENERIC_INSTRUCTION),
        "controller": {"cache_path": cache_path},
        "seed": {"pool_file": str(DATASETS / dataset / "train.csv")},
    }
    if args.seed_size:
        task["seed"]["size"] = args.seed_size
    if args.base_url:
        task["controller"].update(base_url=args.base_url, model=args.model)
    return task


def gold_labels(dataset: str) -> dict[str, str]:
    """Every text of the dataset's train and test splits, with its gold label."""
    gold = {}
    for split in ("train", "test"):
        d = pd.read_csv(DATASETS / dataset / f"{split}.csv")
        gold.update(zip(d["text"].astype(str), d["label"].astype(str)))
    return gold


def config_dir(work: Path, name: str) -> Path:
    """Where a configuration's output, report and run directory go: ``work/<configuration>/``."""
    return work / name.replace(" ", "_").replace(",", "").replace("+", "plus")


def annotate_config(name: str, task: dict, sample: Path, work: Path, *, resume: bool = False) -> dict:
    """Label ``sample`` with ``task`` into ``work/<configuration>/``, fresh unless ``resume`` (then the job
    goes on from the run directory a stopped benchmark left there); returns the report."""
    from labelwright.orchestrator.job import annotate
    from labelwright.orchestrator.spec import load_task

    out = config_dir(work, name)
    if not resume:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return annotate(sample, spec=load_task(None, task), output=out / "labels.parquet", report_path=out / "report.json")


def noisy_responder(dataset: str, labels: list[str], accuracy: float, *, seed: int = 0):
    """A fake endpoint's answers (``tests/fake_openai.py``): the gold label of the fenced text (from the
    dataset's train and test splits) with probability ``accuracy``, else another label drawn uniformly; the
    draw is fixed per text, so every configuration and the controller alone see the same endpoint. Only the
    labels the request's schema offers are answered (a shortlist, for many labels): a gold label not offered
    is never answered. Asked
    for a candidate set, it answers a set of that one label."""
    import hashlib
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.fake_openai import HTTPError, last_fenced_text

    gold = gold_labels(dataset)

    def answer(text: str, offered: list[str]) -> str:
        h = hashlib.sha256(f"{seed}:{text}".encode()).digest()
        truth = gold[text]
        if truth in offered and int.from_bytes(h[:8], "big") / 2**64 < accuracy:
            return truth
        others = [x for x in offered if x != truth]
        return others[int.from_bytes(h[8:16], "big") % len(others)]

    def offered_labels(request: dict) -> list[str]:
        """The labels the request's JSON schema allows (a shortlist when the task has many), else all."""
        fmt = request.get("response_format") or {}
        props = ((fmt.get("json_schema") or {}).get("schema") or {}).get("properties") or {}
        for field in props.values():
            enum = field.get("enum") or (field.get("items") or {}).get("enum")
            if enum:
                return list(enum)
        return list(labels)

    def respond(request: dict):
        text = last_fenced_text(request)
        if text is not None and text not in gold:  # truncated in the prompt: match by prefix
            text = next((t for t in gold if t.startswith(text)), None)
        if text is None:
            return HTTPError(400, "the noisy endpoint knows only the dataset's texts")
        label = answer(text, offered_labels(request))
        if '"labels"' in json.dumps(request.get("response_format") or {}):
            return json.dumps({"labels": [label]})
        return json.dumps({"label": label})

    return respond


def run_configs(args, configs: dict, run_config, results_name: str) -> list[dict]:
    """Each configuration named in ``args.configs`` ('|'-separated) on each dataset; the results of every
    dataset measured into ``args.out`` so far (configurations can be run one at a time: others are kept).
    With ``--noisy-endpoint``, every dataset is labelled against that endpoint instead of an LLM."""
    import contextlib

    out_dir = Path(args.out)
    for dataset in [d for d in args.datasets.split(",") if d]:
        work = out_dir / dataset
        sample, labels = write_sample(dataset, args.rows, work)
        with contextlib.ExitStack() as stack:
            if getattr(args, "noisy_endpoint", None) is not None:
                responder = noisy_responder(dataset, labels, args.noisy_endpoint)
                from tests.fake_openai import FakeOpenAI

                server = stack.enter_context(FakeOpenAI(responder, model=f"noisy-{args.noisy_endpoint:g}"))
                args.base_url, args.model = server.base_url, server.model
            for name in [c.strip() for c in args.configs.split("|") if c.strip()]:
                save_result(work / results_name, run_config(name, configs[name], sample, work, labels, dataset, args))
    return load_results(out_dir, results_name)


def batches(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i:i + size] for i in range(0, len(texts), size)]


def plain_forward(checkpoints: dict[str, str], texts: list[str], size: int) -> dict:
    """Every specialist's checkpoint in this process, asked about the texts batch by batch (what one row costs):
    the limit a served or labelling run is compared with. Rows/s, each batch's latency, and rows/s per specialist."""
    from labelwright.specialists.registry import load_specialist

    models = {n: load_specialist(p) for n, p in checkpoints.items()}
    for m in models.values():  # warm: first-call costs (tokenizer, thread pools) are not the steady state
        m.predict(texts[:size])
    per, lat = {n: 0.0 for n in models}, []
    t0 = time.perf_counter()
    for chunk in batches(texts, size):
        t = time.perf_counter()
        for n, m in models.items():
            s = time.perf_counter()
            m.predict(chunk)
            per[n] += time.perf_counter() - s
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return {"rows_per_s": len(texts) / wall, "latency": lat,
            "per_specialist_rows_per_s": {n: len(texts) / s for n, s in per.items()}}
