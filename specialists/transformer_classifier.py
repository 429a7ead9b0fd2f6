"""A transformers encoder + mean pooling + a linear head, fine-tuned end to end.

``train_loop`` is its training loop (one worker's share of the rows, no Ray); ``fit`` runs it in this
process. ``training/finetune.fine_tune_transformer`` runs the same loop data-parallel on Ray Train, and
``load`` opens its checkpoint.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from labelwright.specialists.base import Specialist, SpecialistConfig, read_manifest
from labelwright.specialists.errors import SpecialistError
from labelwright.specialists.encoder import length_order, load_pretrained, mean_pool, pick_device

# Measured (MiniLM, max_length 128, batch 32, 200 dev rows, one 8-epoch schedule read at epochs 3/5/8):
# lr 1e-4 / 8 epochs: movie 0.74 (100 rows), 0.795 (300); yahoo 0.62 (100). lr 3e-4: movie 0.71 / 0.765,
# yahoo 0.675 and unstable mid-run on movie; 5e-5: movie 0.685. yahoo at 300 rows was not run (time).
DEFAULT_EPOCHS = 8
DEFAULT_LR = 1e-4
HEAD_FILE = "head.pt"
ENCODER_DIR = "encoder"

WARMUP_FRACTION = 0.1
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0


class MeanPoolClassifier(nn.Module):
    """encoder -> mean over real tokens -> dropout -> linear, returning logits."""

    def __init__(self, encoder: nn.Module, n_labels: int, *, dropout: float = 0.1, seed: int = 0):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(int(encoder.config.hidden_size), n_labels)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.normal_(0.0, 0.02, generator=gen)
            self.head.bias.zero_()

    def forward(self, input_ids, attention_mask, **extra):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return self.head(self.dropout(mean_pool(hidden, attention_mask)))


class TransformerClassifierSpecialist(Specialist):
    kind = "transformer_classifier"
    _version_prefix = "tfm"

    def __init__(self, config: SpecialistConfig, labels: Sequence[str], *, seed: int = 0, device=None,
                 _encoder_source: str | None = None):
        super().__init__(config, labels)
        from transformers import AutoModel, AutoTokenizer

        source = _encoder_source or config.model
        self.tokenizer = load_pretrained(AutoTokenizer, source)
        self.module = MeanPoolClassifier(load_pretrained(AutoModel, source), len(self.labels), seed=seed)
        self.device = pick_device(device)
        self.module.to(self.device).eval()

    @property
    def epochs(self) -> int:
        return DEFAULT_EPOCHS if self.config.epochs is None else self.config.epochs

    @property
    def lr(self) -> float:
        return DEFAULT_LR if self.config.lr is None else self.config.lr

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        )

    def predict_proba(self, texts) -> np.ndarray:
        texts = self._clean_texts(texts)
        out = np.zeros((len(texts), len(self.labels)), np.float32)
        order = length_order(texts)
        self.module.eval()
        with torch.inference_mode():
            for start in range(0, len(texts), self.config.batch_size):
                idx = order[start : start + self.config.batch_size]
                batch = self.tokenize([texts[i] for i in idx]).to(self.device)
                logits = self.module(batch["input_ids"], batch["attention_mask"])
                out[idx] = torch.softmax(logits.double(), dim=-1).float().cpu().numpy()
        return out

    def fit(self, texts, labels, *, sample_weight=None, seed: int = 0) -> None:
        y, w = self._label_indices(texts, labels, sample_weight)
        train_loop(self, self._clean_texts(texts), y, w, seed=seed)

    def mark_trained(self) -> None:
        """Recompute the version from every weight (call after the weights changed)."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        self.version = f"tfm-{h.hexdigest()[:8]}"

    def save(self, directory) -> None:
        directory = self._write_manifest(directory, encoder_dir=ENCODER_DIR, head_file=HEAD_FILE)
        self.module.encoder.save_pretrained(directory / ENCODER_DIR)
        self.tokenizer.save_pretrained(directory / ENCODER_DIR)
        torch.save({k: v.cpu() for k, v in self.module.head.state_dict().items()}, directory / HEAD_FILE)

    @classmethod
    def load(cls, directory, *, device=None, labels: Sequence[str] | None = None,
             config: SpecialistConfig | None = None) -> "TransformerClassifierSpecialist":
        """Open a saved specialist. Given ``labels`` (say, a task that gained a label), head rows are
        matched by label name and new labels start from fresh rows; ``config`` overrides the saved one."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        saved_labels = manifest["labels"]
        labels = list(saved_labels if labels is None else labels)
        config = config or SpecialistConfig(**manifest["config"])
        spec = cls(config, labels, device=device, _encoder_source=str(directory / ENCODER_DIR))
        head = torch.load(directory / HEAD_FILE, map_location="cpu", weights_only=True)
        if list(labels) == list(saved_labels):
            spec.module.head.load_state_dict(head)
            spec.version = manifest["version"]
        else:
            with torch.no_grad():
                for i, label in enumerate(labels):
                    if label in saved_labels:
                        j = saved_labels.index(label)
                        spec.module.head.weight[i] = head["weight"][j]
                        spec.module.head.bias[i] = head["bias"][j]
            spec.mark_trained()
        spec.module.to(spec.device).eval()
        return spec


def shard_indices(n: int, *, epoch: int, seed: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's rows for one epoch: one shared shuffle, padded by wrap-around so every rank gets
    the same count (DDP needs the same number of steps on every worker)."""
    perm = np.random.default_rng(seed + epoch).permutation(n)
    per_rank = math.ceil(n / world_size)
    padded = np.resize(perm, per_rank * world_size)
    return padded[rank::world_size]


def _all_reduced(t: torch.Tensor, device) -> torch.Tensor:
    """The sum of ``t`` over every rank, back on the CPU (NCCL reduces only tensors on the GPU)."""
    t = t.to(device)
    torch.distributed.all_reduce(t)
    return t.cpu()


def train_loop(
    spec: TransformerClassifierSpecialist,
    texts: Sequence[str],
    y: np.ndarray,
    sample_weight: np.ndarray | None = None,
    *,
    epochs: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    candidate_mask: np.ndarray | None = None,
    refine: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
) -> list[float]:
    """Train ``spec.module`` in place on label indices ``y``; return the mean loss of each epoch.

    ``wrap_model`` (e.g. ``ray.train.torch.prepare_model``) wraps the module for data-parallel work;
    ``on_epoch(epoch, loss)`` is called after every epoch on every rank. The specialist's version is
    refreshed at the end.

    With ``candidate_mask`` (rows x labels, True where a label is in the row's candidate set) the targets are
    distributions instead of ``y``: uniform over each set in the first epoch, then ``refine(probs, mask) ->
    (targets, keep)`` of the model's own predictions in the epoch before (every rank's rows, averaged), with
    the rows ``keep`` is False for left out of that epoch (soft cross-entropy).
    """
    epochs = spec.epochs if epochs is None else epochs
    lr = spec.lr if lr is None else lr
    y = np.asarray(y, dtype=np.int64)
    w = np.ones(len(y), np.float32) if sample_weight is None else np.asarray(sample_weight, np.float32)
    soft = None
    if candidate_mask is not None:
        mask = np.asarray(candidate_mask, dtype=bool)
        if mask.shape != (len(texts), len(spec.labels)) or not mask.any(axis=1).all():
            raise SpecialistError(
                f"specialist {spec.name!r}: candidate_mask must be rows x labels ({len(texts)} x {len(spec.labels)}) "
                "with at least one candidate a row"
            )
        soft = mask / mask.sum(axis=1, keepdims=True)  # the first epoch: uniform over each set
        keep = np.ones(len(texts), bool)
    if len(texts) == 0:
        raise SpecialistError(f"specialist {spec.name!r}: the training set is empty; give at least one row")
    torch.manual_seed(seed + rank)
    model = wrap_model(spec.module) if wrap_model is not None else spec.module
    device = next(model.parameters()).device
    batch_size = spec.config.batch_size
    steps_per_epoch = math.ceil(math.ceil(len(texts) / world_size) / batch_size)
    total_steps = max(1, steps_per_epoch * epochs)
    warmup = max(1, int(WARMUP_FRACTION * total_steps))

    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": WEIGHT_DECAY},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (step + 1) / warmup if step < warmup else max(0.0, (total_steps - step) / max(1, total_steps - warmup)),
    )
    distributed = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    losses = []
    for epoch in range(epochs):
        model.train()
        idx = shard_indices(len(texts), epoch=epoch, seed=seed, rank=rank, world_size=world_size)
        loss_sum = torch.zeros(2, dtype=torch.float64)
        refining = soft is not None and refine is not None and epoch + 1 < epochs  # targets for the next epoch
        if refining:
            seen = torch.zeros(len(texts), len(spec.labels) + 1, dtype=torch.float64)  # summed probs, count
        for start in range(0, len(idx), batch_size):
            rows = idx[start : start + batch_size]
            batch = spec.tokenize([texts[i] for i in rows]).to(device)
            weight = torch.as_tensor(w[rows], device=device)
            logits = model(batch["input_ids"], batch["attention_mask"])
            if soft is None:
                per_row = F.cross_entropy(logits, torch.as_tensor(y[rows], device=device), reduction="none")
            else:
                target = torch.as_tensor(soft[rows], dtype=logits.dtype, device=device)
                per_row = -(target * F.log_softmax(logits, dim=-1)).sum(-1)
                weight = weight * torch.as_tensor(keep[rows], dtype=weight.dtype, device=device)
            if refining:
                probs = torch.softmax(logits.detach().double(), dim=-1).cpu()
                seen.index_add_(0, torch.as_tensor(rows), torch.cat([probs, torch.ones(len(rows), 1, dtype=torch.float64)], 1))
            loss = (per_row * weight).sum() / weight.sum().clamp(min=1e-8)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            loss_sum += torch.tensor([float(per_row.detach().sum()), len(rows)], dtype=torch.float64)
        if distributed:
            loss_sum = _all_reduced(loss_sum, device)
        if refining:
            if distributed:
                seen = _all_reduced(seen, device)
            probs = (seen[:, :-1] / seen[:, -1:].clamp(min=1)).numpy()
            unseen = seen[:, -1].numpy() == 0  # a rank count that did not divide: kept as they were
            probs[unseen] = soft[unseen]
            soft, keep = refine(probs, mask)
            soft = np.asarray(soft, dtype=np.float64)
            keep = np.asarray(keep, dtype=bool)
        epoch_loss = float(loss_sum[0] / loss_sum[1])
        losses.append(epoch_loss)
        if on_epoch is not None:
            on_epoch(epoch, epoch_loss)
    spec.module.eval()
    spec.mark_trained()
    return losses
