"""Does choosing the annotator on a small gold sample pick the one that labels the rest best?

``labelwright select-annotator`` on the last ``--gold-rows`` rows of a dataset's train split, with ``--repeats``
repeats, over: prompt variants of an LLM at ``--base-url`` (0 and 4 demonstrations at temperature 0, 4 at
temperature 0.7) and local endpoints right a known share of the time (``--noisy``: they answer the gold label
with that probability, fixed per text); then every annotator labels ``--rows`` test rows once (demonstrations
drawn from the gold sample), and the chosen one's accuracy there is compared with the best.

    labelwright llm --port 8011 &
    python benchmarks/annotators.py --base-url http://127.0.0.1:8011/v1 --model qwen2.5-coder-0.5b-instruct@float32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import DATASETS, GENERIC_INSTRUCTION, INSTRUCTIONS, noisy_responder  # noqa: E402


def held_out(annotator: dict, dataset: str, labels: list[str], gold: pd.DataFrame, test: pd.DataFrame) -> float:
    """``annotator``'s accuracy on the test rows, asked once, its demonstrations the nearest gold rows."""
    from labelwright.orchestrator.acquisition import nearest
    from labelwright.orchestrator.annotators import Annotator
    from labelwright.orchestrator.controller import Controller, ControllerConfig
    from labelwright.orchestrator.report import accuracy
    from labelwright.specialists.encoder import Encoder

    a = Annotator(**annotator)
    controller = Controller(ControllerConfig(**a.controller(), cache=False), labels=labels, descriptions={},
                            instruction=INSTRUCTIONS.get(dataset, GENERIC_INSTRUCTION))
    texts = test["text"].astype(str).tolist()
    demos = None
    if a.shots:
        enc = Encoder("minilm")
        bank = gold["text"].astype(str).tolist()
        idx = nearest(enc.encode(texts), enc.encode(bank), a.shots)
        demos = [[(bank[j], gold["label"].iloc[j]) for j in row[::-1]] for row in idx]
    answers = controller.label_many(texts, demonstrations=demos)
    return accuracy([x.label for x in answers], test["label"].astype(str).tolist())


def main() -> None:
    from labelwright.orchestrator.annotators import select_annotator
    from labelwright.orchestrator.spec import load_task
    from tests.fake_openai import FakeOpenAI

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="movie_sentiment")
    ap.add_argument("--gold-rows", type=int, default=60)
    ap.add_argument("--rows", type=int, default=200, help="test rows the held-out check labels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--base-url", default=None, help="an OpenAI-compatible LLM whose prompt variants compete")
    ap.add_argument("--model", default=None)
    ap.add_argument("--noisy", default="0.7,0.8", help="accuracies of the local endpoints that compete too")
    ap.add_argument("--out", default="runs/bench_annotators")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = sorted(pd.read_csv(DATASETS / args.dataset / "train.csv")["label"].astype(str).unique())
    gold = pd.read_csv(DATASETS / args.dataset / "train.csv").tail(args.gold_rows)[["text", "label"]]
    gold["label"] = gold["label"].astype(str)
    gold.to_csv(out / "gold.csv", index=False)
    test = pd.read_csv(DATASETS / args.dataset / "test.csv").head(args.rows)
    annotators = []
    if args.base_url:
        for shots, temperature in ((0, 0.0), (4, 0.0), (4, 0.7)):
            annotators.append({"name": f"{args.model}-{shots}shot-t{temperature:g}", "base_url": args.base_url,
                               "model": args.model, "shots": shots, "temperature": temperature})
    with contextlib.ExitStack() as stack:
        for acc in [float(x) for x in args.noisy.split(",") if x]:
            server = stack.enter_context(FakeOpenAI(noisy_responder(args.dataset, labels, acc), model=f"noisy-{acc:g}"))
            annotators.append({"name": f"endpoint-right-{acc:g}", "base_url": server.base_url, "model": server.model,
                               "shots": 0})
        (out / "annotators.yaml").write_text(yaml.safe_dump({"annotators": annotators}))
        spec = load_task(None, {"labels": labels, "instruction": INSTRUCTIONS.get(args.dataset, GENERIC_INSTRUCTION)})
        record = select_annotator(out / "gold.csv", out / "annotators.yaml", spec=spec, repeats=args.repeats,
                                  output=out / "task.yaml")
        for a, r in zip(annotators, record["annotators"]):
            r["held_out_accuracy"] = held_out(a, args.dataset, labels, gold, test)
            print(f"{r['name']}: gold-sample accuracy {r['accuracy']:.3f}, held-out {r['held_out_accuracy']:.3f}",
                  flush=True)
    best = max(record["annotators"], key=lambda r: r["held_out_accuracy"])
    chosen = next(r for r in record["annotators"] if r["name"] == record["chosen"])
    record.update(dataset=args.dataset, held_out_rows=len(test), best_held_out=best["name"],
                  chosen_held_out_accuracy=chosen["held_out_accuracy"], best_held_out_accuracy=best["held_out_accuracy"])
    (out / "result.json").write_text(json.dumps(record, indent=2))
    print("| annotator | gold sample: accuracy | macro-F1 | Cohen's kappa | Fleiss' kappa | Krippendorff's alpha | "
          "s/row | held-out accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    for r in record["annotators"]:
        f = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
        print(f"| {r['name']}{' (chosen)' if r['name'] == record['chosen'] else ''} | {r['accuracy']:.3f} | "
              f"{r['macro_f1']:.3f} | {r['cohen_kappa']:.3f} | {f(r['fleiss_kappa'])} | {f(r['krippendorff_alpha'])} | "
              f"{r['seconds_per_row']:.2f} | {r['held_out_accuracy']:.3f} |")
    print(f"chosen {record['chosen']} ({chosen['held_out_accuracy']:.3f} held out); best held out: {best['name']} "
          f"({best['held_out_accuracy']:.3f})")


if __name__ == "__main__":
    main()
