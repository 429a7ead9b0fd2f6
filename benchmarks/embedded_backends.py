"""The embedded LLM's ways of running on a CPU, side by side on the project's own labelling prompts.

    python benchmarks/embedded_backends.py --rows 100 --threads 2 \\
        --backends "float32|bfloat16|bfloat16, no reuse|bfloat16, logits bf16|int8 dynamic|llama.cpp"

Prompts: for each dataset the first ``--rows`` test rows, asked as the controller asks a hard row
(``specialists/prompts.build_messages``: the dataset's instruction, the allowed labels, 4 demonstrations
that are the nearest of 200 train rows by MiniLM embedding, nearest last, with their gold labels). With more
labels than 12 (banking77) the 12 labels nearest the text by embedding are offered, as the job offers
``controller.max_choices``. Every backend answers the same prompts with constrained choice (every
offered label scored, the best taken), each backend in its own process so its peak memory is its own.

Backends:
- ``float32, before``: the de-quantised GGUF weights in float32, labels scored as before this benchmark
  (the prompt's keys/values repeated for every label, the padded label continuations run as a batch);
- ``float32``: the same weights, labels scored as one token tree over the prompt's keys/values (the
  engine's ``backend: float32``, the reference the other backends' labels are compared with);
- ``bfloat16``: weights and activations in bfloat16 (AMX / AVX512-BF16 matmuls), the vocabulary
  projection in float32 (the engine's ``backend: bfloat16``); ``bfloat16, no reuse`` the same without
  reusing the previous prompt's cached system message; ``bfloat16, logits bf16`` with the projection
  in bfloat16 too (why it is kept in float32);
- ``int8 dynamic``: ``torch.ao.quantization.quantize_dynamic`` of the decoder's linear layers (int8
  weights, activations quantised per batch), from the float32 model;
- ``llama.cpp``: ``llama-cpp-python`` on the shipped Q4_K_M GGUF as it is (skipped when not installed).

Reported per backend: seconds per question (p50, p95), prompt tokens per second, peak RSS, start time
(weights already converted), resident memory after the questions and its peak, the share of questions whose label equals float32's, accuracy against gold,
and the achieved model FLOP/s (2 x non-embedding parameters x prompt tokens / seconds) against the
machine's own ``torch.matmul`` rate for the model's shapes in float32, bfloat16 and int8.
``--first-start`` also times the one-off conversion into an empty cache (float32 safetensors for the torch
backends; the assembled, sha256-checked GGUF for llama.cpp).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS, GENERIC_INSTRUCTION, INSTRUCTIONS  # noqa: E402

MODEL = "qwen2.5-coder-0.5b-instruct"
BACKENDS = ["float32, before", "float32", "bfloat16", "bfloat16, no reuse", "bfloat16, logits bf16", "int8 dynamic", "llama.cpp"]
MAX_CHOICES = 12
DEMO_POOL = 200
SHOTS = 4
FIELD = "label"


# ------------------------------------------------------------------------------------------------ prompts


def build_prompts(datasets: list[str], rows: int) -> list[dict]:
    """The controller's messages for each sampled row, with its offered labels and gold label."""
    import pandas as pd

    from labelwright.specialists import prompts
    from labelwright.orchestrator.acquisition import nearest
    from labelwright.specialists.encoder import Encoder

    encoder = Encoder("minilm")
    out = []
    for dataset in datasets:
        train = pd.read_csv(DATASETS / dataset / "train.csv")
        test = pd.read_csv(DATASETS / dataset / "test.csv").head(rows)
        labels = sorted(train["label"].astype(str).unique())
        pool = train.head(DEMO_POOL)
        demo_idx = nearest(encoder.encode(test["text"].tolist()), encoder.encode(pool["text"].tolist()), SHOTS)
        if len(labels) > MAX_CHOICES:
            label_emb = encoder.encode([label.replace("_", " ") for label in labels])
            offered = nearest(encoder.encode(test["text"].tolist()), label_emb, MAX_CHOICES)
        for i, (text, gold) in enumerate(zip(test["text"], test["label"].astype(str))):
            allowed = [labels[j] for j in offered[i]] if len(labels) > MAX_CHOICES else labels
            demos = [(pool["text"].iloc[j], str(pool["label"].iloc[j])) for j in demo_idx[i][::-1]]
            messages, _ = prompts.build_messages(
                text, instruction=INSTRUCTIONS.get(dataset, GENERIC_INSTRUCTION), labels=allowed,
                demonstrations=demos)
            out.append({"dataset": dataset, "messages": messages, "allowed": allowed, "gold": gold})
    return out


# ------------------------------------------------------------------------------------------------ the machine's limit


def matmul_reference(tokens: int, threads: int, config: dict) -> dict:
    """Achieved FLOP/s of ``torch.matmul`` (and int8 ``torch._int_mm``) over the decoder's weight shapes for a
    ``tokens``-row activation, weighted as one forward pass weighs them."""
    import torch

    torch.set_num_threads(threads)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter),
              (inter, hidden)]
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("int8", torch.int8)):
        flops = seconds = 0.0
        for k, n in shapes:
            if dtype is torch.int8:
                a = torch.randint(-127, 127, (tokens, k), dtype=torch.int8)
                w = torch.randint(-127, 127, (k, n), dtype=torch.int8)
                run = lambda: torch._int_mm(a, w)  # noqa: E731
            else:
                a, w = torch.randn(tokens, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
                run = lambda: a @ w  # noqa: E731
            for _ in range(3):
                run()
            reps = 10
            start = time.perf_counter()
            for _ in range(reps):
                run()
            seconds += (time.perf_counter() - start) / reps
            flops += 2 * tokens * k * n
        out[name] = flops / seconds
    return out


# ------------------------------------------------------------------------------------------------ backends


class LlamaCppScorer:
    """Constrained choice on llama-cpp-python with the engine's maths: the prompt evaluated once, each
    label's continuation after it (its first token from the prompt's last logits), the best total log-prob
    taken. Benchmark only: it is measured here, not shipped."""

    def __init__(self, gguf: str, tokenizer, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(gguf, n_ctx=4096, n_batch=512, n_threads=threads, n_threads_batch=threads,
                         verbose=False)
        self.tokenizer = tokenizer

    def _logprobs(self, row) -> list[float]:
        import numpy as np

        z = np.asarray(row, dtype=np.float64)
        return list(z - (np.log(np.exp(z - z.max()).sum()) + z.max()))

    def choose(self, messages, field, allowed):
        import numpy as np

        from labelwright.specialists.llm_engine import answer_prefix

        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text + answer_prefix(field), add_special_tokens=False)["input_ids"]
        conts = [self.tokenizer(json.dumps(label)[1:-1] + '"}', add_special_tokens=False)["input_ids"]
                 for label in allowed]
        llm = self.llm
        # Reuse the longest prefix shared with the previous prompt, as the torch engine does.
        shared = 0
        for a, b in zip(llm.input_ids[: llm.n_tokens], ids):
            if a != b:
                break
            shared += 1
        llm.n_tokens = min(shared, len(ids) - 1)
        llm.eval(ids[llm.n_tokens:])
        first = self._logprobs(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)))
        prompt_len = llm.n_tokens
        totals = []
        for cont in conts:  # each label's tokens after the prompt, its logits read straight from the context
            total = first[cont[0]]
            if len(cont) > 1:
                llm._ctx.kv_cache_seq_rm(-1, prompt_len, -1)
                llm._batch.set_batch(batch=cont[:-1], n_past=prompt_len, logits_all=True)
                llm._ctx.decode(llm._batch)
                rows = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(cont) - 1, llm.n_vocab()))
                for j in range(1, len(cont)):
                    total += self._logprobs(rows[j - 1])[cont[j]]
            totals.append(total)
        llm._ctx.kv_cache_seq_rm(-1, prompt_len, -1)
        best = max(range(len(allowed)), key=totals.__getitem__)
        return allowed[best], len(ids)


def before_engine_class():
    """The engine as it scored labels before this benchmark: the prompt's keys/values repeated once per label
    and every label's padded continuation run as a batch over them (the float32 reference's old speed)."""
    import torch

    from labelwright.specialists.llm_engine import LocalLLMEngine, _cache_of, _LabelPass, answer_prefix

    class BeforeEngine(LocalLLMEngine):
        def _score_labels(self, messages, field, labels, cancel=None):
            prompt_ids = self._encode(self._prompt_text(messages))
            prefix_ids = self._encode(answer_prefix(field))
            conts = [self._encode(json.dumps(label)[1:-1] + '"}') for label in labels]
            width = max(len(c) for c in conts)
            pad = self.tokenizer.pad_token_id or 0
            batch = torch.tensor([c + [pad] * (width - len(c)) for c in conts])
            with self._lock, torch.inference_mode():
                self._last = None  # it kept a deep copy of the system message's cache: not measured here
                out = self._prefill(prompt_ids + prefix_ids)
                first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
                cache = _cache_of(out)
                cache.batch_repeat_interleave(len(conts))
                logits = self.model(batch, **{self._cache_kw: cache}, use_cache=False).logits
                rest = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                self._last = None
                lps = [[first[c[0]].item()] + [rest[i, j - 1, c[j]].item() for j in range(1, len(c))]
                       for i, c in enumerate(conts)]
                dists = {(): first}
                for i, c in enumerate(conts):
                    dists.update((tuple(c[:j]), rest[i, j - 1]) for j in range(1, len(c)))
            return _LabelPass(prompt_ids, prefix_ids, conts, lps, dists)

    return BeforeEngine


class TorchScorer:
    def __init__(self, engine, reuse: bool = True):
        self.engine, self.reuse = engine, reuse

    def choose(self, messages, field, allowed):
        if not self.reuse:
            self.engine._last = None
        result = self.engine.choose(messages, field, allowed)
        return result.label, result.prompt_tokens


def load_backend(name: str, threads: int):
    """The scorer for backend ``name`` and the model's config (a dict)."""
    import torch

    from labelwright.specialists.llm_engine import LocalLLMEngine
    from labelwright.specialists.local_model import BUNDLED_MODELS, assemble_gguf, ensure_cached

    torch.set_num_threads(threads)
    cached = ensure_cached(MODEL)
    config = json.loads((cached / "config.json").read_text())
    if name == "llama.cpp":
        from transformers import AutoTokenizer

        gguf = Path(tempfile.gettempdir()) / "labelwright-bench" / BUNDLED_MODELS[MODEL].gguf_name
        if not gguf.is_file():
            assemble_gguf(BUNDLED_MODELS[MODEL], gguf)
        return LlamaCppScorer(str(gguf), AutoTokenizer.from_pretrained(str(cached)), threads), config
    if name == "float32, before":
        from labelwright.specialists.local_model import load_local_model

        model, tokenizer = load_local_model(MODEL, torch_threads=threads, backend="float32")
        return TorchScorer(before_engine_class()(model, tokenizer, model_name=MODEL), reuse=False), config
    if name in ("float32", "bfloat16", "bfloat16, no reuse"):
        backend = "float32" if name == "float32" else "bfloat16"
        engine = LocalLLMEngine.load(MODEL, torch_threads=threads, backend=backend)
        return TorchScorer(engine, reuse=name != "bfloat16, no reuse"), config
    engine = LocalLLMEngine.load(MODEL, torch_threads=threads, backend="float32")
    if name == "bfloat16, logits bf16":
        engine.model.to(torch.bfloat16)
    elif name == "int8 dynamic":
        import warnings

        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated in favour of torchao, which is not installed here
            quantize_dynamic(engine.model.model.layers, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    else:
        raise SystemExit(f"unknown backend {name!r}; choose from {BACKENDS}")
    return TorchScorer(engine), config


def run_backend(name: str, prompts_file: Path, threads: int) -> dict:
    items = json.loads(prompts_file.read_text())
    start = time.perf_counter()
    scorer, config = load_backend(name, threads)
    load_s = time.perf_counter() - start
    answers, seconds, tokens = [], [], []
    for i, item in enumerate(items):
        t0 = time.perf_counter()
        label, n = scorer.choose(item["messages"], FIELD, item["allowed"])
        seconds.append(time.perf_counter() - t0)
        answers.append(label)
        tokens.append(n)
        if (i + 1) % 25 == 0:
            print(f"  {name}: {i + 1}/{len(items)} questions, {statistics.median(seconds):.2f} s median",
                  file=sys.stderr, flush=True)
    import gc

    import psutil

    gc.collect()
    rss_gb = psutil.Process().memory_info().rss / 1e9  # after the questions: the weights are resident by now
    return {"backend": name, "answers": answers, "seconds": seconds, "prompt_tokens": tokens, "load_s": load_s, "rss_gb": rss_gb,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "config": config}


def first_start(kind: str) -> float:
    """Seconds of the one-off conversion into an empty cache."""
    from labelwright.specialists.local_model import BUNDLED_MODELS, assemble_gguf, ensure_cached

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        if kind == "llama.cpp":
            assemble_gguf(BUNDLED_MODELS[MODEL], Path(tmp) / "model.gguf")
        else:
            ensure_cached(MODEL, cache_dir=tmp)
        return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ report


def non_embedding_params(config: dict) -> int:
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * inter)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def table(results: list[dict], items: list[dict], reference: dict, first: dict) -> str:
    base = next((r for r in results if r["backend"] == "float32"), None)
    before = next((r for r in results if r["backend"] == "float32, before"), base)
    lines = [f"| backend | questions | s/question p50 | p95 | prompt tok/s | speed-up on {before['backend'] if before else '-'} | same label as float32 | "
             "accuracy | model GFLOP/s | of bf16 matmul | start s | first start s | RSS GB | peak RSS GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    gold = [it["gold"] for it in items]
    for r in results:
        n = len(r["answers"])
        total_s = sum(r["seconds"])
        params = non_embedding_params(r["config"])
        gflops = 2 * params * sum(r["prompt_tokens"]) / total_s / 1e9
        same = (f"{sum(a == b for a, b in zip(r['answers'], base['answers'])) / n:.1%}" if base else "-")
        speed = f"{sum(before['seconds']) / total_s:.2f}x" if before else "-"
        acc = sum(a == g for a, g in zip(r["answers"], gold)) / n
        kind = "llama.cpp" if r["backend"] == "llama.cpp" else "torch"
        fs = f"{first[kind]:.0f}" if kind in first else "-"
        lines.append(
            f"| {r['backend']} | {n} | {percentile(r['seconds'], 0.5):.2f} | {percentile(r['seconds'], 0.95):.2f} | "
            f"{sum(r['prompt_tokens']) / total_s:.0f} | {speed} | {same} | {acc:.3f} | {gflops:.0f} | "
            f"{gflops * 1e9 / reference['bfloat16']:.0%} | {r['load_s']:.1f} | {fs} | {r['rss_gb']:.2f} | "
            f"{r['peak_rss_gb']:.2f} |")
    by_dataset = {}
    for it, i in zip(items, range(len(items))):
        by_dataset.setdefault(it["dataset"], []).append(i)
    lines += ["", "Per dataset (accuracy; same label as float32):", ""]
    lines.append("| backend | " + " | ".join(by_dataset) + " |")
    lines.append("|---|" + "---|" * len(by_dataset))
    for r in results:
        cells = []
        for rows in by_dataset.values():
            acc = sum(r["answers"][i] == items[i]["gold"] for i in rows) / len(rows)
            same = sum(r["answers"][i] == base["answers"][i] for i in rows) / len(rows) if base else float("nan")
            cells.append(f"{acc:.3f}; {same:.0%}")
        lines.append(f"| {r['backend']} | " + " | ".join(cells) + " |")
    ref = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in reference.items())
    lines += ["", f"Machine reference, torch.matmul over the decoder's shapes at the mean prompt length "
                  f"(GFLOP/s; int8 in GOP/s): {ref}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="movie_sentiment,yahoo_topics,banking77")
    ap.add_argument("--rows", type=int, default=100, help="test rows per dataset")
    ap.add_argument("--backends", default="|".join(BACKENDS), help="'|'-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--first-start", action="store_true", help="also time the conversion into an empty cache")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_embedded_backends"))
    ap.add_argument("--keep", action="store_true",
                    help="reuse the results already in --out (same prompts) for backends measured before; run the rest")
    ap.add_argument("--_one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    prompts_file = args.out / "prompts.json"

    if args._one:  # child: one backend, its result as JSON in a file
        result = run_backend(args._one, prompts_file, args.threads)
        (args.out / f"result-{args._one.replace(' ', '_').replace(',', '')}.json").write_text(json.dumps(result))
        return

    items = build_prompts([d for d in args.datasets.split(",") if d], args.rows)
    if args.keep and prompts_file.is_file() and json.loads(prompts_file.read_text()) != items:
        raise SystemExit(f"--keep: the prompts in {prompts_file} differ from these; drop --keep or change --out")
    prompts_file.write_text(json.dumps(items))
    results = []
    for name in [b.strip() for b in args.backends.split("|") if b.strip()]:
        path = args.out / f"result-{name.replace(' ', '_').replace(',', '')}.json"
        if args.keep and path.is_file():
            results.append(json.loads(path.read_text()))
            continue
        if name == "llama.cpp":
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                print("llama.cpp: llama-cpp-python is not installed; skipped", file=sys.stderr)
                continue
        print(f"{name}: {len(items)} questions", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--_one", name, "--out", str(args.out), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, env=os.environ.copy())
        if proc.returncode != 0 or not path.is_file():
            print(f"{name}: failed with exit code {proc.returncode}", file=sys.stderr)
            continue
        results.append(json.loads(path.read_text()))
    first = {}
    if args.first_start:
        first["torch"] = first_start("torch")
        if any(r["backend"] == "llama.cpp" for r in results):
            first["llama.cpp"] = first_start("llama.cpp")
    if not results:
        raise SystemExit("no backend finished")
    mean_tokens = round(statistics.mean(results[0]["prompt_tokens"]))
    reference = matmul_reference(mean_tokens, args.threads, results[0]["config"])
    text = table(results, items, reference, first)
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
