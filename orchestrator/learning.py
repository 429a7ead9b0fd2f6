"""Staged learning while the job runs: the controller's answers fine-tune the specialists.

The driver hands every labelled batch to :class:`StagedLearning`. Rows the controller settled go
to the durable hard-sample buffer (``training/buffer.py``). When enough new rows have gathered, a
stage trains in a background thread (``training/stage.py``: Ray Train for transformers, refits for
linear models, check and rollback), while voting goes on with the deployed version (``stages.wait``
pauses the driver instead). When the stage is done, the stage's own thread rolls its checkpoints
into the specialists' Serve deployments (a rolling update: new replicas load the checkpoint, old
ones drain; no request fails), so batches voted afterwards use the new version; every output row
records the version of each specialist that voted on it.

Stage records are kept in ``<run_dir>/stages.json``; a resumed run deploys the last recorded
stage's checkpoints and carries on from its buffer position. A stage that was training when the run
was killed left no record and is trained again.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pandas as pd

from labelwright.orchestrator.report import CONTROLLER_DECIDED, accuracy, combine_text, routing_text
from labelwright.orchestrator.spec import TaskSpec
from labelwright.orchestrator.voting import check_judge
from labelwright.specialists.base import read_manifest
from labelwright.training.buffer import HardBuffer
from labelwright.training.finetune import restarts_by_specialist
from labelwright.training.stage import CheckSet, evaluate, run_stage

RECORDS = "stages.json"


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def versions_of(checkpoints: dict[str, str]) -> dict[str, str]:
    return {name: read_manifest(path)["version"] for name, path in checkpoints.items()}


class StagedLearning:
    def __init__(
        self,
        spec: TaskSpec,
        *,
        run_dir: Path,
        seed_texts: list[str],
        seed_labels: list[str],
        stage0: dict[str, str],
        stage0_train_s: float,
        check: CheckSet,
        exclude_rows: set[int],
        total_rows: int,
        gpu: bool,
        swap: Callable[[dict[str, str]], None],
        log: Callable[[str], None],
        gate=None,
        crossfit: tuple[list[str], list[str]] | None = None,
    ):
        self.spec, self.cfg = spec, spec.stages
        self.crossfit = crossfit  # reference rows the linear specialists learn from, cross-fitted, at every stage
        self.judge = check_judge(spec.voting, min_fit_rows=self.cfg.min_check_rows)
        self.run_dir = Path(run_dir)
        self.seed_texts, self.seed_labels = seed_texts, seed_labels
        self.check, self.exclude_rows = check, exclude_rows
        self.total_rows, self.gpu, self.swap_fn, self.log = total_rows, gpu, swap, log
        fraction = self.cfg.validation_fraction if check.source == "controller" else 0.0
        self.buffer = HardBuffer(self.run_dir / "buffer", validation_fraction=fraction)
        self.path = self.run_dir / RECORDS
        self.records: list[dict] = json.loads(self.path.read_text()) if self.path.is_file() else []
        if not self.records:
            check0 = self._check_set()
            self.records.append({
                "stage": 0, "new_rows": len(seed_texts), "replay_rows": 0, "upto_seq": -1,
                "train_s": round(stage0_train_s, 2), "checkpoints": dict(stage0), "candidates": dict(stage0),
                "train_restarts": restarts_by_specialist(stage0),
                "rolled_back": [], "checked": len(check0) > 0,
                "check": evaluate(stage0, check0, label_names=spec.label_names, judge=self.judge),
                "versions": versions_of(stage0), "rows_seen_at_start": 0,
            })
            _write_json(self.path, self.records)
        last = self.records[-1]["stage"]
        for name in (s.name for s in spec.specialists):  # stages a killed run did not finish
            for d in (self.run_dir / "checkpoints" / name).glob("stage-*"):
                suffix = d.name.removeprefix("stage-").removesuffix(".tmp")
                if suffix.isdigit() and int(suffix) > last:
                    shutil.rmtree(d, ignore_errors=True)
        self.deployed = dict(self.records[-1]["checkpoints"])
        self.rows_seen = 0
        self.rows_at_last_stage = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labelwright-stage")
        self._future: Future | None = None
        self._lock = threading.Lock()
        self.gate = gate  # StageGate actor: pauses voting (stages.wait), carries calibrated thresholds
        for rec in self.records:  # a resumed run's voters need the thresholds of the stages already run
            self._publish_threshold(rec)
        checked = [r["check"] for r in self.records if r.get("check")]  # a failed stage has no check
        fit = checked[-1].get("gate") if checked else None
        if fit is not None and fit.get("kind") == "route":
            log(f"voting: stage {self.stage} routes by measured correctness: threshold {_gate_text(fit)}")
        elif fit is not None:
            log(f"voting: stage {self.stage} threshold calibrated on {fit['rows']} held-out {check.source} rows: "
                f"{_gate_text(fit)}")
        elif spec.voting.route == "measured" and check.controller is not None:
            log(f"voting: the controller answered fewer than stages.min_check_rows={self.cfg.min_check_rows} "
                "reference rows, too few to measure where the specialists may settle rows; voting uses the rule's "
                "own threshold (raise voting.reference_rows)")
        elif spec.voting.target_accuracy is not None:
            where = ("controller rows held out of training arrive with the stages" if self.cfg.enabled
                     else "give a gold column or enable stages to have some")
            log(f"voting.target_accuracy: fewer than stages.min_check_rows={self.cfg.min_check_rows} held-out rows "
                f"to calibrate on ({where}); voting uses the rule's own threshold until a stage calibrates it")

    # ---- state ---------------------------------------------------------------------------------
    @property
    def stage(self) -> int:
        """The stage whose checkpoints are deployed."""
        return self.records[-1]["stage"]

    @property
    def training(self) -> bool:
        return self._future is not None

    def reference_decisions(self) -> dict | None:
        """The last checked stage's out-of-fold decisions on the gold reference rows (``voting.reference_decisions``),
        None where it made none (no gold, no routing)."""
        checked = [r["check"] for r in self.records if r.get("check")]
        return checked[-1].get("reference_decisions") if checked else None

    def trained_rows(self) -> set[int]:
        """Rows of the input the deployed specialists may have trained on: every buffered controller row up to the
        last stage's (kept rows only; held-out rows are never trained on). The seed rows are not counted here."""
        frame = self.buffer.frame()
        if frame.empty:
            return set()
        upto = self.records[-1]["upto_seq"]
        return set(frame.loc[(frame["seq"] <= upto) & ~frame["holdout"].astype(bool), "row"].astype(int))

    def _check_set(self) -> CheckSet:
        if self.check.source != "controller":  # gold rows or the audit sample: fixed for the whole run
            return self.check
        held = self.buffer.frame()
        held = held[held["holdout"].astype(bool)]
        return CheckSet(held["text"].tolist(), held["label"].tolist(), "controller")

    # ---- the driver's hooks --------------------------------------------------------------------
    def observe(self, batch: pd.DataFrame) -> None:
        """Called with every labelled batch the job writes: keep the controller's rows, maybe start a stage."""
        self.rows_seen += len(batch)
        settled = batch[batch["decided_by"].isin(CONTROLLER_DECIDED) & ~batch["seed"].astype(bool)
                        & ~batch["row"].isin(self.exclude_rows)]
        if len(settled):
            self.buffer.append(settled[["row", "id", "text", "label", "confidence"]], stage=self.stage)
        self.poll()
        if self._should_start():
            self._start()

    def poll(self) -> None:
        """Collect a finished stage (its own thread swapped it in). A stage that failed is logged and
        recorded, and the job goes on with the deployed specialists."""
        if self._future is None or not self._future.done():
            return
        future, self._future = self._future, None
        exc = future.exception()
        if exc is not None:
            self.log(f"stage {self.stage + 1}: failed ({type(exc).__name__}: {exc}); "
                     f"keeping stage {self.stage}'s specialists")
            self._record({"stage": self.stage + 1, "failed": f"{type(exc).__name__}: {exc}",
                          "checkpoints": dict(self.deployed), "rolled_back": [], "upto_seq": self._pending_upto,
                          "new_rows": 0, "replay_rows": 0, "rows_seen_at_start": self._pending_seen,
                          "rows_seen_at_swap": self.rows_seen, "versions": versions_of(self.deployed)})

    def finish(self) -> None:
        """Wait for a stage still training (its checkpoints are kept for a later run) and stop the thread."""
        if self._future is not None:
            self.log(f"waiting for stage {self.stage + 1} to finish training")
            self._future.exception()
            self.poll()
        self._pool.shutdown(wait=True)

    def _record(self, record: dict) -> None:
        with self._lock:
            self.records.append(record)
            _write_json(self.path, self.records)
            self.deployed = dict(record["checkpoints"])

    # ---- stages --------------------------------------------------------------------------------
    def _should_start(self) -> bool:
        cfg = self.cfg
        if not cfg.enabled or self._future is not None:
            return False
        if cfg.max_stages is not None and self.stage >= cfg.max_stages:
            return False
        since = self.records[-1]["upto_seq"]
        new = self.buffer.new_since(since)
        if new == 0:
            return False
        left = self.total_rows - self.rows_seen
        if cfg.every_rows is not None and new >= cfg.every_rows and left >= cfg.every_rows:
            return True
        if cfg.every_fraction is not None:
            step = cfg.every_fraction * self.total_rows
            return self.rows_seen - self.rows_at_last_stage >= step and left >= step
        return False

    def _start(self) -> None:
        stage = self.stage + 1
        frame = self.buffer.frame()
        since = self.records[-1]["upto_seq"]
        self._pending_upto = int(frame["seq"].max())
        self._pending_seen = self.rows_seen
        self.rows_at_last_stage = self.rows_seen
        train = frame[~frame["holdout"].astype(bool)]
        check = self._check_set()
        self.log(f"stage {stage}: training on {int((train['seq'] > since).sum())} new controller rows "
                 f"(buffer {len(frame)}, {len(check)} held-out {check.source} rows to check it); "
                 f"voting {'waits' if self.cfg.wait else 'goes on with stage ' + str(self.stage)}")
        if self.gate is not None and self.cfg.wait:
            self.gate.close.remote()
        self._future = self._pool.submit(self._run, stage, train, since, check)

    def _run(self, stage: int, train: pd.DataFrame, since: int, check: CheckSet) -> None:
        """The stage's thread: train and check, then roll the accepted checkpoints into Serve. Voting
        held by ``stages.wait`` resumes however the stage ends (the driver may be waiting on it)."""
        try:
            self._train_check_swap(stage, train, since, check)
        finally:
            if self.gate is not None and self.cfg.wait:
                self.gate.open.remote()

    def _train_check_swap(self, stage: int, train: pd.DataFrame, since: int, check: CheckSet) -> None:
        started = time.monotonic()
        runtime = self.spec.runtime
        record = run_stage(
            self.spec.specialists, stage=stage, deployed=dict(self.deployed),
            seed_texts=self.seed_texts, seed_labels=self.seed_labels, buffer=train, since_seq=since,
            upto_seq=self._pending_upto, replay_ratio=self.cfg.replay_ratio, check=check,
            label_names=self.spec.label_names, run_dir=self.run_dir, judge=self.judge,
            tolerance=self.cfg.rollback_tolerance,
            min_check_rows=self.cfg.min_check_rows, train_workers=runtime.train_workers, use_gpu=self.gpu,
            crossfit=self.crossfit, log=self.log,
        )
        changed = {n: p for n, p in record["checkpoints"].items() if p != self.deployed.get(n)}
        record["versions"] = versions_of(record["checkpoints"])
        self._publish_threshold(record)  # before the swap: the first batch the new versions vote needs it
        t = time.monotonic()
        self.log(f"stage {stage}: checked; " + (f"swapping in {', '.join(changed)}" if changed else "nothing to swap in"))
        if changed:
            self.swap_fn(changed)
        record.update(swap_s=round(time.monotonic() - t, 2), wall_s=round(time.monotonic() - started, 2),
                      rows_seen_at_start=self._pending_seen, rows_seen_at_swap=self.rows_seen)
        self._record(record)
        msg = f"stage {stage}: deployed ({', '.join(changed) or 'no specialist changed'}) in {record['wall_s']:.0f} s"
        if record["rolled_back"]:
            msg += f"; rolled back {', '.join(record['rolled_back'])}"
        chk = record.get("check") or {}
        if chk.get("rows"):
            accs = ", ".join(f"{n} {a:.3f}" for n, a in chk["specialists"].items())
            msg += f"; on {chk['rows']} held-out {chk['source']} rows: {accs}, hard share {chk['hard_share']:.0%}"
            if "gate" in chk:
                msg += f"; calibrated threshold {_gate_text(chk['gate'])}"
        self.log(msg)

    def _publish_threshold(self, record: dict) -> None:
        """Hand the stage's calibrated threshold (if its check fitted one) to the voters."""
        if self.gate is None:
            return
        import ray

        for versions, threshold, fitted in published_fits([record]):
            ray.get(self.gate.set_threshold.remote(versions, threshold, fitted))

    # ---- reporting -----------------------------------------------------------------------------
    def row_stages(self, df: pd.DataFrame, names: list[str]) -> pd.Series:
        """The stage of the specialists that voted on each row (the newest among them); NA if not voted."""
        stage_of = {name: {} for name in names}
        for rec in self.records:
            for name, version in (rec.get("versions") or {}).items():
                stage_of.setdefault(name, {}).setdefault(version, rec["stage"])
        cols = [df[f"version_{n}"].map(stage_of[n]) for n in names if f"version_{n}" in df.columns]
        if not cols:
            return pd.Series(pd.NA, index=df.index, dtype="Int64")
        return pd.concat(cols, axis=1).max(axis=1).astype("Int64")

    def report(self, df: pd.DataFrame) -> dict:
        """Per-stage metrics: rows voted by each stage's specialists, their hard share, LLM use and,
        with gold, consensus accuracy; each stage's check on the held-out slice."""
        voted = df[df["stage"].notna() & ~df["seed"].astype(bool)]
        out = []
        for rec in self.records:
            part = voted[voted["stage"] == rec["stage"]]
            hard = part["decided_by"] != "consensus"
            row = {
                "stage": rec["stage"], "rows": int(len(part)),
                "hard_share": float(hard.mean()) if len(part) else None,
                "llm_calls": int(part["llm_calls"].sum()),
                "llm_tokens": int((part["prompt_tokens"] + part["completion_tokens"]).sum()),
                "new_rows": rec.get("new_rows"), "replay_rows": rec.get("replay_rows"), "upto_seq": rec.get("upto_seq"),
                "train_s": rec.get("train_s"), "train_s_by_specialist": rec.get("train_s_by_specialist"),
                "train_restarts": rec.get("train_restarts") or {},
                "swap_s": rec.get("swap_s"), "rows_seen_at_start": rec.get("rows_seen_at_start"),
                "rows_seen_at_swap": rec.get("rows_seen_at_swap"),
                "rolled_back": rec.get("rolled_back", []), "failed": rec.get("failed"),
                "check": {k: v for k, v in (rec.get("check") or {}).items() if k != "reference_decisions"} or None,
                "versions": rec.get("versions"),
            }
            if "gold" in part.columns and part["gold"].notna().any():
                cons = part[(part["decided_by"] == "consensus") & part["gold"].notna()]
                row["consensus_accuracy"] = accuracy(cons["label"], cons["gold"]) if len(cons) else None
                g = part[part["gold"].notna()]
                row["accuracy"] = accuracy(g["label"], g["gold"])
            out.append(row)
        return {"config": self.cfg.model_dump(), "buffer_rows": len(self.buffer), "stages": out}


class StageGate:
    """What voting asks the stages before a batch: whether to wait (``stages.wait`` pauses voting while
    a stage trains) and which calibrated threshold goes with the specialist versions that voted
    (``voting.target_accuracy``: each stage publishes its threshold before its weights are swapped in).

    Run as a Ray actor (``ray.remote(num_cpus=0)(StageGate)``); async so waiters never block open/close.
    """

    def __init__(self):
        import asyncio

        self._open = asyncio.Event()
        self._open.set()
        self._thresholds: list[tuple[dict[str, str], float | None]] = []

    async def close(self) -> None:
        self._open.clear()

    async def open(self) -> None:
        self._open.set()

    async def wait(self) -> None:
        await self._open.wait()

    async def set_threshold(self, versions: dict[str, str], threshold: float | None, fitted: dict | None = None) -> None:
        self._thresholds = ([(v, t, st) for v, t, st in self._thresholds if v != versions]
                            + [(dict(versions), threshold, fitted)])

    async def threshold_for(self, versions: dict[str, str]) -> tuple[bool, float | None, dict | None]:
        return fits_for(self._thresholds, versions)


def fits_for(published: list[tuple[dict[str, str], float | None, dict | None]],
             versions: dict[str, str]) -> tuple[bool, float | None, dict | None]:
    """(known, threshold, fitted) for a batch voted by these specialist ``versions``, from the stages'
    ``published`` (versions, threshold, fitted), oldest first; ``fitted``: what else the stage's check fitted
    ({"stack": the stacked rule's weights, "combine": the controller's combination with the specialists}, None
    when neither). A batch voted while a swap rolls out mixes two stages' versions: it gets the stricter of their
    thresholds (None, settle nothing, is the strictest) and the newer stage's fits. (False, None, None) when no
    stage published one: use the configured threshold."""
    for v, t, st in published:
        if v == versions:
            return True, t, st
    related = [(t, st) for v, t, st in published if any(v.get(n) == ver for n, ver in versions.items())]
    if not related:
        return False, None, None
    strict = None if any(t is None for t, _ in related) else max(t for t, _ in related)
    return True, strict, related[-1][1]


def published_fits(records: list[dict]) -> list[tuple[dict[str, str], float | None, dict | None]]:
    """What each stage record publishes to the voters (``StageGate.set_threshold``): its versions, the threshold its
    check fitted and the fits that go with it; records whose check fitted no threshold publish nothing."""
    out: list[tuple[dict[str, str], float | None, dict | None]] = []
    for record in records:
        fit = (record.get("check") or {}).get("gate")
        if fit is None:
            continue
        fitted = {k: fit[k] for k in ("stack", "combine") if fit.get(k)}
        out = [e for e in out if e[0] != record["versions"]] + [(dict(record["versions"]), fit["threshold"],
                                                                 fitted or None)]
    return out


def _gate_text(fit: dict) -> str:
    if fit.get("kind") == "route":
        return routing_text(fit) + (f"; {combine_text(fit['combine'])}" if fit.get("combine") else "")
    if fit["threshold"] is None:
        return f"none reaches {fit['target_accuracy']:.0%} accuracy: every row goes to the controller"
    return (f"{fit['threshold']:.3f} (settles {fit['settled_share']:.0%} of them at {fit['accuracy']:.0%} "
            f"accuracy, target {fit['target_accuracy']:.0%})")
