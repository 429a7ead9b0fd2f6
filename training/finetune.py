"""Fine-tune a ``transformer_classifier`` specialist on Ray Train.

The per-worker loop is the specialist's own (``specialists/transformer_classifier.train_loop``: AdamW,
warm-up then linear decay, gradient clipping, optional per-row weights; no Ray). ``fine_tune_transformer``
runs it data-parallel on a Ray Train ``TorchTrainer`` (each worker trains on its own shard, gradients averaged by DDP through
``ray.train.torch.prepare_model``), reports the loss each epoch and has rank 0 save a checkpoint
that ``load_specialist`` opens.

A worker lost mid-training (its process killed, its node gone) costs the training, not the stage: Ray Train
starts the worker group again, up to ``WORKER_GROUP_RESTARTS`` times, and the loop runs again from its initial
checkpoint (it reports one only at the end). How many times it started is kept beside the checkpoint
(``training_restarts``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from labelwright.specialists.errors import SpecialistError
from labelwright.specialists.base import SpecialistConfig, clean_texts, encode_training_labels
from labelwright.specialists.transformer_classifier import TransformerClassifierSpecialist, train_loop

# How often Ray Train may start a training's worker group again after losing a worker (FailureConfig.max_failures).
WORKER_GROUP_RESTARTS = 2
TRAINING_FILE = "training.json"  # beside a checkpoint's files: how its training went (worker group restarts)


def training_restarts(checkpoint: str | Path) -> int:
    """How many times Ray Train started the worker group again while training ``checkpoint`` (0 if unknown)."""
    path = Path(checkpoint) / TRAINING_FILE
    return int(json.loads(path.read_text()).get("restarts", 0)) if path.is_file() else 0


def restarts_by_specialist(checkpoints: dict[str, str]) -> dict[str, int]:
    """``training_restarts`` of each checkpoint ({specialist: directory}), where there were any."""
    return {name: n for name, path in checkpoints.items() if (n := training_restarts(path))}


def _ray_train_func(loop_config: dict) -> None:
    """Per-worker entry point for ``TorchTrainer``."""
    worker_loop(loop_config)


def worker_loop(loop_config: dict, **loop_kwargs) -> None:
    """One Ray Train worker: build the specialist, run its ``train_loop`` on this rank's share (with
    ``loop_kwargs``, say a candidate mask), report each epoch's loss, and have rank 0 save the checkpoint."""
    import ray.train
    import ray.train.torch

    config = SpecialistConfig(**loop_config["config"])
    torch.set_num_threads(config.torch_threads)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    if rank == 0 and loop_config.get("starts_dir"):  # a mark per start of the worker group (restarts counted),
        Path(loop_config["starts_dir"]).mkdir(parents=True, exist_ok=True)  # holding the process id
        (Path(loop_config["starts_dir"]) / uuid.uuid4().hex).write_text(str(os.getpid()))
    spec = _initial_specialist(config, loop_config["label_names"], loop_config["init_checkpoint"], loop_config["seed"])
    epochs = spec.epochs

    def on_epoch(epoch: int, loss: float) -> None:
        metrics = {"epoch": epoch + 1, "loss": loss}
        if epoch + 1 < epochs:
            ray.train.report(metrics)
            return
        # Last epoch: rank 0 writes the checkpoint; every rank still calls report (it is a barrier).
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                spec.mark_trained()
                spec.save(tmp)
                metrics["version"] = spec.version
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)

    train_loop(
        spec, loop_config["texts"], np.asarray(loop_config["y"]), np.asarray(loop_config["w"]),
        epochs=epochs, seed=loop_config["seed"], rank=rank, world_size=world_size,
        wrap_model=_prepare_ddp, on_epoch=on_epoch, **loop_kwargs,
    )


def _prepare_ddp(module: torch.nn.Module) -> torch.nn.Module:
    """Ray Train's DDP wrapping. Encoders loaded with ``AutoModel`` keep parts the classifier never
    uses (BERT's pooler under mean pooling); DDP must be told, or a second worker fails at the
    second step with "parameters that did not receive grad"."""
    import ray.train.torch

    return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"find_unused_parameters": True})


def _initial_specialist(config: SpecialistConfig, label_names: list[str], init_checkpoint: str | None,
                        seed: int) -> TransformerClassifierSpecialist:
    if init_checkpoint:
        return TransformerClassifierSpecialist.load(init_checkpoint, labels=label_names, config=config, device="cpu")
    return TransformerClassifierSpecialist(config, label_names, seed=seed, device="cpu")


def fine_tune_transformer(
    config: SpecialistConfig,
    texts: list[str],
    labels: list[str],
    *,
    label_names: list[str],
    output_dir: str,
    num_workers: int = 1,
    use_gpu: bool = False,
    storage_path: str,
    init_checkpoint: str | None = None,
    seed: int = 0,
    sample_weight: Sequence[float] | None = None,
) -> str:
    """Fine-tune on Ray Train; copy the final checkpoint to ``output_dir`` and return that path.

    ``init_checkpoint`` continues from an earlier checkpoint (staged fine-tuning); head rows are
    matched by label name, so a task that gained a label keeps what was learnt for the others.
    """
    if config.kind != "transformer_classifier":
        raise SpecialistError(
            f"specialist {config.name!r} has kind {config.kind!r}; fine_tune_transformer trains only "
            "'transformer_classifier' (call fit() for the linear kinds)"
        )
    # Validation runs once here, on the driver, with the same rules as Specialist.fit.
    y, w = encode_training_labels(texts, labels, sample_weight, task_labels=label_names, name=config.name)
    texts = clean_texts(texts, max_length=config.max_length, name=config.name)

    return run_trainer(
        _ray_train_func, config,
        {"label_names": list(label_names), "texts": texts, "y": y.tolist(), "w": w.tolist(), "seed": seed},
        output_dir=output_dir, storage_path=storage_path, num_workers=num_workers, use_gpu=use_gpu,
        init_checkpoint=init_checkpoint, what="fine-tuning", prefix="finetune",
    )


def run_trainer(train_func, config: SpecialistConfig, loop_config: dict, *, output_dir: str, storage_path: str,
                num_workers: int, use_gpu: bool, init_checkpoint: str | None, what: str, prefix: str) -> str:
    """Run ``train_func`` on a ``TorchTrainer`` of ``num_workers`` and copy its final checkpoint to
    ``output_dir`` (whole, then renamed: a kill never leaves half a checkpoint); return that path."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    if num_workers < 1:
        raise SpecialistError(f"num_workers is {num_workers}; give at least 1")
    name = f"{prefix}-{config.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    starts = Path(storage_path).resolve() / f"{name}.starts"
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            **loop_config, "config": config.model_dump(mode="json"), "starts_dir": str(starts),
            "init_checkpoint": str(Path(init_checkpoint).resolve()) if init_checkpoint else None,
        },
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config.num_cpus}),
        run_config=RunConfig(storage_path=str(Path(storage_path).resolve()), name=name,
                             failure_config=FailureConfig(max_failures=WORKER_GROUP_RESTARTS)),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        raise SpecialistError(
            f"{what} specialist {config.name!r} failed on Ray Train ({exc}), after {WORKER_GROUP_RESTARTS} "
            f"restarts of its workers at most; the run's logs are under {Path(storage_path) / name}"
        ) from exc
    if result.checkpoint is None:
        raise SpecialistError(f"{what} specialist {config.name!r} finished without a checkpoint under {result.path}")
    out = Path(output_dir)
    tmp = out.with_name(out.name + ".tmp")
    with result.checkpoint.as_directory() as ckpt:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(ckpt, tmp)
    restarts = max(0, len(list(starts.glob("*"))) - 1) if starts.is_dir() else 0
    (tmp / TRAINING_FILE).write_text(json.dumps({"restarts": restarts}))
    shutil.rmtree(starts, ignore_errors=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return str(out)
