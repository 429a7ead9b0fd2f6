"""The specialist replica: the logic behind one specialist's Ray Serve deployment.

A plain class (usable and testable without Ray). ``cluster/deploy.py`` wraps it with
``serve.deployment``. Weights come from ``user_config = {"checkpoint": <dir>}``, applied by
:meth:`reconfigure`. Redeploying with a new checkpoint (a new stage) is a rolling update: Serve
starts replicas that load the new checkpoint and drains the old ones, so requests in flight finish
on the old weights and none is dropped (``tests/integration/test_staged_learning.py``).
"""

from __future__ import annotations

import numpy as np

from labelwright.specialists.registry import load_specialist


class SpecialistReplica:
    def __init__(self, torch_threads: int = 1):
        import torch

        torch.set_num_threads(max(1, torch_threads))
        self._specialist = None
        self._checkpoint: str | None = None

    def reconfigure(self, user_config: dict) -> None:
        """Load the new checkpoint fully, then switch with one assignment: calls in flight finish on
        the old weights, calls after this returns use the new ones."""
        checkpoint = user_config["checkpoint"]
        if checkpoint != self._checkpoint:
            specialist = load_specialist(checkpoint)
            # One answer before any caller's: a specialist builds its encoder (and imports transformers' lazy
            # modules) on first use, and concurrent first calls raced there (ImportError of AutoModel).
            specialist.predict(["warm-up"])
            self._specialist, self._checkpoint = specialist, checkpoint

    def predict(self, texts: list[str], embeddings_of: str | None = None) -> dict:
        """Probabilities over the task labels for a whole batch of texts (callers batch, not Serve); with
        ``embeddings`` too where the specialist computed them with the encoder ``embeddings_of`` names."""
        specialist = self._specialist  # one read: a swap during this call does not mix two versions
        if specialist is None:
            raise RuntimeError("replica has no checkpoint yet: deploy it with user_config={'checkpoint': dir}")
        if not texts:
            return {"probs": np.zeros((0, len(specialist.labels)), np.float32), "version": specialist.version}
        # predict: a text the specialist was cross-fitted on gets its out-of-fold probabilities
        if embeddings_of is not None and specialist.embeds == embeddings_of:
            probs, embeddings = specialist.predict_embedded(list(texts))
            return {"probs": np.asarray(probs, dtype=np.float32), "version": specialist.version,
                    "embeddings": np.asarray(embeddings, dtype=np.float32)}
        return {"probs": np.asarray(specialist.predict(list(texts)), dtype=np.float32), "version": specialist.version}

    def info(self) -> dict:
        s = self._specialist
        return {"name": s.name, "kind": s.kind, "labels": list(s.labels), "version": s.version,
                "checkpoint": self._checkpoint, "device": str(getattr(s, "device", "cpu"))}
