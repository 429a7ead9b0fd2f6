"""The hard-sample buffer: every hard row the controller settled, kept durably for the next stages.

Rows arrive in small batches while the job runs; each batch is one Parquet file under
``<run_dir>/buffer/`` written to a temporary name and renamed into place, so a killed run leaves
either the whole batch or none of it. A row is kept once, by its input row number: a resumed run
that asks the controller about a row again (its shard was not finished) does not double it.

Columns: ``row``, ``id``, ``text``, ``label``, ``confidence`` (the controller's), ``stage`` (the
stage whose specialists were live when the row arrived), ``seq`` (arrival order) and ``holdout``
(kept out of training to check stages when there is no gold column).
"""

from __future__ import annotations

import bisect
import hashlib
import os
from pathlib import Path

import pandas as pd

COLUMNS = ["row", "id", "text", "label", "confidence", "stage", "seq", "holdout"]


def held_out(row_id: str, fraction: float) -> bool:
    """A stable draw per row id: the same row is held out in every run and every restart."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(str(row_id).encode()).digest()[:8], "big")
    return h / 2**64 < fraction


class HardBuffer:
    def __init__(self, directory: str | Path, *, validation_fraction: float = 0.0):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.validation_fraction = validation_fraction
        for tmp in self.dir.glob("*.tmp"):  # a batch a killed run did not finish writing
            tmp.unlink()
        files = sorted(self.dir.glob("batch-*.parquet"))
        frames = [pd.read_parquet(f) for f in files]
        frame = (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS))
        frame = frame.drop_duplicates("row", keep="first").sort_values("seq", kind="stable").reset_index(drop=True)
        # Batches are kept as a list and joined only when the whole buffer is asked for, so appending
        # stays O(batch) however long the run; seqs (increasing) answer new_since without a join.
        self._parts: list[pd.DataFrame] = [frame] if len(frame) else []
        self._joined: pd.DataFrame | None = frame
        self._seqs: list[int] = frame["seq"].astype("int64").tolist()
        self._rows = set(frame["row"].tolist())
        self._next_file = len(files) and int(files[-1].stem.split("-")[1]) + 1
        self._next_seq = self._seqs[-1] + 1 if self._seqs else 0

    def __len__(self) -> int:
        return len(self._seqs)

    @property
    def last_seq(self) -> int:
        """The ``seq`` of the newest row (-1 when empty): a stage records it to know which rows were new."""
        return self._next_seq - 1

    def append(self, rows: pd.DataFrame, *, stage: int) -> int:
        """Add rows (columns row, id, text, label, confidence) not already kept; return how many were added."""
        rows = rows[~rows["row"].isin(self._rows)].drop_duplicates("row")
        if rows.empty:
            return 0
        batch = pd.DataFrame({
            "row": rows["row"].astype("int64").to_numpy(),
            "id": rows["id"].astype(str).to_numpy(),
            "text": rows["text"].astype(str).to_numpy(),
            "label": rows["label"].astype(str).to_numpy(),
            "confidence": pd.to_numeric(rows["confidence"], errors="coerce").astype("float64").to_numpy(),
            "stage": stage,
            "seq": range(self._next_seq, self._next_seq + len(rows)),
            "holdout": [held_out(i, self.validation_fraction) for i in rows["id"].astype(str)],
        })
        path = self.dir / f"batch-{self._next_file:06d}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        batch.to_parquet(tmp, index=False)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        self._next_file += 1
        self._next_seq += len(batch)
        self._rows.update(batch["row"].tolist())
        self._seqs.extend(batch["seq"].tolist())
        self._parts.append(batch)
        self._joined = None
        return len(batch)

    def frame(self) -> pd.DataFrame:
        """Every kept row, in arrival order (shared until the next append: do not modify it in place)."""
        if self._joined is None:
            self._joined = pd.concat(self._parts, ignore_index=True)
            self._parts = [self._joined]
        return self._joined if self._parts else pd.DataFrame(columns=COLUMNS)

    def new_since(self, seq: int) -> int:
        """How many rows arrived after ``seq``."""
        return len(self._seqs) - bisect.bisect_right(self._seqs, seq)
