"""Reference rows: rows the controller answers up front, so that routing rests on measurement.

The specialists may settle a row only where the evidence says they lose (almost) nothing against the
controller on that kind of row (``voting.fit_route``). The evidence comes from rows that both the
controller and the specialists have answered, drawn at random (the hard rows would bias it: they are
the rows the specialists are unsure of):

- with a gold column, ``voting.reference_rows`` of the gold check rows (the random, held-out slice that
  checks every stage); the controller's answers are compared with gold, row by row;
- without one, a random **audit** sample of the input; the controller's answers are the reference
  labels, so what can be measured is agreement with the controller, never better than it.

The controller is asked with the prompt a hard row gets (nearest seed rows as demonstrations; for many
labels, the stage-0 specialists' top candidates). Its answers are those rows' output labels
(``decided_by: controller``, ``reference: True``) and count in the LLM share; the rows are never trained
on. Saved under ``<run_dir>/reference/`` so a resumed run neither re-draws nor re-pays for them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from labelwright.orchestrator.voting import mean_probs, top_candidates
from labelwright.training.stage import CheckSet


@dataclass
class Reference:
    check: CheckSet  # what every stage is checked and the routing fitted on
    answers: dict = field(default_factory=dict)  # row id -> the controller's answer (as ControllerStage fills it)
    exclude_rows: set[int] = field(default_factory=set)  # input rows never trained on
    outside: dict = field(default_factory=dict)  # answers on rows of a gold file (not input rows)
    # the controller's demonstration bank with the gold rows added (texts, labels, embeddings); None: the seed's
    demonstrations: tuple | None = None

    @property
    def measured(self) -> bool:
        """Whether the controller answered reference rows (routing can be fitted on them)."""
        return bool(self.answers or self.outside)

    @property
    def source(self) -> str:
        if not len(self.check):
            return "none"
        return "gold file" if self.outside else self.check.source

    def training_rows(self) -> tuple[list[str], list[str]]:
        """The rows the specialists may learn from, cross-fitted (``stages.train_on_reference``): every gold
        check row (a gold file's, or the input's) and every audit row, with its reference label. Their votes
        stay honest wherever they are asked for (checks, routing, the output's own votes): a checkpoint answers
        a text it was cross-fitted on with its out-of-fold probabilities (``Specialist.predict``)."""
        c = self.check
        if c.source not in ("gold", "audit"):
            return [], []
        keep = [i for i in range(len(c)) if c.labels[i]]
        return [c.texts[i] for i in keep], [c.labels[i] for i in keep]

    def usage(self) -> dict:
        a = list(self.answers.values()) + list(self.outside.values())
        asked = [x for x in (self.check.controller or []) if x is not None]
        return {"source": self.source, "rows": len(self.check), "asked": len(a), "in_input": not self.outside,
                "answered": sum(1 for x in asked if x != ""),
                "llm_calls": sum(int(x.get("calls") or 0) for x in a),
                "prompt_tokens": sum(int(x.get("prompt_tokens") or 0) for x in a),
                "completion_tokens": sum(int(x.get("completion_tokens") or 0) for x in a)}


MAX_AUDIT_SHARE = 0.25  # an audit takes at most this share of the input's votable rows


def random_input_rows(staged, *, size: int, exclude_ids: set[str], exclude_texts: set[str], seed: int,
                      max_share: float, gold: bool = False) -> pd.DataFrame:
    """A fixed random slice of the input's votable rows (with a gold label, when ``gold``), none of them
    in ``exclude_ids`` / ``exclude_texts``: ``size`` rows, but at most ``max_share`` of the usable ones, in
    input order; columns row, id, text (and gold). The same slice on a resumed run."""
    cols = ["row", "id", "text"] + (["gold"] if gold else [])
    frames = []
    for shard in staged.shards:
        d = pd.read_parquet(shard.path, columns=cols + ["skip_reason"])
        keep = d["skip_reason"].isna() & (d["gold"].notna() if gold else True)
        frames.append(d[keep][cols])
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
    df = df[~df["id"].astype(str).isin(exclude_ids) & ~df["text"].isin(exclude_texts)]
    size = min(size, int(len(df) * max_share))
    return df.iloc[np.sort(np.random.default_rng(seed).permutation(len(df))[:size])].reset_index(drop=True)


def gold_check_set(staged, *, size: int, exclude_ids: set[str], exclude_texts: set[str], seed: int = 0,
                   max_share: float = 0.25):
    """A fixed random slice of gold-labelled input rows that checks every stage and is never trained on:
    ``size`` rows, but at most ``max_share`` of the usable gold rows, so that a small input still
    leaves most of its controller rows to train on.

    Returns (CheckSet with their row numbers, their ids)."""
    if size <= 0:
        return CheckSet([], [], "gold", rows=[]), []
    df = random_input_rows(staged, size=size, exclude_ids=exclude_ids, exclude_texts=exclude_texts, seed=seed,
                           max_share=max_share, gold=True)
    check = CheckSet(df["text"].tolist(), df["gold"].astype(str).tolist(), "gold", rows=df["row"].astype(int).tolist())
    return check, df["id"].astype(str).tolist()


def with_gold_demonstrations(settings, check: CheckSet):
    """``settings`` whose demonstration bank also holds the gold rows of ``check`` with their gold labels
    (``controller.gold_demonstrations``): what the user labelled is the best evidence a prompt can show. The
    controller never sees a row's own label (``ControllerStage.demonstrations`` leaves it out), so its
    answers on these rows still measure it honestly. Unchanged without gold, demonstrations or the option."""
    import dataclasses

    from labelwright.specialists.encoder import shared_encoder

    cfg = settings.controller
    if not len(check) or check.source != "gold" or not cfg.get("gold_demonstrations", True) \
            or not cfg.get("num_demonstrations", 4):
        return settings
    emb = np.asarray(shared_encoder(settings.encoder_model).encode(list(check.texts)), dtype=np.float32)
    have = settings.demo_embeddings is not None and len(settings.demo_texts) > 0
    return dataclasses.replace(
        settings, demo_texts=(list(settings.demo_texts) if have else []) + list(check.texts),
        demo_labels=(list(settings.demo_labels) if have else []) + list(check.labels),
        demo_embeddings=np.vstack([settings.demo_embeddings, emb]) if have else emb)


def _bank(settings, run_dir: Path) -> tuple:
    """The demonstration bank, also saved as ``<run_dir>/reference/demonstrations.parquet`` (text, label)
    so that what the controller was shown can be read back."""
    where = Path(run_dir) / "reference"
    where.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"text": settings.demo_texts, "label": settings.demo_labels}).to_parquet(
        where / "demonstrations.parquet", index=False)
    return settings.demo_texts, settings.demo_labels, settings.demo_embeddings


def _candidates(texts: list[str], checkpoints: dict[str, str], labels: list[str], k: int) -> list[list[str]]:
    """The stage-0 specialists' top ``k`` labels per text, ranked: the half a hard row's prompt offers first
    (``ControllerStage.choices``)."""
    from labelwright.specialists.registry import load_specialist

    probs = np.stack([np.asarray(load_specialist(p).predict_proba(texts), dtype=np.float64)
                      for p in checkpoints.values()])
    return [[labels[j] for j in row] for row in top_candidates(mean_probs(probs), k)]


def build_reference(staged, *, spec, gold_check: CheckSet, gold_ids: list[str], gold_file_rows: pd.DataFrame | None,
                    controller: dict, settings,
                    checkpoints: dict[str, str], exclude_ids: set[str], exclude_texts: set[str], run_dir: Path,
                    log: Callable[[str], None]) -> Reference:
    """The run's reference rows, asked of the controller (or read back from ``run_dir``).

    ``gold_check`` (with ``rows``) and ``gold_ids`` are the held-out gold check rows (empty without gold);
    ``gold_file_rows`` the rows of ``voting.gold_file`` as the job read them (None without one);
    ``settings`` the job's :class:`ControllerSettings` (prompt, demonstrations), ``controller`` its config."""
    from labelwright.orchestrator.stages import ControllerStage

    size = spec.voting.reference_rows if spec.voting.route == "measured" else 0
    if size == 0:  # routing by the rule alone: the gold check rows (if any) still check the stages
        settings = with_gold_demonstrations(settings, gold_check)
        return Reference(gold_check, {}, set(gold_check.rows or []), demonstrations=_bank(settings, run_dir))
    from_file = gold_file_rows is not None
    gold = len(gold_check) > 0 or from_file
    if from_file:  # labelled rows of their own: the reference, and the check of every stage
        rows = gold_file_rows
        rows = rows.iloc[np.sort(np.random.default_rng(1).permutation(len(rows))[:size])].reset_index(drop=True)
        rows["id"] = [f"gold-file-{i}" for i in rows.index]
        gold_check = CheckSet(rows["text"].tolist(), rows["label"].tolist(), "gold", rows=None)
        gold_ids = rows["id"].tolist()
        picked = pd.DataFrame({"row": -1, "id": gold_ids, "text": gold_check.texts})
    elif gold:
        order = np.random.default_rng(1).permutation(len(gold_check))[:size]
        picked = pd.DataFrame({"row": [gold_check.rows[i] for i in order], "id": [gold_ids[i] for i in order],
                               "text": [gold_check.texts[i] for i in order]})
    else:
        picked = random_input_rows(staged, size=size, exclude_ids=exclude_ids, exclude_texts=exclude_texts, seed=1,
                                   max_share=MAX_AUDIT_SHARE)
        if len(picked) < spec.stages.min_check_rows:
            log(f"reference: the input has too few rows for an audit ({len(picked)} would be at most "
                f"{MAX_AUDIT_SHARE:.0%} of them, fewer than stages.min_check_rows={spec.stages.min_check_rows}); "
                "the voting rule routes alone")
            return Reference(gold_check, {}, set())
    before = len(settings.demo_texts)
    settings = with_gold_demonstrations(settings, gold_check)
    if len(settings.demo_texts) > before:
        log(f"controller: {len(settings.demo_texts) - before} gold rows join the {before} seed rows its nearest "
            "demonstrations are drawn from (controller.gold_demonstrations; a row never sees its own)")
    where = Path(run_dir) / "reference"
    table, meta_path = where / "reference.parquet", where / "meta.json"
    meta = {"source": "gold" if gold else "audit", "ids": picked["id"].astype(str).tolist(),
            "file": spec.voting.gold_file if from_file else None}
    if table.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        asked = pd.read_parquet(table)
        log(f"reference: reusing the controller's answers on {len(asked)} {meta['source']} rows from {table}")
    else:
        what = ("rows of the gold file" if from_file else "random gold check rows" if gold
                else "random input rows (an audit: there is no gold column)")
        log(f"reference: asking the controller about {len(picked)} {what}, to measure where the specialists "
            "may settle rows without it")
        stage = ControllerStage(settings)
        many = len(spec.label_names) > controller["max_choices"]
        texts = picked["text"].tolist()
        choices = _candidates(texts, checkpoints, spec.label_names, controller["max_choices"]) if many else None
        answers, step = [], 25
        for start in range(0, len(texts), step):
            part = texts[start:start + step]
            demos, offered = stage.prompt_parts(part, choices[start:start + step] if many else None)
            answers += stage.controller.label_many(part, demonstrations=demos, choices=offered)
            log(f"  reference labels {len(answers)}/{len(texts)}")
        asked = picked.assign(id=picked["id"].astype(str), answer=[json.dumps(a.model_dump()) for a in answers])
        where.mkdir(parents=True, exist_ok=True)
        asked.to_parquet(table.with_suffix(".tmp"), index=False)
        os.replace(table.with_suffix(".tmp"), table)
        meta_path.write_text(json.dumps(meta))
    answers = {rid: json.loads(a) for rid, a in zip(asked["id"], asked["answer"])}
    said = {rid: (a["label"] or "") for rid, a in answers.items()}
    if gold:
        controller_labels = [said.get(str(i)) for i in gold_ids]
        check = CheckSet(gold_check.texts, gold_check.labels, "gold", controller=controller_labels,
                         rows=gold_check.rows,
                         controller_confidence=[(answers.get(str(i)) or {}).get("confidence") for i in gold_ids])
    else:
        ok = asked[[said[str(i)] != "" for i in asked["id"]]]
        labels = [said[str(i)] for i in ok["id"]]
        check = CheckSet(ok["text"].tolist(), labels, "audit", controller=list(labels),
                         rows=ok["row"].astype(int).tolist())
    answered = sum(1 for x in check.controller if x)
    if gold:
        right = [c == g for c, g in zip(check.controller, check.labels) if c is not None]
        log(f"reference: the controller answered {answered}/{len(asked)} gold rows, "
            f"{np.mean(right) if right else 0:.1%} of them right")
    else:
        log(f"reference: the controller answered {answered}/{len(asked)} audit rows")
    if from_file:  # not input rows: nothing to fill in the output, and the calls are not the input's share
        return Reference(check, {}, set(), outside=answers, demonstrations=_bank(settings, run_dir))
    return Reference(check, {str(k): v for k, v in answers.items()},
                     set(gold_check.rows or []) | set(asked["row"].astype(int)), demonstrations=_bank(settings, run_dir))

