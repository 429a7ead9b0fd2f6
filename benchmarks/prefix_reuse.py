"""Prefix reuse in the embedded engine: time and answers with and without it, on real prompts.

    python benchmarks/prefix_reuse.py movie_sentiment 12

Each prompt is scored twice, interleaved so both see the same machine load: once from scratch, once
starting from the previous prompt's keys/values (what the engine does between consecutive requests).
Demonstrations are train rows; labels are the dataset's first 12 (as max_choices offers them).
"""
import sys
import time
from pathlib import Path

import pandas as pd
from labelwright.cluster.embedded_llm import LocalLLMEngine
from labelwright.orchestrator import prompts

ds, n = sys.argv[1], int(sys.argv[2])
root = str(Path(__file__).resolve().parents[2] / "shared" / "datasets" / ds)
test = pd.read_csv(root + "/test.csv").head(n)
train = pd.read_csv(root + "/train.csv").head(200)
labels = sorted(train["label"].astype(str).unique())[:12]
engine = LocalLLMEngine.load("qwen2.5-coder-0.5b-instruct", torch_threads=2)
fresh_t = reuse_t = 0.0
same = 0
toks = 0
for i, text in enumerate(test["text"]):
    demos = [(t, l) for t, l in zip(train["text"][4 * i:4 * i + 4], train["label"][4 * i:4 * i + 4]) if l in labels]
    msgs, _ = prompts.build_messages(text, instruction="Classify the text.", labels=labels, demonstrations=demos)
    prev = engine._last
    engine._last = None
    t = time.perf_counter(); a = engine.label_logprobs(msgs, "label", labels); fresh_t += time.perf_counter() - t
    engine._last = prev
    r0 = engine.reused_tokens
    t = time.perf_counter(); b = engine.label_logprobs(msgs, "label", labels); reuse_t += time.perf_counter() - t
    if i:
        toks += engine.reused_tokens - r0
    same += max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__)
    engine._last = (engine._encode(engine._prompt_text(msgs)) + engine._encode('{"label": "'), engine._last[1])
print(f"{ds}: {n} prompts, {len(labels)} labels: fresh {fresh_t / n:.2f} s/prompt, with reuse {reuse_t / n:.2f} s/prompt "
      f"({fresh_t / reuse_t:.2f}x), same answer {same}/{n}, reused {toks / max(1, n - 1):.0f} tokens/prompt, "
      f"prompt length ~{len(engine._last[0])} tokens")
