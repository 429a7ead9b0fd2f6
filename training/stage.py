"""One training stage for every specialist of a task: fit, checkpoint, return the checkpoint dirs.

Linear specialists (TF-IDF, embeddings) refit in-process in seconds; transformer specialists are
fine-tuned on Ray Train (``training/finetune.py``); off-the-shelf classifiers with a label map need
no training and are checkpointed as they are. Checkpoints live at
``<run_dir>/checkpoints/<specialist>/stage-<k>`` so a resumed run reuses a finished stage.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from labelwright.specialists.base import SpecialistConfig
from labelwright.specialists.registry import build_specialist
from labelwright.training.finetune import fine_tune_transformer


def checkpoint_dir(run_dir: str | Path, name: str, stage: int) -> Path:
    return Path(run_dir) / "checkpoints" / name / f"stage-{stage}"


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
    log: Callable[[str], None] = print,
) -> dict[str, str]:
    """Train each specialist on (texts, labels), labels balanced; returns {name: checkpoint directory}."""
    out: dict[str, str] = {}
    weights = balanced_weights(labels)
    for config in configs:
        target = checkpoint_dir(run_dir, config.name, stage)
        if is_complete(target):
            log(f"  {config.name}: reusing checkpoint {target}")
            out[config.name] = str(target)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if config.kind == "transformer_classifier":
            log(f"  {config.name}: fine-tuning {config.model} on {len(texts)} rows with Ray Train "
                f"({train_workers} worker(s), {'GPU' if use_gpu else 'CPU'})")
            path = fine_tune_transformer(
                config, texts, labels, label_names=label_names, output_dir=str(target),
                num_workers=train_workers, use_gpu=use_gpu,
                storage_path=str(Path(run_dir).resolve() / "train"), sample_weight=weights,
            )
            out[config.name] = str(path)
            continue
        specialist = build_specialist(config, label_names)
        if specialist.trainable:
            log(f"  {config.name}: fitting {config.kind} on {len(texts)} rows")
            specialist.fit(texts, labels, sample_weight=weights)
        else:
            log(f"  {config.name}: {config.kind} {config.model} needs no training")
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-save
        specialist.save(tmp)
        tmp.rename(target)
        out[config.name] = str(target)
    return out
