"""Bootstrap: choose a diverse seed set and have it labelled (by the controller, or from a gold file).

The labelled seed set trains the specialists' first stage and is the bank of demonstrations the
controller sees for hard rows. It is saved under ``<run_dir>/seed/`` so a resumed run neither
re-picks nor re-pays for it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from labelwright.orchestrator.dataset_io import StagedInput, read_frame
from labelwright.specialists.errors import InputDataError
from labelwright.orchestrator.acquisition import diverse_sample
from labelwright.orchestrator.voting import top_candidates


@dataclass
class SeedSet:
    texts: list[str]
    labels: list[str]
    embeddings: np.ndarray  # L2-normalised, one row per text
    source: str  # "controller" or "gold"
    answers: dict = field(default_factory=dict)  # row id -> controller answer (controller seeds only)

    def __len__(self) -> int:
        return len(self.texts)

    def usage(self) -> dict:
        """LLM use of seeding: calls and tokens over every seed answer."""
        a = list(self.answers.values())
        return {"rows_asked": len(a), "llm_calls": sum(int(x.get("calls") or 0) for x in a),
                "prompt_tokens": sum(int(x.get("prompt_tokens") or 0) for x in a),
                "completion_tokens": sum(int(x.get("completion_tokens") or 0) for x in a)}


def _sample_pool(staged: StagedInput, pool_size: int, seed: int) -> pd.DataFrame:
    """A uniform sample of votable rows, read shard by shard (never the whole input at once)."""
    rng = np.random.default_rng(seed)
    keep_p = min(1.0, pool_size / max(1, staged.n_rows)) * 1.2
    parts = []
    for shard in staged.shards:
        df = pd.read_parquet(shard.path, columns=["id", "text", "skip_reason"])
        df = df[df["skip_reason"].isna()]
        parts.append(df[rng.random(len(df)) < keep_p])
    pool = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["id", "text"])
    if len(pool) > pool_size:
        pool = pool.sample(n=pool_size, random_state=seed).sort_index()
    return pool.reset_index(drop=True)


def _file_pool(path: str, text_column: str, pool_size: int, seed: int) -> pd.DataFrame:
    """Seed candidates from a separate file of (unlabelled) texts; ids cannot collide with input ids."""
    df = read_frame(path)
    if text_column not in df.columns:
        raise InputDataError(f"seed pool file {path} has no column {text_column!r}; its columns are {list(df.columns)}")
    texts = df[text_column].astype(str)
    texts = texts[texts.str.strip() != ""]
    if len(texts) > pool_size:
        texts = texts.sample(n=pool_size, random_state=seed).sort_index()
    return pd.DataFrame({"id": [f"pool-{i}" for i in texts.index], "text": texts.tolist()})


def label_choices(texts_emb: np.ndarray, label_emb: np.ndarray, labels: list[str], k: int) -> list[list[str]]:
    """The ``k`` labels whose verbalisation is most similar to each text (narrows many-label tasks)."""
    idx = top_candidates(texts_emb @ label_emb.T, k)
    return [[labels[j] for j in row] for row in idx]


def verbalise(label: str, description: str | None) -> str:
    words = label.replace("_", " ").replace("-", " ")
    return f"{words}: {description}" if description else words


def build_seed(
    staged: StagedInput,
    *,
    spec,
    controller,
    encoder,
    run_dir: str | Path,
    log: Callable[[str], None] = print,
) -> SeedSet:
    seed_dir = Path(run_dir) / "seed"
    table_path, emb_path, meta_path = seed_dir / "seed.parquet", seed_dir / "embeddings.npy", seed_dir / "meta.json"
    meta = {"gold_file": spec.seed.gold_file, "pool_file": spec.seed.pool_file,
            "size": spec.seed.resolved_size(len(spec.labels)), "pool_size": spec.seed.pool_size,
            "labels": spec.label_names}
    if meta_path.is_file() and json.loads(meta_path.read_text()) == meta and table_path.is_file():
        df = pd.read_parquet(table_path)
        log(f"seed: reusing {len(df)} labelled rows from {table_path}")
        return _from_frame(df, np.load(emb_path))

    labels = spec.label_names
    if spec.seed.gold_file:
        df = _gold_seed(spec)
        log(f"seed: {len(df)} gold-labelled rows from {spec.seed.gold_file}")
        emb = encoder.encode(df["text"].tolist())
    else:
        size = meta["size"]
        if spec.seed.pool_file:
            pool = _file_pool(spec.seed.pool_file, spec.text_column, spec.seed.pool_size, seed=0)
        else:
            pool = _sample_pool(staged, spec.seed.pool_size, seed=0)
        if pool.empty:
            raise InputDataError("every input row has an empty text; there is nothing to label")
        log(f"seed: embedding a pool of {len(pool)} rows, picking {min(size, len(pool))} by k-means")
        pool_emb = encoder.encode(pool["text"].tolist())
        chosen = diverse_sample(pool_emb, size, seed=0)
        picked = pool.iloc[chosen].reset_index(drop=True)
        emb = pool_emb[chosen]
        choices = None
        if len(labels) > controller.config.max_choices:
            label_emb = encoder.encode([verbalise(lab, spec.descriptions.get(lab)) for lab in labels])
            choices = label_choices(emb, label_emb, labels, controller.config.max_choices)
        log(f"seed: asking the controller to label {len(picked)} rows")
        done = [0]

        def tick(_i, _answer):
            done[0] += 1
            if done[0] % 10 == 0 or done[0] == len(picked):
                log(f"  seed labels {done[0]}/{len(picked)}")

        answers = controller.label_many(picked["text"].tolist(), choices=choices, on_done=tick)
        recs = [a.model_dump() for a in answers]
        df = pd.DataFrame({
            "id": picked["id"], "text": picked["text"], "label": [r["label"] for r in recs],
            "source": "controller", "answer": [json.dumps(r) for r in recs],
        })
        ok = df["label"].notna().to_numpy()
        log(f"seed: controller labelled {int(ok.sum())}/{len(df)} rows "
            f"({len(df) - int(ok.sum())} unresolved: those that failed for a reason that may pass, endpoint errors, are "
            "voted and asked again like any other row; the others keep their reason)")
    seed_dir.mkdir(parents=True, exist_ok=True)
    df.to_parquet(table_path.with_suffix(".tmp"), index=False)
    np.save(emb_path.with_suffix(".tmp.npy"), emb)
    os.replace(table_path.with_suffix(".tmp"), table_path)
    os.replace(emb_path.with_suffix(".tmp.npy"), emb_path)
    meta_path.write_text(json.dumps(meta))
    return _from_frame(df, emb)


def _from_frame(df: pd.DataFrame, emb: np.ndarray) -> SeedSet:
    answers = {}
    if "answer" in df.columns:
        answers = {rid: json.loads(a) for rid, a in zip(df["id"], df["answer"])}
    ok = df["label"].notna().to_numpy()
    source = str(df["source"].iloc[0]) if len(df) else "controller"
    return SeedSet(texts=df["text"][ok].tolist(), labels=df["label"][ok].tolist(),
                   embeddings=np.asarray(emb)[ok], source=source, answers=answers)


def _gold_seed(spec) -> pd.DataFrame:
    return read_gold_file(spec.seed.gold_file, text_column=spec.seed.gold_text_column,
                          label_column=spec.seed.gold_label_column, labels=spec.label_names, what="seed file")


def read_gold_file(path: str, *, text_column: str, label_column: str, labels: list[str], what: str) -> pd.DataFrame:
    """A labelled file as (id, text, label, source) rows; a missing column or a label outside the label set
    is an error naming the file, the row and what to do. Empty texts are dropped."""
    df = read_frame(path)
    for col in (text_column, label_column):
        if col not in df.columns:
            raise InputDataError(f"{what} {path} has no column {col!r}; its columns are {list(df.columns)}")
    allowed = set(labels)
    df = df[[text_column, label_column]].copy()
    df.columns = ["text", "label"]
    df["text"] = df["text"].astype(str)
    df["label"] = df["label"].astype(str).str.strip()
    bad = df.index[~df["label"].isin(allowed)]
    if len(bad):
        i = int(bad[0])
        raise InputDataError(
            f"{what} {path}: row {i} has label {df.at[i, 'label']!r}, not in the label set {sorted(allowed)} "
            f"({len(bad)} such rows); fix the file or the labels"
        )
    df = df[df["text"].str.strip() != ""].reset_index(drop=True)
    df["id"] = [f"gold-{i}" for i in range(len(df))]
    df["source"] = "gold"
    return df
