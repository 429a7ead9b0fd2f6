"""Training stages for every specialist of a task: fit, checkpoint, check, and roll back.

Stage 0 trains on the seed set (:func:`train_stage`). Each later stage (:func:`run_stage`) learns
from the hard rows the controller settled since the last stage (``training/buffer.py``):
transformer specialists continue from their deployed checkpoint on Ray Train, on the new rows mixed
with a replay sample of earlier rows and the seed set (``replay_ratio`` replayed rows per new row;
0 is the AutoAnnotator reference, which trains on the newest hard rows only); linear specialists
refit on everything in seconds; off-the-shelf classifiers keep their checkpoint. Each new checkpoint
is checked on a held-out slice (gold rows, or controller rows kept out of training) against the one
it would replace, and a specialist that got worse is rolled back. Checkpoints live at
``<run_dir>/checkpoints/<specialist>/stage-<k>``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from labelwright.specialists.base import SpecialistConfig, text_keys
from labelwright.specialists.registry import build_specialist, specialist_class
from labelwright.training.finetune import fine_tune_transformer, restarts_by_specialist, training_restarts


def checkpoint_dir(run_dir: str | Path, name: str, stage: int, tag: str = "") -> Path:
    return Path(run_dir) / "checkpoints" / name / (f"stage-{stage}" + (f"-{tag}" if tag else ""))


CROSS_FIT_FOLDS = 5


def folds_of(texts: Sequence[str], folds: int = CROSS_FIT_FOLDS) -> np.ndarray:
    """Each text's fold, from its key: a row keeps its fold from one stage to the next, in any order."""
    return np.array([int(k[:8], 16) % folds for k in text_keys(texts)], dtype=np.int64)


def checkpoint_probs(path: str | Path, texts: Sequence[str]) -> np.ndarray:
    """The checkpoint's probabilities on ``texts`` (float64, (n, labels)), as its Serve replica gives them: a
    text it was cross-fitted on gets those of the fold model that never saw it (``Specialist.predict``)."""
    from labelwright.specialists.registry import load_specialist

    return np.asarray(load_specialist(path).predict(texts), dtype=np.float64)


def is_complete(path: Path) -> bool:
    return (path / "specialist.json").is_file()


def balanced_weights(labels: Sequence[str]) -> np.ndarray:
    """Per-row weights that give every label present the same total weight (mean weight 1).

    Seed sets labelled by an LLM are small and often lopsided (a zero-shot model leans to one
    label); unweighted, small specialists then collapse onto the majority label and agree with
    each other on it, which the voting rule reads as consensus.
    """
    labels = np.asarray(labels, dtype=object)
    values, counts = np.unique(labels, return_counts=True)
    per_label = dict(zip(values, len(labels) / (len(values) * counts)))
    return np.array([per_label[v] for v in labels], dtype=np.float32)


def train_stage(
    configs: Sequence[SpecialistConfig],
    texts: list[str],
    labels: list[str],
    *,
    label_names: list[str],
    run_dir: str | Path,
    stage: int = 0,
    train_workers: int = 1,
    use_gpu: bool = False,
    init_checkpoints: dict[str, str] | None = None,
    transformer_data: tuple[list[str], list[str]] | None = None,
    crossfit: tuple[list[str], list[str]] | None = None,
    tag: str = "",
    train_seconds: dict[str, float] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, str]:
    """Train each specialist on (texts, labels), labels balanced; returns {name: checkpoint directory}.

    Later stages pass ``init_checkpoints`` (the specialists now deployed): transformer kinds then
    continue from them on ``transformer_data`` (new rows plus replay) instead of (texts, labels), and
    kinds that need no training keep their checkpoint. Linear kinds always refit on (texts, labels).
    ``crossfit`` (texts, labels): rows that the cross-fittable kinds also train on, keeping each row's
    probabilities from a fold model that never saw it in the checkpoint (``Specialist.predict`` answers them
    for those texts); the other kinds never train on them. ``tag`` names the checkpoints apart (``stage-<k>-<tag>``).
    ``train_seconds`` receives each specialist's training wall time.
    """
    out: dict[str, str] = {}
    for config in configs:
        target = checkpoint_dir(run_dir, config.name, stage, tag)
        if is_complete(target):
            log(f"  {config.name}: reusing checkpoint {target}")
            out[config.name] = str(target)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        init = (init_checkpoints or {}).get(config.name)
        t = time.monotonic()
        if config.kind == "transformer_classifier":
            x, y = transformer_data if (init and transformer_data) else (texts, labels)
            log(f"  {config.name}: fine-tuning {config.model} on {len(x)} rows with Ray Train "
                f"({train_workers} worker(s), {'GPU' if use_gpu else 'CPU'})"
                + (f", from {Path(init).name}" if init else ""))
            path = fine_tune_transformer(
                config, x, y, label_names=label_names, output_dir=str(target),
                num_workers=train_workers, use_gpu=use_gpu, init_checkpoint=init, seed=stage,
                storage_path=str(Path(run_dir).resolve() / "train"), sample_weight=balanced_weights(y),
            )
            out[config.name] = str(path)
            if train_seconds is not None:
                train_seconds[config.name] = time.monotonic() - t
            if restarts := training_restarts(path):
                log(f"  {config.name}: Ray Train lost a worker and started the worker group again "
                    f"{restarts} time(s); trained to the end")
            continue
        specialist = build_specialist(config, label_names)
        if not specialist.trainable and init:
            out[config.name] = init  # nothing to learn: the deployed checkpoint stays
            continue
        if specialist.trainable and crossfit and crossfit[0] and specialist.cross_fittable:
            held = set(crossfit[0])  # a text also among the other rows would let its fold model see it
            keep = [i for i, x in enumerate(texts) if x not in held]
            x = [texts[i] for i in keep] + list(crossfit[0])
            y = [labels[i] for i in keep] + list(crossfit[1])
            folds = np.concatenate([np.full(len(keep), -1), folds_of(crossfit[0])])
            specialist.cross_fit(x, y, folds=folds, sample_weight=balanced_weights(y))  # keeps them out of fold
            log(f"  {config.name}: fitted {config.kind} on {len(x)} rows, {len(crossfit[0])} of them cross-fitted "
                f"in {CROSS_FIT_FOLDS} folds; the other {len(keep)} weigh {specialist.other_row_weight:g} each "
                "(the weight whose out-of-fold predictions fit the cross-fitted rows best)")
        elif specialist.trainable:
            log(f"  {config.name}: fitting {config.kind} on {len(texts)} rows")
            specialist.fit(texts, labels, sample_weight=balanced_weights(labels))
        else:
            log(f"  {config.name}: {config.kind} {config.model} needs no training")
        if train_seconds is not None:
            train_seconds[config.name] = time.monotonic() - t
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-save
        specialist.save(tmp)
        tmp.rename(target)
        out[config.name] = str(target)
    return out


def cross_fittable(configs: Sequence[SpecialistConfig]) -> list[SpecialistConfig]:
    """The specialists that ``train_stage`` can cross-fit on held-out rows (their fit takes seconds)."""
    return [c for c in configs if specialist_class(c.kind).cross_fittable]


@dataclass
class CheckSet:
    """Held-out rows that judge a stage, never trained on: gold rows, a random audit sample the controller
    labelled, or controller rows held out of training."""

    texts: list[str]
    labels: list[str]
    source: str  # "gold", "audit" (labels are the controller's answers on random rows) or "controller"
    # The controller's answer on each row where it was asked up front (None: not asked; "": unresolved):
    # what the job routes by (reference rows). For an audit the labels themselves are these answers.
    controller: list[str | None] | None = None
    rows: list[int] | None = None  # their input row numbers, where they come from the input
    controller_confidence: list[float | None] | None = None  # its answers' probabilities (logprobs)

    def __len__(self) -> int:
        return len(self.texts)


Judge = Callable[..., dict]  # (probs, labels, label names, specialist names, check=CheckSet) -> fields


def evaluate(checkpoints: dict[str, str], check: CheckSet, *, label_names: list[str], judge: Judge | None = None,
             probs_cache: dict[str, np.ndarray] | None = None) -> dict:
    """Each specialist's accuracy on the check rows, and what ``judge`` makes of them together.

    ``judge(probs, gold, names, specialists, check=check)`` gets the stacked probabilities (specialists x rows x
    labels), the check rows' labels, the label names, the specialists' names and the check set (for the
    controller's answers on it), and returns the fields it adds (the job's judge applies the voting
    rule: ``hard_share``, ``consensus_accuracy``, a calibrated ``gate``); without one those stay None.
    ``probs_cache`` (checkpoint path -> probabilities on these rows) lets several evaluations of one stage
    load and run each checkpoint once."""
    out: dict = {"rows": len(check), "source": check.source, "specialists": {}, "hard_share": None,
                 "consensus_accuracy": None}
    if not len(check):
        return out
    gold = np.array(check.labels, dtype=object)
    names = np.array(label_names, dtype=object)
    probs = []
    cache = {} if probs_cache is None else probs_cache
    for name, path in checkpoints.items():
        if path not in cache:
            cache[path] = checkpoint_probs(path, check.texts)
        p = cache[path]
        probs.append(p)
        out["specialists"][name] = float(np.mean(names[p.argmax(1)] == gold))
    if judge is not None and probs:
        out.update(judge(np.stack(probs), gold, names, list(checkpoints), check=check))
    return out


def replay_sample(pool_texts: list[str], pool_labels: list[str], n: int, *, seed: int) -> tuple[list[str], list[str]]:
    """``n`` rows drawn without replacement from the earlier rows (all of them when there are fewer)."""
    if n <= 0 or not pool_texts:
        return [], []
    idx = np.random.default_rng(seed).permutation(len(pool_texts))[:n]
    return [pool_texts[i] for i in idx], [pool_labels[i] for i in idx]


def run_stage(
    configs: Sequence[SpecialistConfig],
    *,
    stage: int,
    deployed: dict[str, str],
    seed_texts: list[str],
    seed_labels: list[str],
    buffer: pd.DataFrame,
    since_seq: int,
    upto_seq: int | None = None,
    replay_ratio: float,
    check: CheckSet,
    label_names: list[str],
    run_dir: str | Path,
    judge: Judge | None = None,
    tolerance: float = 0.01,
    min_check_rows: int = 20,
    train_workers: int = 1,
    use_gpu: bool = False,
    crossfit: tuple[list[str], list[str]] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train stage ``stage`` from the buffer rows that arrived after ``since_seq`` (up to ``upto_seq``
    if given); return its record. ``crossfit``: rows the cross-fittable kinds also learn from (``train_stage``).

    ``buffer`` holds only rows that may be trained on (no held-out rows). The record's
    ``checkpoints`` are what to deploy: the new checkpoint of each specialist that did not get
    worse on ``check``, the deployed one for the others (listed in ``rolled_back``).
    """
    if upto_seq is not None:
        buffer = buffer[buffer["seq"] <= upto_seq]
    new = buffer[buffer["seq"] > since_seq]
    old = buffer[buffer["seq"] <= since_seq]
    all_texts = seed_texts + buffer["text"].tolist()
    all_labels = seed_labels + buffer["label"].tolist()
    n_replay = int(round(replay_ratio * len(new)))
    rep_x, rep_y = replay_sample(seed_texts + old["text"].tolist(), seed_labels + old["label"].tolist(),
                                 n_replay, seed=stage)
    transformer_data = (new["text"].tolist() + rep_x, new["label"].tolist() + rep_y)
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    candidates = train_stage(
        configs, all_texts, all_labels, label_names=label_names, run_dir=run_dir, stage=stage,
        train_workers=train_workers, use_gpu=use_gpu, init_checkpoints=deployed,
        transformer_data=transformer_data, crossfit=crossfit, train_seconds=seconds, log=log,
    )
    train_s = time.monotonic() - t0
    probs: dict[str, np.ndarray] = {}  # each checkpoint is loaded and run on the check rows once
    same = dict(label_names=label_names, judge=judge, probs_cache=probs)
    before = evaluate(deployed, check, **same)
    after = evaluate(candidates, check, **same)
    accepted, rolled_back = dict(candidates), []
    checked = len(check) >= min_check_rows
    if checked:
        for name in candidates:
            if candidates[name] == deployed.get(name):
                continue
            if after["specialists"][name] < before["specialists"][name] - tolerance:
                accepted[name] = deployed[name]
                rolled_back.append(name)
                log(f"  {name}: rolled back (accuracy on {len(check)} held-out {check.source} rows "
                    f"{before['specialists'][name]:.3f} -> {after['specialists'][name]:.3f})")
    final = after if not rolled_back else evaluate(accepted, check, **same)
    return {
        "stage": stage,
        "new_rows": int(len(new)),
        "replay_rows": len(rep_x),
        "transformer_rows": len(transformer_data[0]),
        "linear_rows": len(all_texts),
        "upto_seq": upto_seq if upto_seq is not None else (int(buffer["seq"].max()) if len(buffer) else since_seq),
        "train_s": round(train_s, 2),
        "train_s_by_specialist": {k: round(v, 2) for k, v in seconds.items()},
        # how often Ray Train started a specialist's workers again after losing one, where it did
        "train_restarts": restarts_by_specialist(candidates),
        "candidates": candidates,
        "checkpoints": accepted,
        "rolled_back": rolled_back,
        "checked": checked,
        "check_before": before,
        "check_after": after,
        "check": final,
    }
