"""Active annotation under a budget (LLMaAA): the controller labels the rows that teach the task model most.

Rounds of: fit the task model (a linear head over the rows' frozen MiniLM embeddings, optionally with
learning-to-reweight weights) on the rows bought so far -> score every row -> pick the next batch by an
acquisition strategy (``acquisition.acquire``) -> the controller labels it. Until the budget of LLM calls is
spent, the rounds run out, or the predictions stop changing (Cohen's kappa between consecutive rounds at or
above ``stop_kappa``); then the last model labels every row not bought, and any budget left buys its least
confident rows. Plain arrays and a callback that asks the controller, so the loop runs with or without Ray
(``job.annotate`` in ``--mode active`` embeds the rows on Ray Data and asks the real controller; the benchmark
drives it the same way).

The first round is the seed: before any label there is no model to be unsure with, so the uncertainty
strategies start with k-means there. The state is the list of answers bought, in order, with their round: a
killed run started again buys nothing twice (``ActiveState``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from labelwright.orchestrator.acquisition import acquire, uncertainty
from labelwright.specialists.linear_head import fit_linear_head, predict_linear_head

# ask(positions, probs) -> per row (label or None, LLM calls it took, the answer record); may answer fewer rows
# than asked (the budget ran out mid-batch): the rows it did not reach are not bought.
Ask = Callable[[np.ndarray, np.ndarray], list[tuple[str | None, int, dict]]]


@dataclass
class ActiveState:
    """What has been bought: positions (into the pool), labels (None: the controller failed), calls, round."""

    pos: list[int] = field(default_factory=list)
    label: list[str | None] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    round: list[int] = field(default_factory=list)
    answer: list[dict] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)  # one record per finished round
    last_pred: list[int] | None = None  # the task model's predictions at the last finished round (stopping rule)
    done: bool = False  # the loop ended (budget, rounds or the stopping rule); only the final top-up may follow
    batch: int | None = None  # rows a round buys, fixed at the first round (a resumed run keeps it)

    @property
    def spent(self) -> int:
        return int(sum(self.calls))

    def add(self, pos: Sequence[int], answers: list[tuple[str | None, int, dict]], rnd: int) -> None:
        for p, (label, calls, answer) in zip(pos, answers):
            self.pos.append(int(p))
            self.label.append(label)
            self.calls.append(int(calls))
            self.round.append(int(rnd))
            self.answer.append(answer)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "ActiveState":
        return cls(**json.loads(path.read_text())) if path.is_file() else cls()


@dataclass
class ActiveSettings:
    acquisition: str = "hybrid"
    rounds: int | None = 8  # the budget split evenly over this many rounds, the seed round first; or:
    batch_per_round: int | None = None
    stop_kappa: float | None = None  # stop buying for training once predictions agree this much round to round
    reweight: bool = False
    l2: float = 1e-3
    seed: int = 0


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float:
    from sklearn.metrics import cohen_kappa_score

    if len(a) == 0:
        return 1.0
    if np.array_equal(a, b):
        return 1.0
    return float(cohen_kappa_score(a, b))


def fit_task_model(X: np.ndarray, y: np.ndarray, n_classes: int, *, l2: float,
                   reference: tuple[np.ndarray, np.ndarray] | None = None,
                   reweight: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The head (W, b) fitted on embeddings ``X`` with label indices ``y``, and the rows' weights (all 1 unless
    ``reweight``: learning-to-reweight against ``reference`` (embeddings, label indices)). Labels are balanced
    (every label present weighs the same in total), as the specialists' are."""
    from labelwright.training.reweight import lookahead_weights
    from labelwright.training.stage import balanced_weights

    w = np.ones(len(y))
    if reweight and reference is not None and len(reference[1]):
        w = lookahead_weights(X, y, n_classes, ref_X=reference[0], ref_y=reference[1])
    fit_w = w * balanced_weights(y.astype(str))
    keep = fit_w > 0
    if keep.sum() == 0:  # nothing trustworthy left: fall back to every row unweighted
        keep, fit_w = np.ones(len(y), bool), np.ones(len(y))
    W, b = fit_linear_head(X[keep], y[keep], n_classes, sample_weight=fit_w[keep], l2=l2)
    return W, b, w


def batch_size_for(settings: ActiveSettings, budget_left: int) -> int:
    """Rows per round: ``batch_per_round``, else the budget over ``rounds``."""
    if settings.batch_per_round:
        return settings.batch_per_round
    return max(1, math.ceil(budget_left / max(1, settings.rounds or 1)))


def run_active(X: np.ndarray, labels: Sequence[str], *, ask: Ask, max_calls: int, settings: ActiveSettings,
               state: ActiveState, save: Callable[[ActiveState], None] = lambda s: None,
               reference: tuple[np.ndarray, np.ndarray] | Callable[[], tuple | None] | None = None,
               gold: Sequence[str | None] | None = None, check: tuple[np.ndarray, np.ndarray] | None = None,
               log: Callable[[str], None] = print) -> tuple[np.ndarray, dict[int, float]]:
    """Run (or go on with) the rounds over the pool ``X`` (n, d); returns the last task model's probabilities
    (n, labels) and the weight each bought row had in its fit (position -> weight; 1 without reweighting).
    ``state`` is empty or what a killed run saved; ``save`` is called after every round. ``reference``
    (embeddings, label indices): what reweighting (``settings.reweight``) measures the rows against, a pair or a
    function giving it at each fit (None: no weights yet). ``gold`` (optional, per row) only feeds the rounds'
    log lines and records; ``check`` (embeddings, label indices: gold rows outside the pool) is scored by every
    round's model (``check_accuracy``: the learning curve). Never asks about a row twice; ``ask`` decides how
    close to ``max_calls`` it goes."""
    labels = list(labels)
    index = {lab: i for i, lab in enumerate(labels)}
    n, K = len(X), len(labels)
    gold_idx = None if gold is None else np.array([index.get(g, -1) if g is not None else -1 for g in gold])
    if state.batch is None:
        state.batch = batch_size_for(settings, max_calls - state.spent)

    fitted: dict[int, tuple] = {}  # rows bought -> the fit on them: the stop's fit serves the top-up unchanged

    def model():
        if len(state.pos) in fitted:
            return fitted[len(state.pos)]
        bought = [(p, lab) for p, lab in zip(state.pos, state.label) if lab is not None]
        if not bought:
            return None, np.full((n, K), 1.0 / K), None
        pos = np.array([p for p, _ in bought])
        y = np.array([index[lab] for _, lab in bought])
        ref = reference() if callable(reference) else reference
        W, b, w = fit_task_model(X[pos], y, K, l2=settings.l2, reference=ref, reweight=settings.reweight)
        fitted.clear()
        fitted[len(state.pos)] = ((W, b), predict_linear_head(X, W, b), dict(zip(pos.tolist(), w.tolist())))
        return fitted[len(state.pos)]

    def checked(head) -> float | None:
        if check is None or head is None or not len(check[1]):
            return None
        return float(np.mean(predict_linear_head(check[0], *head).argmax(1) == check[1]))

    rnd = max(state.round, default=0)
    while not state.done:
        left = max_calls - state.spent
        asked = np.zeros(n, bool)
        asked[state.pos] = True
        pool = np.flatnonzero(~asked)
        head, probs, _ = model()
        pred = probs.argmax(1)
        kappa = None
        if state.last_pred is not None:
            keep = ~asked
            kappa = cohen_kappa(np.asarray(state.last_pred)[keep], pred[keep])
        why = ("budget spent" if left <= 0 else "every row asked" if len(pool) == 0
               else "rounds done" if settings.batch_per_round is None and settings.rounds is not None
               and rnd >= settings.rounds
               else "predictions stable" if settings.stop_kappa is not None and kappa is not None
               and kappa >= settings.stop_kappa else None)
        if why:
            state.done = True
            state.rounds.append({"round": rnd, "stopped": why, "kappa": kappa, "spent": state.spent,
                                 "check_accuracy": checked(head)})
            save(state)
            log(f"active: stop after round {rnd} ({why}); {state.spent}/{max_calls} LLM calls spent")
            break
        rnd += 1
        k = min(state.batch, left, len(pool))
        labelled = X[np.array(state.pos, dtype=np.int64)] if state.pos else None
        # Before any label there is no model to be unsure with: the first round of an uncertainty strategy is
        # k-means (the rows nearest k centroids: a diverse seed).
        strategy = settings.acquisition
        if labelled is None and strategy in ("entropy", "least_confidence", "margin", "hybrid"):
            strategy = "kmeans"
        pick = pool[acquire(strategy, k, probs=probs[pool], embeddings=X[pool], labelled=labelled,
                            seed=settings.seed + rnd)]
        answers = ask(pick, probs[pick])
        state.add(pick[:len(answers)], answers, rnd)
        record = {"round": rnd, "strategy": strategy, "asked": int(len(answers)),
                  "labelled": int(sum(a[0] is not None for a in answers)), "check_accuracy": checked(head),
                  "calls": int(sum(a[1] for a in answers)), "spent": state.spent, "kappa": kappa}
        if gold_idx is not None:
            unl = (~asked) & (gold_idx >= 0)
            record["model_accuracy_before"] = float(np.mean(pred[unl] == gold_idx[unl])) if unl.any() else None
            got = [(index.get(a[0], -2), gold_idx[p]) for p, a in zip(pick, answers) if gold_idx[p] >= 0]
            record["controller_accuracy"] = float(np.mean([a == g for a, g in got])) if got else None
        state.rounds.append(record)
        state.last_pred = pred.tolist()
        save(state)
        log(f"active: round {rnd}: {strategy} picked {len(pick)} rows, {record['labelled']} labelled; "
            f"{state.spent}/{max_calls} LLM calls spent"
            + (f"; kappa to the round before {kappa:.3f}" if kappa is not None else "")
            + (f"; model right on {record['model_accuracy_before']:.1%} of the unbought rows before it"
               if record.get("model_accuracy_before") is not None else ""))
        if len(answers) < len(pick):
            break  # the budget ran out mid-batch: the loop stops at the top

    # The budget left after the stop buys the final model's least confident rows.
    left = max_calls - state.spent
    _, probs, weights = model()
    asked = np.zeros(n, bool)
    asked[state.pos] = True
    pool = np.flatnonzero(~asked)
    if left > 0 and len(pool):
        k = min(left, len(pool))
        top = pool[np.argsort(-uncertainty(probs[pool], "least_confidence"), kind="stable")[:k]]
        top = np.sort(top)
        log(f"active: {left} LLM calls left after the rounds: asking about the final model's {k} least confident rows")
        answers = ask(top, probs[top])
        state.add(top[:len(answers)], answers, rnd + 1)
        state.rounds.append({"round": rnd + 1, "final_top_up": True, "asked": len(answers), "spent": state.spent})
        save(state)
        # these answers are labels in their own right; the model is not refitted for the other rows
    return probs, weights or {}


def shortlist(probs: np.ndarray | None, similarity: np.ndarray | None, labels: Sequence[str], k: int) -> list[list[str]]:
    """The ``k`` labels offered per row when there are more: the task model's top half (``probs``), then the labels
    whose embedded verbalisation is nearest the row (``similarity``) until there are ``k``; either alone when the
    other is None (``voting.merged_shortlist``). Measured on banking77 (77 intents, k = 12; ``python
    benchmarks/active.py --noise-check --datasets banking77 --budgets 0.025,0.05,0.1,0.2``: 50 / 100 / 200 / 400
    random rows of 2,000 bought, 15% of their labels wrong): label similarity holds the true label for 92% of the
    other rows; the model's top 12 for 42 / 67 / 85 / 95%; the two halves together for 92 / 95 / 96 / 97%."""
    from labelwright.orchestrator.voting import merged_shortlist, top_candidates

    labels = list(labels)
    model = top_candidates(probs, k) if probs is not None else None
    near = top_candidates(similarity, k) if similarity is not None else None
    return [[labels[j] for j in row] for row in merged_shortlist(model, near, k)]


def controller_ask(controller, texts: Sequence[str], X: np.ndarray, state: ActiveState, labels: Sequence[str], *,
                   max_calls: int, bank: tuple[list[str], list[str], np.ndarray] | None = None,
                   label_emb: np.ndarray | None = None) -> Ask:
    """The ``ask`` of :func:`run_active` for a :class:`Controller`: each row shown its nearest bought rows (and
    ``bank``: gold rows with their labels) as demonstrations, and, with more labels than
    ``controller.max_choices``, offered a shortlist (:func:`shortlist`). Rows are asked ``concurrency`` at a time
    and no new request starts once ``max_calls`` are spent (in flight at that moment: at most ``concurrency``)."""
    from labelwright.orchestrator.acquisition import nearest

    cfg = controller.config
    labels = list(labels)

    def ask(pos: np.ndarray, probs: np.ndarray) -> list[tuple[str | None, int, dict]]:
        bought = [(p, lab) for p, lab in zip(state.pos, state.label) if lab is not None]
        demo_texts = [texts[p] for p, _ in bought] + (list(bank[0]) if bank else [])
        demo_labels = [lab for _, lab in bought] + (list(bank[1]) if bank else [])
        demo_emb = np.concatenate([X[np.array([p for p, _ in bought], dtype=np.int64)],
                                   bank[2] if bank else np.zeros((0, X.shape[1]), X.dtype)])
        out: list[tuple[str | None, int, dict]] = []
        step = cfg.concurrency
        for start in range(0, len(pos), step):
            if state.spent + sum(c for _, c, _ in out) >= max_calls:
                break
            part = pos[start:start + step]
            part_texts = [texts[p] for p in part]
            idx = nearest(X[part], demo_emb, cfg.num_demonstrations, query_texts=part_texts, bank_texts=demo_texts)
            demos = [[(demo_texts[j], demo_labels[j]) for j in row[::-1]] for row in idx]
            choices = None
            if len(labels) > cfg.max_choices:
                choices = shortlist(probs[start:start + step] if bought else None,
                                    X[part] @ label_emb.T if label_emb is not None else None, labels, cfg.max_choices)
            answers = controller.label_many(part_texts, demonstrations=demos, choices=choices)
            # A row asked costs at least one call, its answer cached or not: a run buys the same rows whatever
            # the controller's cache holds.
            out += [(a.label, max(1, a.calls), a.model_dump()) for a in answers]
        return out

    return ask


# ---------------------------------------------------------------------------------------------- the job

class _EmbedStage:
    """Ray Data: the MiniLM embedding of every votable row (float32 bytes; rows that cannot be voted get none)."""

    def __init__(self, model: str):
        from labelwright.specialists.encoder import Encoder

        self.encoder = Encoder(model)

    def __call__(self, batch):
        ok = batch["skip_reason"].isna().to_numpy()
        out = [None] * len(batch)
        if ok.any():
            X = self.encoder.encode(batch["text"][ok].astype(str).tolist())
            for j, i in enumerate(np.flatnonzero(ok)):
                out[i] = X[j].astype(np.float32).tobytes()
        return batch[["row"]].assign(embedding=out)


def embed_rows(staged, *, run_dir: Path, actors: int, log: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, embeddings) of every votable input row, embedded on Ray Data once and kept in ``run_dir/active``."""
    import ray
    from ray.data import ActorPoolStrategy

    from labelwright.orchestrator.stages import DEMONSTRATION_ENCODER

    where = Path(run_dir) / "active"
    rows_path, emb_path = where / "rows.npy", where / "embeddings.npy"
    if rows_path.is_file() and emb_path.is_file():
        log(f"active: reusing the embeddings of {len(np.load(rows_path))} rows from {where}")
        return np.load(rows_path), np.load(emb_path)
    actors = max(1, min(actors, len(staged.shards)))  # a shard is a block: more actors than shards idle
    log(f"active: embedding {staged.n_rows} rows on Ray Data ({actors} actor(s))")
    ds = ray.data.read_parquet([str(s.path) for s in staged.shards], override_num_blocks=len(staged.shards))
    ds = ds.select_columns(["row", "text", "skip_reason"])
    ds = ds.map_batches(_EmbedStage, fn_constructor_args=(DEMONSTRATION_ENCODER,), batch_format="pandas",
                        batch_size=256, num_cpus=1, compute=ActorPoolStrategy(size=actors))
    rows, embs = [], []
    for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
        keep = batch["embedding"].notna().to_numpy()
        rows += batch["row"][keep].astype(int).tolist()
        embs += [np.frombuffer(e, dtype=np.float32) for e in batch["embedding"][keep]]
    order = np.argsort(rows, kind="stable")
    rows_arr = np.asarray(rows, np.int64)[order]
    X = np.stack([embs[i] for i in order]) if embs else np.zeros((0, 384), np.float32)
    where.mkdir(parents=True, exist_ok=True)
    np.save(emb_path.with_suffix(".tmp.npy"), X)
    np.save(rows_path.with_suffix(".tmp.npy"), rows_arr)
    os.replace(emb_path.with_suffix(".tmp.npy"), emb_path)
    os.replace(rows_path.with_suffix(".tmp.npy"), rows_path)
    return rows_arr, X


def annotate_active(staged, *, spec, controller, run_dir: Path, output: Path, output_format: str | None,
                    report_path, gold_file_rows, timings: dict, t0: float, log: Callable[[str], None]) -> dict:
    """``labelwright annotate --mode active``: the rounds of :func:`run_active` on every input row, then the output
    (every row once: the controller's label where it was bought, the last task model's elsewhere) and the report."""
    import time

    import pandas as pd

    from labelwright.orchestrator.bootstrap import verbalise
    from labelwright.orchestrator.dataset_io import write_frame
    from labelwright.orchestrator.report import accuracy, build_report, publish_report
    from labelwright.specialists.encoder import Encoder

    cfg = spec.active
    budget = spec.budget.max_llm_calls
    labels = spec.label_names
    t = time.monotonic()
    rows, X = embed_rows(staged, run_dir=run_dir, actors=spec.runtime.vote_actors, log=log)
    timings["embed"] = time.monotonic() - t
    frame = pd.concat([pd.read_parquet(s.path) for s in staged.shards], ignore_index=True).sort_values("row")
    frame = frame.reset_index(drop=True)
    by_row = frame.set_index("row")
    texts = by_row.loc[rows, "text"].astype(str).tolist()
    encoder = Encoder("minilm")
    bank = None
    reference = None
    if gold_file_rows is not None and len(gold_file_rows):
        g_texts, g_labels = gold_file_rows["text"].astype(str).tolist(), gold_file_rows["label"].astype(str).tolist()
        g_emb = encoder.encode(g_texts)
        bank = (g_texts, g_labels, g_emb) if spec.controller.gold_demonstrations else None
        # The gold file's rows: reweighting's reference (with --reweight) and every round's check (the learning curve)
        reference = (g_emb, np.array([labels.index(lab) for lab in g_labels]))
    label_emb = encoder.encode([verbalise(lab, spec.descriptions.get(lab)) for lab in labels])
    state_path = Path(run_dir) / "active" / "state.json"
    state = ActiveState.load(state_path)
    if state.pos:
        log(f"active: resuming after round {max(state.round)} ({state.spent} LLM calls already spent, "
            f"{len(state.pos)} rows bought)")
    settings = ActiveSettings(acquisition=cfg.acquisition, rounds=cfg.rounds, batch_per_round=cfg.batch_per_round,
                              stop_kappa=cfg.stop_kappa, reweight=cfg.reweight)
    ask = controller_ask(controller, texts, X, state, labels, max_calls=budget, bank=bank, label_emb=label_emb)

    t = time.monotonic()
    log(f"active: {cfg.acquisition} acquisition, budget {budget} LLM calls, "
        + (f"{cfg.batch_per_round} rows a round" if cfg.batch_per_round else f"{cfg.rounds} rounds")
        + (", learning to reweight" if cfg.reweight else ""))
    gold = by_row.loc[rows, "gold"].tolist() if "gold" in by_row.columns else None

    probs, weights = run_active(X, labels, ask=ask, max_calls=budget, settings=settings, state=state,
                                save=lambda s: s.save(state_path), reference=reference if cfg.reweight else None,
                                gold=gold, check=reference, log=log)
    timings["label"] = time.monotonic() - t

    # The output: every input row once.
    pos_of = {int(r): i for i, r in enumerate(rows)}
    bought = {p: (lab, c, a, r) for p, lab, c, a, r in zip(state.pos, state.label, state.calls, state.answer,
                                                              state.round)}
    out = frame.copy()
    n = len(out)
    cols = {c: [None] * n for c in ("label", "decided_by", "reason", "confidence", "model_label",
                                      "model_confidence", "controller_label", "controller_answer",
                                      "controller_confidence", "round", "weight")}
    cols.update(prompt_tokens=[0] * n, completion_tokens=[0] * n, llm_calls=[0] * n, cached=[False] * n,
                retryable=[False] * n)
    for i, (row, skip) in enumerate(zip(out["row"], out["skip_reason"])):
        p = pos_of.get(int(row))
        if p is None:
            cols["decided_by"][i], cols["reason"][i] = "unresolved", skip
            continue
        cols["model_label"][i] = labels[int(probs[p].argmax())]
        cols["model_confidence"][i] = float(probs[p].max())
        if p in bought:
            lab, calls, a, rnd = bought[p]
            cols["round"][i], cols["weight"][i] = rnd, weights.get(p)
            cols["controller_label"][i], cols["controller_answer"][i] = lab, a.get("raw")
            cols["controller_confidence"][i] = a.get("confidence")
            cols["llm_calls"][i] = int(a.get("calls") or 0)  # what was paid for (0 on a cache hit)
            cols["prompt_tokens"][i] = int(a.get("prompt_tokens") or 0)
            cols["completion_tokens"][i] = int(a.get("completion_tokens") or 0)
            cols["cached"][i] = bool(a.get("cached"))
            if lab is not None:
                cols["label"][i], cols["decided_by"][i], cols["confidence"][i] = lab, "controller", a.get("confidence")
                continue
            cols["reason"][i], cols["retryable"][i] = a.get("reason"), bool(a.get("retryable"))
        cols["label"][i], cols["decided_by"][i] = cols["model_label"][i], "model"
        cols["confidence"][i] = cols["model_confidence"][i]
    for c, v in cols.items():
        out[c] = v
    out = out.drop(columns=[c for c in ("skip_reason", "shard") if c in out.columns])
    front = ["row", "id", "text", "label", "decided_by", "reason", "confidence", "model_label", "model_confidence",
             "round", "weight", "controller_label", "controller_answer", "controller_confidence", "prompt_tokens",
             "completion_tokens", "llm_calls", "cached", "retryable"]
    out = out[[c for c in front if c in out.columns] + [c for c in out.columns if c not in front]]
    if len(out) != staged.n_rows or out["row"].duplicated().any():
        from labelwright.specialists.errors import InputDataError

        raise InputDataError(f"internal check failed: {len(out)} output rows for {staged.n_rows} input rows")
    from labelwright.orchestrator.review import apply_reviews

    out, reviews = apply_reviews(out, run_dir, log=log)
    write_frame(out, output, output_format)
    wall = time.monotonic() - t0
    w = [v for v in weights.values()] if cfg.reweight else []
    report = build_report(
        out, labels=labels, specialists=[], rows_in=staged.n_rows, wall_s=wall, label_s=timings["label"],
        price_prompt_per_1k=controller.config.price_prompt_per_1k,
        price_completion_per_1k=controller.config.price_completion_per_1k, timings=timings,
        human_cost_per_row=spec.budget.human_cost_per_row,
        extra={"mode": "active", "controller": {"model": controller.config.model, "base_url": controller.config.base_url},
               "active": {"acquisition": cfg.acquisition, "budget": budget, "spent": state.spent,
                          "rows_bought": len(state.pos), "rounds": state.rounds,
                          "reweight": ({"reference": "gold file", "reference_rows": len(reference[1]), "rows": len(w),
                                        "zero_weight": int(sum(1 for v in w if v == 0)),
                                        "min": min(w), "max": max(w)} if w else None)},
               "output": str(output), "run_dir": str(run_dir), **({"reviews": reviews} if reviews else {})})
    from labelwright.orchestrator.report import plot_rounds

    base = Path(report_path) if report_path else output
    report["active"]["plot"] = str(plot_rounds(state.rounds, base.with_name(base.stem + ".rounds.png")))
    if "gold" in out.columns and out["gold"].notna().any():
        g = out[out["gold"].notna() & (out["decided_by"] == "model")]
        report["active"]["model_accuracy_on_its_rows"] = accuracy(g["label"], g["gold"]) if len(g) else None
    return publish_report(report, report_path=report_path, output=output, log=log, frame=out)
