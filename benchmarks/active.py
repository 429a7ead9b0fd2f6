"""Active annotation under a budget: learning curves of the acquisition strategies, with and without
learning-to-reweight, against the passive pipeline at the same budget and the controller on every row.

Each line labels the same rows (the first ``--rows`` of a dataset's test split) with the same controller and
budget (a share of the rows): the loop of ``orchestrator/active.py`` with the real ``Controller`` (the same
ask as ``labelwright annotate --mode active``), then the final labels: the controller's on the rows it was
asked about, the task model's on the rest. The passive line is ``labelwright annotate`` (the default
pipeline) with ``budget.max_llm_calls`` at the same budget; the ceiling is the controller asked about every row.
Reweighting's reference rows are ``--gold-rows`` rows of the train split (not in the input), as a
``--gold-file`` would give them, or (``--reweight first-round``) the controller's answers on the first round.

    python benchmarks/active.py --noisy-endpoint 0.85                     # every dataset, an 85%-right endpoint
    python benchmarks/active.py --datasets banking77 --budgets 0.1 --strategies hybrid --passive
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    DATASETS, INSTRUCTIONS, GENERIC_INSTRUCTION, add_common_args, annotate_config, base_task, noisy_responder,
    write_sample,
)


def _embed(texts: list[str], path: Path) -> np.ndarray:
    from labelwright.specialists.encoder import Encoder

    if path.is_file():
        return np.load(path)
    X = Encoder("minilm").encode(texts)
    np.save(path, X)
    return X


def run_line(dataset, texts, gold, labels, X, ref, label_emb, *, strategy, reweight, budget, args) -> dict:
    from labelwright.orchestrator.active import ActiveSettings, ActiveState, controller_ask, run_active
    from labelwright.orchestrator.controller import Controller, ControllerConfig
    from labelwright.orchestrator.report import accuracy, macro_f1

    cfg = ControllerConfig(base_url=args.base_url, model=args.model, cache=False)  # every answer is paid for
    controller = Controller(cfg, labels=labels, descriptions={},
                            instruction=INSTRUCTIONS.get(dataset, GENERIC_INSTRUCTION))
    state = ActiveState()
    settings = ActiveSettings(acquisition=strategy, reweight=bool(reweight), rounds=args.rounds)
    t = time.monotonic()
    ask = controller_ask(controller, texts, X, state, labels, max_calls=budget, label_emb=label_emb)
    if reweight == "first round":  # no gold file: the controller's answers on the first round's rows, as the job does
        def ref():
            first = [(p, lab) for p, lab, r in zip(state.pos, state.label, state.round) if r == 1 and lab is not None]
            return (X[[p for p, _ in first]], np.array([labels.index(lab) for _, lab in first])) if first else None
    probs, weights = run_active(X, labels, ask=ask, max_calls=budget, settings=settings, state=state,
                                reference=ref if reweight else None, gold=gold, log=lambda m: None)
    final = [labels[j] for j in probs.argmax(1)]
    asked = np.zeros(len(texts), bool)
    for p, lab in zip(state.pos, state.label):
        asked[p] = True
        final[p] = lab
    model_rows = ~asked
    return {
        "config": strategy + {None: "", "gold": " + reweight", "first round": " + reweight (first round)"}[reweight], "dataset": dataset, "rows": len(texts),
        "budget": budget, "budget_share": budget / len(texts), "llm_calls": state.spent,
        "llm_share": float(asked.mean()), "accuracy": accuracy(final, gold), "macro_f1": macro_f1(final, gold, labels),
        "model_accuracy": accuracy(np.array(final, dtype=object)[model_rows], np.array(gold, dtype=object)[model_rows]),
        "controller_accuracy": accuracy([lab for lab in state.label], [gold[p] for p in state.pos]),
        "rounds": len([r for r in state.rounds if "asked" in r and not r.get("final_top_up")]),
        "seconds": round(time.monotonic() - t, 1),
        "flipped_weight": _flipped_weight(state, weights, gold) if reweight else None,
    }


def _flipped_weight(state, weights: dict, gold) -> dict:
    """Mean reweighting weight of the bought rows whose controller label is wrong, and of the right ones."""
    wrong = [weights[p] for p, lab in zip(state.pos, state.label) if lab is not None and lab != gold[p] and p in weights]
    right = [weights[p] for p, lab in zip(state.pos, state.label) if lab is not None and lab == gold[p] and p in weights]
    return {"wrong_labels": float(np.mean(wrong)) if wrong else None, "right_labels": float(np.mean(right)) if right else None}


def controller_alone(dataset, texts, gold, labels, X, label_emb, args) -> dict:
    """The ceiling: the controller asked about every row (zero-shot shortlist by label similarity)."""
    from labelwright.orchestrator.controller import Controller, ControllerConfig
    from labelwright.orchestrator.report import accuracy, macro_f1
    from labelwright.orchestrator.voting import top_candidates

    cfg = ControllerConfig(base_url=args.base_url, model=args.model, cache=False)  # every answer is paid for
    controller = Controller(cfg, labels=labels, descriptions={},
                            instruction=INSTRUCTIONS.get(dataset, GENERIC_INSTRUCTION))
    choices = None
    if len(labels) > cfg.max_choices:
        choices = [[labels[j] for j in row] for row in top_candidates(X @ label_emb.T, cfg.max_choices)]
    answers = controller.label_many(texts, choices=choices)
    final = [a.label for a in answers]
    return {"config": "controller on every row", "dataset": dataset, "rows": len(texts), "budget": len(texts),
            "budget_share": 1.0, "llm_calls": sum(a.calls for a in answers), "llm_share": 1.0,
            "accuracy": accuracy(final, gold), "macro_f1": macro_f1(final, gold, labels)}


def passive(dataset, sample, labels, budget, args, work: Path) -> dict:
    """``labelwright annotate`` with its defaults at ``budget.max_llm_calls = budget``, the ``--gold-rows`` train rows
    as its gold file (what the reweighting lines get), no gold row of the input used."""
    task = base_task(dataset, labels, cache_path=str(Path(args.out) / "cache.sqlite"), args=args)
    task["budget"] = {"max_llm_calls": budget}
    task.pop("seed")  # the seed comes from the input, as in active mode
    # The same gold rows as the reweighting lines, as a gold file; the input's gold column only scores the run.
    gold_file = work / f"gold-{args.gold_rows}.csv"
    pd.read_csv(DATASETS / dataset / "train.csv").head(args.gold_rows)[["text", "label"]].to_csv(gold_file, index=False)
    task["voting"] = {"gold_file": str(gold_file)}
    task["stages"] = {"check_rows": 0}
    task["controller"]["cache"] = False
    report = annotate_config(f"passive-{budget}", task, sample, work)
    return {"config": "passive pipeline", "dataset": dataset, "rows": report["rows_in"], "budget": budget,
            "budget_share": budget / report["rows_in"], "llm_calls": report["llm"]["calls"],
            "llm_share": report["llm_share"], "accuracy": report["gold"]["accuracy"],
            "macro_f1": report["gold"]["macro_f1"], "decided_by": report["decided_by"]}


def noise_check(dataset, X, gold, labels, ref, bought: int, label_emb, draws: int = 4, wrong: float = 0.15) -> dict:
    """Reweighting alone, away from the loop: ``bought`` random rows with ``wrong`` of their labels replaced by
    another label; the task model fitted with no weights, with the look-ahead weights normalised over all rows
    and per label, and with the wrong rows dropped (what a perfect weighting would do); accuracy on the other
    rows, the mean of ``draws`` draws. With more labels than a controller is offered (12), also how often the
    offered shortlist holds the true label: by label similarity, the model's top 12 (no weights), and both
    (``active.shortlist``)."""
    from labelwright.orchestrator.active import shortlist
    from labelwright.specialists.linear_head import fit_linear_head, predict_linear_head
    from labelwright.training.stage import balanced_weights
    from labelwright.training.reweight import lookahead_weights

    y = np.array([labels.index(g) for g in gold])
    K = len(labels)
    scores: dict[str, list[float]] = {}
    for draw in range(draws):
        rng = np.random.default_rng(draw)
        pos = rng.choice(len(y), bought, replace=False)
        noisy = y[pos].copy()
        flip = rng.random(bought) < wrong
        noisy[flip] = (noisy[flip] + rng.integers(1, K, flip.sum())) % K
        rest = np.setdiff1d(np.arange(len(y)), pos)
        weights = {
            "no weights": np.ones(bought),
            "weights over all rows": lookahead_weights(X[pos], noisy, K, ref_X=ref[0], ref_y=ref[1], per_label=False),
            "weights per label": lookahead_weights(X[pos], noisy, K, ref_X=ref[0], ref_y=ref[1]),
            "wrong rows dropped": (~flip).astype(float),
        }
        for name, w in weights.items():
            fit_w = w * balanced_weights(noisy.astype(str))
            keep = fit_w > 0
            W, b = fit_linear_head(X[pos][keep], noisy[keep], K, sample_weight=fit_w[keep], l2=1e-3)
            probs = predict_linear_head(X[rest], W, b)
            scores.setdefault(name, []).append(float((probs.argmax(1) == y[rest]).mean()))
            if name == "no weights" and K > 12:
                sim = X[rest] @ label_emb.T
                for what, lists in (("shortlist: label similarity", shortlist(None, sim, labels, 12)),
                                    ("shortlist: model top 12", shortlist(probs, None, labels, 12)),
                                    ("shortlist: both", shortlist(probs, sim, labels, 12))):
                    scores.setdefault(what, []).append(float(np.mean([gold[r] in lst for r, lst in zip(rest, lists)])))
    return {"dataset": dataset, "bought": bought, "wrong": wrong, "draws": draws,
            **{k: round(float(np.mean(v)), 4) for k, v in scores.items()}}


COLUMNS = ["random", "entropy", "kmeans", "hybrid", "hybrid + reweight", "random + reweight",
           "hybrid + reweight (first round)", "passive pipeline"]


def table(results: list[dict]) -> str:
    """Accuracy on all rows per dataset and budget, a column per configuration (README layout); the controller on
    every row as the last column."""
    cells: dict[tuple, dict[str, float]] = {}
    ceiling: dict[str, float] = {}
    for r in results:
        if r["config"] == "controller on every row":
            ceiling[r["dataset"]] = r["accuracy"]
        else:
            cells.setdefault((r["dataset"], round(r["budget_share"], 4)), {})[r["config"]] = r["accuracy"]
    cols = [c for c in COLUMNS if any(c in v for v in cells.values())]
    lines = ["| dataset | budget | " + " | ".join(cols) + " | controller on every row |",
             "|---|---|" + "---|" * (len(cols) + 1)]
    for (dataset, share), row in sorted(cells.items()):
        lines.append(f"| {dataset} | {share:.0%} | " + " | ".join(f"{row[c]:.3f}" if c in row else "–" for c in cols)
                     + f" | {ceiling[dataset]:.3f} |" if dataset in ceiling else " | – |")
    return "\n".join(lines)


def main() -> None:
    import contextlib

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, datasets="yahoo_topics,banking77,movie_sentiment", rows=2000, out=Path("runs/bench_active"))
    ap.add_argument("--budgets", default="0.05,0.1,0.2", help="shares of the rows the LLM may be asked about")
    ap.add_argument("--strategies", default="random,entropy,kmeans,hybrid")
    ap.add_argument("--reweight", default="off,on",
                    help="off, on (against --gold-rows train rows), first-round (against the controller's answers "
                         "on the first round's rows, as a run without a gold file does)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--gold-rows", type=int, default=100, help="train-split rows as reweighting's reference")
    ap.add_argument("--passive", action="store_true", help="also the passive pipeline at each budget (slow)")
    ap.add_argument("--ceiling", action="store_true", help="also the controller on every row")
    ap.add_argument("--noise-check", action="store_true",
                    help="only reweighting on random rows with 15%% of labels wrong, at each budget (no controller)")
    args = ap.parse_args()
    out = Path(args.out)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    from labelwright.orchestrator.bootstrap import verbalise
    from labelwright.specialists.encoder import Encoder

    for dataset in [d for d in args.datasets.split(",") if d]:
        work = out / dataset
        sample, labels = write_sample(dataset, args.rows, work)
        df = pd.read_csv(sample)
        texts, gold = df["text"].astype(str).tolist(), df["label"].astype(str).tolist()
        X = _embed(texts, work / "embeddings.npy")
        train = pd.read_csv(DATASETS / dataset / "train.csv").head(args.gold_rows)
        ref = (_embed(train["text"].astype(str).tolist(), work / f"gold-{args.gold_rows}.npy"),
               np.array([labels.index(str(v)) for v in train["label"]]))
        label_emb = Encoder("minilm").encode([verbalise(lab, None) for lab in labels])
        if args.noise_check:
            for share in [float(b) for b in args.budgets.split(",")]:
                print(json.dumps(noise_check(dataset, X, gold, labels, ref, round(share * len(texts)), label_emb)), flush=True)
            continue
        with contextlib.ExitStack() as stack:
            if args.noisy_endpoint is not None:
                from tests.fake_openai import FakeOpenAI

                server = stack.enter_context(FakeOpenAI(noisy_responder(dataset, labels, args.noisy_endpoint),
                                                        model=f"noisy-{args.noisy_endpoint:g}"))
                args.base_url, args.model = server.base_url, server.model
            new = []
            if args.ceiling:
                new.append(controller_alone(dataset, texts, gold, labels, X, label_emb, args))
            for share in [float(b) for b in args.budgets.split(",")]:
                budget = max(1, round(share * len(texts)))
                for strategy in [x for x in args.strategies.split(",") if x]:
                    for rw in [x for x in args.reweight.split(",") if x]:
                        r = run_line(dataset, texts, gold, labels, X, ref, label_emb, strategy=strategy,
                                     reweight={"off": None, "on": "gold", "first-round": "first round"}[rw],
                                     budget=budget, args=args)
                        print(json.dumps(r), flush=True)
                        new.append(r)
                if args.passive:
                    new.append(passive(dataset, sample, labels, budget, args, work))
                    print(json.dumps(new[-1]), flush=True)
        keys = {(r["dataset"], r["config"], r["budget"]) for r in new}
        results = [r for r in results if (r["dataset"], r["config"], r["budget"]) not in keys] + new
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2, default=str))
    print(table(results))


if __name__ == "__main__":
    main()
