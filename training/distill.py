"""Distil candidate sets into a student: the distribution refinery of CanDist (ACL 2025), on Ray Train.

A student classifier (a ``transformer_classifier`` specialist) learns from rows whose label is a *set* of
candidates (the controller, when unsure, names the other plausible labels too) and from rows with one label
(a set of one). Its targets are refined from its own predictions after every epoch (:func:`refine_targets`):

- in the first epoch the target is uniform over the set;
- then the student's prediction renormalised over the set;
- a row whose predicted class is outside its set is left out of the next epoch, unless that prediction's
  probability exceeds ``tau`` (then the target is that class, one-hot: the set was wrong);
- among the rows predicted inside their set, per predicted class, the ``delta`` fraction with the smallest
  loss get a sharpened target ``q ** (1 / gamma)`` (renormalised).

The training loop is the specialist's own (``specialists/transformer_classifier.train_loop`` with a
candidate mask and this refinery); :func:`distil_student` runs it data-parallel on a ``TorchTrainer``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from labelwright.specialists.base import SpecialistConfig, clean_texts
from labelwright.specialists.errors import SpecialistError


class Refinery(BaseModel):
    """The refinery's constants (the paper's defaults: tau 0.95-1.0, delta 0.4-0.6, gamma 0.85)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tau: float = Field(0.95, gt=0.0, le=1.0)  # an out-of-set prediction above this is trusted over the set
    delta: float = Field(0.5, ge=0.0, le=1.0)  # share of each predicted class's smallest-loss rows sharpened
    gamma: float = Field(0.85, gt=0.0, le=1.0)  # sharpening exponent 1/gamma (1: none)


def refine_targets(probs: np.ndarray, mask: np.ndarray, refinery: Refinery) -> tuple[np.ndarray, np.ndarray]:
    """Targets for the next epoch from the student's predictions ``probs`` (rows x labels) and the candidate
    sets ``mask`` (rows x labels, bool): ``(targets, keep)``; rows with ``keep`` False are not trained on."""
    probs = np.asarray(probs, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    n = len(probs)
    pred = probs.argmax(1)
    inside = mask[np.arange(n), pred]
    in_set = probs * mask
    total = in_set.sum(1, keepdims=True)
    # A set the student gives no mass at all: uniform over it (numerically never, but never NaN).
    q = np.where(total > 0, in_set / np.where(total > 0, total, 1.0), mask / mask.sum(1, keepdims=True))
    targets = q.copy()
    rescued = ~inside & (probs[np.arange(n), pred] > refinery.tau)
    targets[rescued] = np.eye(probs.shape[1])[pred[rescued]]
    keep = inside | rescued

    if refinery.delta > 0 and refinery.gamma < 1:
        loss = -(q * np.log(np.clip(probs, 1e-12, None))).sum(1)
        for c in np.unique(pred[inside]):
            rows = np.flatnonzero(inside & (pred == c))
            take = int(np.floor(refinery.delta * len(rows)))
            if take == 0:
                continue
            small = rows[np.argsort(loss[rows], kind="stable")[:take]]
            sharp = q[small] ** (1.0 / refinery.gamma)
            targets[small] = sharp / sharp.sum(1, keepdims=True)
    return targets, keep


def candidate_mask(sets: Sequence[Sequence[str]], label_names: Sequence[str], *, name: str = "student") -> np.ndarray:
    """Rows x labels, True where the label is in the row's set; SpecialistError naming the row for an empty
    set or a label outside the task."""
    index = {label: j for j, label in enumerate(label_names)}
    mask = np.zeros((len(sets), len(label_names)), dtype=bool)
    for i, labels in enumerate(sets):
        if not len(labels):
            raise SpecialistError(f"specialist {name!r}: training row {i} has an empty candidate set; give at least one label")
        for label in labels:
            if label not in index:
                raise SpecialistError(
                    f"specialist {name!r}: training row {i} has candidate {label!r}, not a task label; use one of "
                    f"{list(label_names)}"
                )
            mask[i, index[label]] = True
    return mask


def _ray_train_func(loop_config: dict) -> None:
    """Per-worker entry point for ``TorchTrainer``: the specialist's loop with the refinery."""
    from functools import partial

    from labelwright.training.finetune import worker_loop

    refinery = Refinery(**loop_config["refinery"])
    worker_loop(loop_config, candidate_mask=np.asarray(loop_config["mask"], dtype=bool),
                refine=partial(refine_targets, refinery=refinery))


def distil_student(
    config: SpecialistConfig,
    texts: list[str],
    sets: Sequence[Sequence[str]],
    *,
    label_names: list[str],
    output_dir: str,
    storage_path: str,
    refinery: Refinery = Refinery(),
    num_workers: int = 1,
    use_gpu: bool = False,
    init_checkpoint: str | None = None,
    seed: int = 0,
) -> str:
    """Train the student ``config`` on ``texts`` and their candidate ``sets`` on Ray Train; return the path of
    its checkpoint (``output_dir``, written whole or not at all), which ``load_specialist`` opens."""
    from labelwright.training.finetune import run_trainer

    if config.kind != "transformer_classifier":
        raise SpecialistError(
            f"student {config.name!r} has kind {config.kind!r}; the student is distilled with a neural "
            "training loop: give a 'transformer_classifier' specialist"
        )
    if len(texts) != len(sets):
        raise SpecialistError(f"student {config.name!r}: {len(texts)} texts but {len(sets)} candidate sets; give one a text")
    if len(texts) == 0:
        raise SpecialistError(f"student {config.name!r}: no rows to distil from")
    mask = candidate_mask(sets, label_names, name=config.name)
    texts = clean_texts(texts, max_length=config.max_length, name=config.name)
    return run_trainer(
        _ray_train_func, config,
        {"label_names": list(label_names), "texts": texts, "y": mask.argmax(1).tolist(), "w": [1.0] * len(texts),
         "mask": mask.tolist(), "refinery": refinery.model_dump(), "seed": seed},
        output_dir=output_dir, storage_path=storage_path, num_workers=num_workers, use_gpu=use_gpu,
        init_checkpoint=init_checkpoint, what="distilling", prefix="distill",
    )
