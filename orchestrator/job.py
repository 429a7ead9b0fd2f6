"""The labelling job: stage -> seed -> train -> deploy -> Ray Data (vote -> controller) -> write.

Every input row is written exactly once. Output is written per input shard into
``<run_dir>/parts/`` as soon as a shard is complete, so a killed run resumes where it stopped:
staging, the seed set and trained checkpoints are reused, finished shards are skipped, and the
controller's cache makes re-asked rows free.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import pyarrow.parquet as pq

from labelwright.orchestrator.bootstrap import build_seed
from labelwright.orchestrator.budget import BUDGET_KEPT, BUDGET_SPENT, Budget, shared_budget
from labelwright.orchestrator.cost import token_cost
from labelwright.orchestrator.console import Progress, captured, say
from labelwright.orchestrator.dataset_io import StagedInput, stage_input, write_frame
from labelwright.orchestrator.estimate import estimate, summary_line
from labelwright.specialists.errors import ConfigError, ControllerError, InputDataError
from labelwright.orchestrator.report import (
    CONTROLLER_DECIDED, accuracy, build_report, publish_report, sent_to_llm,
)
from labelwright.orchestrator.review import REVIEWS_FILE, apply_reviews, reviews_as_gold
from labelwright.orchestrator.spec import TaskSpec
from labelwright.orchestrator.stages import (
    ControllerSettings, ControllerStage, LabelStage, VoteSettings, VoteStage, ask_again,
    combined_decision, demonstration_embeddings,
)


_log = say  # the job's lines: on the terminal, above the progress bar, and in the run's log file


def default_run_dir(output: Path) -> Path:
    return output.with_name(output.stem + ".run")


def _task_fingerprint(spec: TaskSpec, input_path: Path, limit: int | None, plan_path=None) -> dict:
    # Settings that may change between a run and its resume are left out (how, not what, to label).
    data = spec.model_dump(mode="json", exclude={"runtime", "budget", "stages"})
    data["controller"].pop("concurrency", None)
    data["controller"].pop("timeout_s", None)
    # Settings at their default are left out: runs started before the setting existed resume.
    if data["voting"].get("combine") == "auto":
        data["voting"].pop("combine")
    if data["controller"].get("gold_demonstrations") is True:
        data["controller"].pop("gold_demonstrations")
    if data.get("mode") == "pipeline":
        data.pop("mode")
        data.pop("active", None)
    out = {"input": str(input_path.resolve()), "limit": limit, "task": data}
    if plan_path is not None:
        out["plan"] = hashlib.sha1(Path(plan_path).read_bytes()).hexdigest() if Path(plan_path).is_file() else None
    return out


def _prepare_run_dir(run_dir: Path, fingerprint: dict, fresh: bool) -> None:
    if fresh and run_dir.exists():
        for path in run_dir.iterdir():  # all but the reviews people made (labelwright import-review): their work
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.name != REVIEWS_FILE:
                path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "task.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != fingerprint:
            raise ConfigError(
                f"run directory {run_dir} belongs to a different task or input; pass --fresh to start over "
                "there, or --run-dir to use another directory"
            )
    else:
        path.write_text(json.dumps(fingerprint, indent=1))


EMBEDDED_TIMEOUT_S = 600.0
# Each of the driver's encoders remembers up to this much of what it embedded (``remember_embeddings``): the seed,
# gold and reference rows are fitted, checked and routed on at every stage. 256 MB: 75k rows of a 0.5B LM's state.
DRIVER_EMBEDDING_MEMO_BYTES = 256 << 20

OUTPUT_FRONT = ["row", "id", "text", "label", "decided_by", "reason", "confidence", "specialists_label"]
OUTPUT_BACK = ["stage", "recheck_label", "controller_label", "controller_answer", "controller_confidence", "candidates", "prompt_tokens",
               "completion_tokens", "llm_calls", "cached", "seed", "reference", "note"]


def _order_columns(df: pd.DataFrame, specialists: list[str], passthrough: list[str]) -> pd.DataFrame:
    votes = [c for n in specialists for c in (f"vote_{n}", f"prob_{n}", f"version_{n}")]
    front = OUTPUT_FRONT + votes + OUTPUT_BACK + (["gold"] if "gold" in df.columns else [])
    rest = [c for c in df.columns if c not in front and c != "skip_reason"]
    return df[[c for c in front if c in df.columns] + rest]


def start_controller(spec: TaskSpec, log: Callable[[str], None] = _log):
    """The controller's config (URL filled in) and a checked :class:`Controller`; starts the embedded LLM
    on the connected Ray cluster when ``controller.base_url`` is unset."""
    from labelwright.orchestrator.controller import Controller

    controller_cfg = spec.controller
    if controller_cfg.base_url is None:
        from labelwright.cluster.embedded_llm import served_model, start_embedded_llm

        log(f"controller: starting the embedded LLM ({spec.embedded_llm.model}, backend "
            f"{spec.embedded_llm.backend}) on Ray Serve")
        base_url = start_embedded_llm(spec.embedded_llm)
        # The served name carries the precision the replica chose (model@bfloat16): the cache keys on it.
        update = {"base_url": base_url, "model": served_model(base_url) or spec.embedded_llm.model}
        if "timeout_s" not in controller_cfg.model_fields_set:
            # One CPU replica answers one request at a time: a queue of `concurrency` requests can
            # outwait a remote API's timeout, and a timed-out request is computed again on retry.
            update["timeout_s"] = EMBEDDED_TIMEOUT_S
        controller_cfg = controller_cfg.model_copy(update=update)
    log(f"controller: {controller_cfg.model} at {controller_cfg.base_url}")
    controller = Controller(controller_cfg, labels=spec.label_names, descriptions=spec.descriptions,
                            instruction=spec.instruction)
    controller.check_endpoint()
    return controller_cfg, controller


def annotate(
    input_path: str | Path,
    *,
    spec: TaskSpec,
    output: str | Path,
    run_dir: str | Path | None = None,
    report_path: str | Path | None = None,
    output_format: str | None = None,
    limit: int | None = None,
    fresh: bool = False,
    plan_path: str | Path | None = None,
    retry_unresolved: bool = False,
    log: Callable[[str], None] = _log,
    quiet: bool = False,
) -> dict:
    """Label every row of ``input_path``; write ``output`` (and ``report_path``); return the report.

    ``retry_unresolved``: rows an earlier run of this run directory left unresolved for a reason that may pass
    (the ``retryable`` column: endpoint failures, an exhausted budget) go through the pipeline again.

    The specialists come from ``plan_path`` (a plan file), else from the task's ``specialists`` list,
    else from a plan the controller makes now (``planning.mode``); the plan is saved next to the output.

    ``quiet`` (the CLI's default; ``--verbose`` turns it off): Ray's and the libraries' output goes to
    ``<run_dir>/logs/run.log`` instead of the terminal, which shows the job's own lines and its progress bar.
    """
    input_path, output = Path(input_path), Path(output)
    run_dir = Path(run_dir) if run_dir else default_run_dir(output)
    _prepare_run_dir(run_dir, _task_fingerprint(spec, input_path, limit, plan_path), fresh)
    from labelwright.specialists.encoder import remember_embeddings

    with captured(run_dir, enabled=quiet):
        _attempt_started(run_dir)
        remember_embeddings(DRIVER_EMBEDDING_MEMO_BYTES)
        try:
            report = _annotate(input_path, spec=spec, output=output, run_dir=run_dir, report_path=report_path,
                               output_format=output_format, limit=limit, plan_path=plan_path,
                               retry_unresolved=retry_unresolved, log=log)
        finally:
            remember_embeddings(0)  # the job's rows are not kept in the caller's process once it ends
        _attempt_ended(run_dir)
        return report


def _annotate(input_path: Path, *, spec: TaskSpec, output: Path, run_dir: Path, report_path, output_format,
              limit, plan_path, retry_unresolved: bool, log: Callable[[str], None]) -> dict:
    from ray.data import DataContext

    from labelwright.cluster import runtime
    from labelwright.cluster.deploy import delete_specialists, deploy_specialists
    from labelwright.specialists.encoder import shared_encoder
    from labelwright.training.stage import cross_fittable, train_stage

    t0 = time.monotonic()
    timings: dict[str, float] = {}
    log(f"run directory: {run_dir}")

    t = time.monotonic()
    staged = stage_input(
        input_path, run_dir=run_dir, text_column=spec.text_column, id_column=spec.id_column,
        gold_column=spec.gold_column, labels=spec.label_names, shard_rows=spec.runtime.shard_rows, limit=limit,
    )
    timings["stage_input"] = time.monotonic() - t
    log(f"input: {staged.n_rows} rows in {len(staged.shards)} shard(s)")
    log(summary_line(estimate([s.path for s in staged.shards], spec, text_column="text", zero_shot=False)))
    gold_file_rows = _read_gold_file(spec)  # now: a bad file is an error before any model is trained or paid for
    gold_file_rows, reviewed_rows = reviews_as_gold(gold_file_rows, run_dir, staged=staged, spec=spec, log=log,
                                                    resumed=bool(_finished(staged, run_dir / "parts")))

    info = runtime.connect(spec.runtime.address, num_cpus=spec.runtime.num_cpus)
    data = DataContext.get_current()
    data.enable_progress_bars = False  # the job prints its own progress
    # Ray Data 2.60's default parquet reader (V2) lists files with 32 footer-reading actors, a process each: to
    # read a few shards of our own it took 25 s of a 160-row labelling pass on 2 cores (16 s with V1's read tasks).
    data.use_datasource_v2 = False
    gpu = runtime.use_gpu(spec.runtime.use_gpu, info)
    log(f"ray: {info.nodes} node(s), {info.cpus:g} CPU, {info.gpus:g} GPU")

    t = time.monotonic()
    controller_cfg, controller = start_controller(spec, log)
    timings["start_controller"] = time.monotonic() - t
    if spec.mode == "active":
        from labelwright.orchestrator.active import annotate_active

        return annotate_active(staged, spec=spec, controller=controller, run_dir=run_dir, output=output,
                               output_format=output_format, report_path=report_path, gold_file_rows=gold_file_rows,
                               timings=timings, t0=t0, log=log)

    encoder = shared_encoder("minilm")
    t = time.monotonic()
    planned = _plan(spec, staged, controller, encoder, plan_path=plan_path, run_dir=run_dir, log=log)
    timings["plan"] = time.monotonic() - t
    if planned is not None:
        spec = planned.spec
    spec, cut = spec.within_budget()
    if cut:
        log(cut)
        if planned is not None:
            planned.spec = spec

    t = time.monotonic()
    seed = build_seed(staged, spec=spec, controller=controller, encoder=encoder, run_dir=run_dir, log=log)
    timings["seed"] = time.monotonic() - t
    if len(seed) == 0:
        first = next(iter(seed.answers.values()), {}).get("reason", "no answer")
        raise ControllerError(
            f"the controller labelled none of the seed rows (first reason: {first}); check controller.base_url "
            "and controller.model, or give labelled seed rows with seed.gold_file"
        )
    present = sorted(set(seed.labels))
    log(f"seed: {len(seed)} labelled rows covering {len(present)}/{len(spec.labels)} labels")

    t = time.monotonic()
    log("training specialists (stage 0)")
    checkpoints = train_stage(
        spec.specialists, seed.texts, seed.labels, label_names=spec.label_names, run_dir=run_dir, stage=0,
        train_workers=spec.runtime.train_workers, use_gpu=gpu, log=log,
    )
    timings["train"] = time.monotonic() - t
    if planned is not None:
        spec, checkpoints = planned.check(seed, checkpoints, output=output, log=log)

    app_prefix = "lw-" + hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]
    by_name = {c.name: c for c in spec.specialists}

    def swap(changed: dict[str, str]) -> None:
        deploy_specialists([by_name[n] for n in changed], changed, app_prefix=app_prefix, gpu=gpu)

    t = time.monotonic()
    reference = _reference(spec, staged, seed, checkpoints, controller_cfg, gold_file_rows, run_dir=run_dir, log=log)
    reference.exclude_rows |= reviewed_rows  # the rows people reviewed check the stages: never trained on
    timings["reference"] = time.monotonic() - t
    voting = spec.voting.resolved(measured=reference.measured,
                                  fallback=planned.plan.voting_rule if planned is not None else "unanimity")
    if voting.rule != spec.voting.rule:
        log(f"voting: rule {voting.rule} (voting.rule auto: "
            + ("learned on the reference rows)" if voting.rule == "stacked" else "no reference rows to learn it on)"))
        spec = spec.model_copy(update={"voting": voting})
    crossfit = reference.training_rows() if spec.stages.train_on_reference else ([], [])
    if crossfit[0]:
        t = time.monotonic()
        log(f"training specialists (stage 0) again with the {len(crossfit[0])} {reference.source} rows "
            "(stages.train_on_reference; the linear kinds, cross-fitted)")
        checkpoints = {**checkpoints, **train_stage(
            cross_fittable(spec.specialists), seed.texts, seed.labels, label_names=spec.label_names,
            run_dir=run_dir, stage=0, tag="reference", crossfit=crossfit, log=log)}
        timings["train"] += time.monotonic() - t
    gate = None
    if (spec.stages.enabled and spec.stages.wait) or _fits_threshold(spec, reference):
        from labelwright.orchestrator.learning import StageGate

        gate = runtime.beside_driver(StageGate)
    learning = _staged_learning(spec, staged, seed, checkpoints, reference, run_dir=run_dir,
                                train_s=timings["train"], gpu=gpu, swap=swap, gate=gate, log=log,
                                crossfit=crossfit if crossfit[0] else None)
    from labelwright.orchestrator.service import save_record

    asked = _controller_settings(spec, controller_cfg, seed, reference)  # the bank the hard rows are shown
    save_record(run_dir, spec=spec, controller=controller_cfg.model_dump(mode="json"),
                embedded=spec.controller.base_url is None, calibrated=_fits_threshold(spec, reference),
                demonstrations=(asked.demo_texts, asked.demo_labels, asked.demo_embeddings))
    t = time.monotonic()
    endpoints = deploy_specialists(spec.specialists, learning.deployed, app_prefix=app_prefix, gpu=gpu)
    timings["deploy"] = time.monotonic() - t
    log(f"specialists deployed on Serve (stage {learning.stage}): {', '.join(endpoints)}")
    try:
        return _label_and_report(
            spec, staged, endpoints, seed, controller_cfg, learning, reference,
            run_dir=run_dir, output=output, output_format=output_format, report_path=report_path,
            timings=timings, t0=t0, log=log, plan=planned.record() if planned is not None else None, gpu=gpu,
            retry_unresolved=retry_unresolved,
        )
    finally:
        learning.finish()
        delete_specialists(endpoints)  # free their resources; the embedded LLM stays up for the next job


class _Planned:
    """The plan a job runs: the task with the plan's specialists, and the sample check after the seed."""

    def __init__(self, spec: TaskSpec, plan, zoo, *, run_dir: Path, file: Path | None):
        from labelwright.orchestrator.plan import Plan

        self.plan: Plan = plan
        self.zoo = zoo
        self.run_dir = run_dir
        self.file = file
        self.bought_here = file is None  # asked of the controller for this run directory (not a --plan file)
        update = {"specialists": plan.specialist_configs(zoo, spec.descriptions)}
        if "voting" not in spec.model_fields_set:  # the task's own voting settings win over the plan's weights
            update["voting"] = spec.voting.model_copy(update={"weights": None})
        self.spec = spec.model_copy(update=update)
        self._apply_drops()

    def _apply_drops(self) -> None:
        dropped = set((self.plan.check or {}).get("dropped", []))
        if dropped:
            keep = [c for c in self.spec.specialists if c.name not in dropped]
            self.spec = self.spec.model_copy(update={"specialists": keep})

    def check(self, seed, checkpoints: dict[str, str], *, output: Path, log) -> tuple[TaskSpec, dict]:
        """Run the sample-driven check once (a resumed run reuses its record); save the plan. Returns the
        task without the dropped specialists, and their checkpoints."""
        from labelwright.orchestrator.plan import sample_check

        spec = self.spec
        if self.plan.check is None and spec.planning.check:
            _, self.plan.check = sample_check(
                self.plan, spec.specialists, checkpoints, self.zoo, texts=seed.texts, labels=seed.labels,
                label_names=spec.label_names, source=seed.source, cfg=spec.planning, log=log)
            self._apply_drops()
        self.plan.save(self.run_dir / "plan.yaml")
        self.file = self.file or self.plan.save(output.with_name(output.stem + ".plan.yaml"))
        names = {c.name for c in self.spec.specialists}
        return self.spec, {n: p for n, p in checkpoints.items() if n in names}

    def record(self) -> dict:
        return {"source": self.plan.source, "file": str(self.file), "specialists": [s.zoo_id for s in self.plan.specialists],
                "kept": [c.name for c in self.spec.specialists], "voting_rule": self.plan.voting_rule,
                "notes": self.plan.notes, "check": self.plan.check, "llm": self.plan.usage,
                "llm_in_budget": self.bought_here}


def _plan(spec: TaskSpec, staged: StagedInput, controller, encoder, *, plan_path, run_dir: Path, log) -> _Planned | None:
    """The plan for this run: ``plan_path``; the one a killed run saved; or a new one. None: no planning."""
    from labelwright.orchestrator.plan import load_plan, make_plan, validate_plan
    from labelwright.specialists.zoo import planning_zoo

    cfg = spec.planning
    wanted = cfg.mode == "always" or (cfg.mode == "auto" and "specialists" not in spec.model_fields_set)
    if plan_path is None and not wanted:
        return None
    zoo = planning_zoo(cfg)
    saved = run_dir / "plan.yaml"
    if plan_path is not None:
        plan = load_plan(plan_path)
        errors = validate_plan(plan, zoo, labels=spec.label_names, cfg=cfg)
        if errors:
            raise ConfigError(f"plan {plan_path} cannot run here:\n" + "\n".join(f"  - {e}" for e in errors))
        log(f"plan: {[s.zoo_id for s in plan.specialists]} from {plan_path}")
    elif saved.is_file():
        plan = load_plan(saved)
        log(f"plan: reusing {[s.zoo_id for s in plan.specialists]} from {saved}")
    else:
        samples = _sample_texts(staged, cfg.sample_rows)
        plan = make_plan(controller, zoo, labels=spec.label_names, descriptions=spec.descriptions,
                         instruction=spec.instruction, cfg=cfg, samples=samples, encode=encoder.encode, log=log)
        plan.save(saved)
    return _Planned(spec, plan, zoo, run_dir=run_dir, file=Path(plan_path) if plan_path else None)


def _sample_texts(staged: StagedInput, n: int) -> list[str]:
    """The first ``n`` votable texts of the input (shown to the planner as data)."""
    out: list[str] = []
    for shard in staged.shards:
        if len(out) >= n:
            break
        df = pd.read_parquet(shard.path, columns=["text", "skip_reason"])
        out += df[df["skip_reason"].isna()]["text"].head(n - len(out)).tolist()
    return out


def _controller_settings(spec, controller_cfg, seed, reference=None, **extra) -> ControllerSettings:
    """How the controller is asked about a row: the task's prompt, the seed rows as demonstrations (and the
    gold rows, once the reference has added them: ``Reference.demonstrations``)."""
    texts, labels, emb = (reference.demonstrations if reference is not None and reference.demonstrations
                          else (seed.texts, seed.labels, seed.embeddings))
    return ControllerSettings(
        controller=controller_cfg.model_dump(), labels=spec.label_names, descriptions=spec.descriptions,
        instruction=spec.instruction, demo_texts=texts, demo_labels=labels, demo_embeddings=emb, **extra)


def _read_gold_file(spec) -> pd.DataFrame | None:
    """The rows of ``voting.gold_file`` (None without one); a file without a labelled text is an error."""
    v = spec.voting
    if not v.gold_file:
        return None
    from labelwright.orchestrator.bootstrap import read_gold_file

    rows = read_gold_file(v.gold_file, text_column=v.gold_text_column, label_column=v.gold_label_column,
                          labels=spec.label_names, what="gold file")
    if rows.empty:
        raise InputDataError(f"gold file {v.gold_file} has no row with a text; give labelled rows or drop "
                             "voting.gold_file (--gold-file)")
    return rows


def _reference(spec, staged, seed, checkpoints, controller_cfg, gold_file_rows, *, run_dir, log):
    """The gold check rows (with a gold column) and the reference rows the controller answers up front."""
    from labelwright.orchestrator.reference import build_reference, gold_check_set
    from labelwright.training.stage import CheckSet

    exclude_ids, exclude_texts = set(map(str, seed.answers)), set(seed.texts)
    check, ids = CheckSet([], [], "gold", rows=[]), []
    if spec.gold_column and spec.stages.check_rows > 0:
        check, ids = gold_check_set(staged, size=spec.stages.check_rows, exclude_ids=exclude_ids,
                                    exclude_texts=exclude_texts)
        log(f"stages: {len(check)} gold rows held out to check each stage (never trained on)")
    return build_reference(staged, spec=spec, gold_check=check, gold_ids=ids, gold_file_rows=gold_file_rows,
                           controller=controller_cfg.model_dump(),
                           settings=_controller_settings(spec, controller_cfg, seed), checkpoints=checkpoints,
                           exclude_ids=exclude_ids, exclude_texts=exclude_texts, run_dir=run_dir, log=log)


def _fits_threshold(spec, reference) -> bool:
    """Whether the voters' threshold comes from the stages' fits (published through the StageGate)."""
    return spec.voting.target_accuracy is not None or (spec.voting.route == "measured" and reference.measured)


def _staged_learning(spec, staged, seed, checkpoints, reference, *, run_dir, train_s, gpu, swap, gate, log,
                     crossfit=None):
    from labelwright.orchestrator.learning import StagedLearning
    from labelwright.training.stage import CheckSet

    # No gold and no audit: each stage is checked on controller rows held out of the buffer instead.
    check = reference.check if reference.source != "none" or spec.gold_column else CheckSet([], [], "controller")
    return StagedLearning(spec, run_dir=run_dir, seed_texts=seed.texts, seed_labels=seed.labels, stage0=checkpoints,
                          stage0_train_s=train_s, check=check, exclude_rows=reference.exclude_rows,
                          total_rows=staged.n_rows, gpu=gpu, swap=swap, gate=gate, log=log, crossfit=crossfit)


def _label_and_report(spec, staged, endpoints, seed, controller_cfg, learning, reference, *, run_dir, output,
                      output_format, report_path, timings, t0, log, plan=None, gpu: bool = False,
                      retry_unresolved: bool = False) -> dict:
    import ray
    from ray.data import ActorPoolStrategy

    parts_dir = run_dir / "parts"
    parts_dir.mkdir(exist_ok=True)
    done_shards = _finished(staged, parts_dir)
    todo = [s for s in staged.shards if s.index not in done_shards]
    # what each question asked before labelling used (its calls and tokens): the seed's and the reference rows'
    # answers, and the plan's questions where they are paid from the budget too
    asked_up_front = [*seed.answers.values(), *reference.answers.values(), *reference.outside.values()]
    if plan and plan.get("llm_in_budget"):
        asked_up_front.append(plan.get("llm") or {})
    names = [s.name for s in spec.specialists]

    t = time.monotonic()
    vote = VoteSettings(labels=spec.label_names, endpoints=endpoints, rule=spec.voting.rule,
                        threshold=spec.voting.threshold, weights=spec.voting.weights,
                        calibrated=_fits_threshold(spec, reference),
                        max_chars=spec.runtime.max_vote_chars, candidates_k=controller_cfg.max_choices,
                        embeddings_of=demonstration_embeddings(controller_cfg.model_dump()))
    done_rows = sum(s.n_rows for s in staged.shards if s.index in done_shards)
    learning.rows_seen = learning.rows_at_last_stage = done_rows
    n_ctrl = spec.runtime.controller_actors

    spent_before: dict[str, int] = {}  # what the budget's ledger started from, for the report

    def label(ds, *, retry: bool = False):
        used_calls, prompt, completion = _usage_so_far(parts_dir, _finished(staged, parts_dir), asked_up_front)
        spent_before.setdefault("llm_calls", used_calls)
        spent_before.setdefault("llm_tokens", prompt + completion)
        budget = spec.budget
        seed_answers, reference_answers = seed.answers, reference.answers
        if retry:  # the failed answers bought up front: their spend is in the rows written the first time
            seed_answers = {k: a for k, a in seed_answers.items() if not ask_again(a)}
            reference_answers = {k: a for k, a in reference_answers.items() if not ask_again(a)}
        # What the finished shards and the answers asked up front have not spent: one ledger for every
        # controller actor. A retry asks its rows in order; a run spends the budget on the least confident hard rows.
        left = Budget(max_calls=_left(budget.max_llm_calls, used_calls), max_tokens=_left(budget.max_llm_tokens,
                      prompt + completion), max_cost_usd=_left(budget.max_cost_usd, token_cost(
                          prompt, completion, price_prompt_per_1k=controller_cfg.price_prompt_per_1k,
                          price_completion_per_1k=controller_cfg.price_completion_per_1k)),
                      price_prompt_per_1k=controller_cfg.price_prompt_per_1k,
                      price_completion_per_1k=controller_cfg.price_completion_per_1k,
                      rows_expected=None if retry else sum(s.n_rows for s in todo))
        ctrl = _controller_settings(
            spec, controller_cfg, seed, reference, seed_answers=seed_answers, reference_answers=reference_answers,
            budget=shared_budget(left, n_ctrl))
        # Blocks of one batch each (a streaming repartition): the driver sees every batch as soon as it is
        # labelled, which is what progress, the stage trigger and the swap act on.
        ds = ds.repartition(target_num_rows_per_block=spec.runtime.vote_batch_size)
        # Several batches at once in each controller actor (runtime.controller_batches), threads in one process.
        pool = ActorPoolStrategy(size=n_ctrl, max_concurrent_calls_per_actor=spec.runtime.controller_batches,
                                 enable_true_multi_threading=True)
        if spec.stages.enabled:
            # One operator, so rows are voted just before they are routed (see LabelStage).
            return ds.map_batches(LabelStage, fn_constructor_args=(vote, ctrl, learning.gate), batch_format="pandas",
                                  batch_size=spec.runtime.vote_batch_size, num_cpus=0.5, compute=pool)
        ds = ds.map_batches(VoteStage, fn_constructor_args=(vote, learning.gate), batch_format="pandas",
                            batch_size=spec.runtime.vote_batch_size, num_cpus=0.5,
                            compute=ActorPoolStrategy(size=spec.runtime.vote_actors))
        return ds.map_batches(ControllerStage, fn_constructor_args=(ctrl,), batch_format="pandas",
                              batch_size=spec.runtime.vote_batch_size, num_cpus=0.25, compute=pool)

    if todo:
        if done_shards:
            log(f"resuming: {len(done_shards)} shard(s) already labelled, {len(todo)} to go")
        # One read task per shard: left to itself, Ray Data reads small inputs as one block.
        ds = ray.data.read_parquet([str(s.path) for s in todo], override_num_blocks=len(todo))
        _write_parts(label(ds), staged, todo, parts_dir, done_rows=done_rows, learning=learning, log=log)
    retried = None
    if retry_unresolved:
        retried = _retry_unresolved([s for s in staged.shards if s.index in done_shards], parts_dir, label, log)
    learning.finish()
    label_s = time.monotonic() - t
    timings["label"] = label_s

    df = pd.concat([pd.read_parquet(parts_dir / f"part-{s.index:05d}.parquet") for s in staged.shards],
                   ignore_index=True).sort_values("row", kind="stable").reset_index(drop=True)
    if len(df) != staged.n_rows or df["row"].duplicated().any():
        raise InputDataError(f"internal check failed: {len(df)} output rows for {staged.n_rows} input rows")
    df["stage"] = learning.row_stages(df, names)
    stages_report = learning.report(df)
    extra = {}
    if spec.controller.mode == "candidates":
        from labelwright.orchestrator.candidates import decide_with_student

        t = time.monotonic()
        df, extra["candidates"] = decide_with_student(df, spec, run_dir=run_dir, gpu=gpu, log=log)
        timings["distill"] = time.monotonic() - t
    if spec.stages.recheck:
        df, stages_report["recheck"] = _recheck(df, vote, learning.stage, spec.runtime.vote_batch_size, log,
                                                gate=learning.gate)
    if spec.stages.final_vote and learning.check.source == "gold" and vote.calibrated and learning.gate is not None:
        df, stages_report["final_vote"] = _final_vote(df, vote, learning, names, spec.runtime.vote_batch_size, log)
    decided_reference = None
    if spec.stages.final_vote and (decisions := learning.reference_decisions()):
        df, decided_reference = _decide_reference_rows(df, decisions, learning.stage, log)
    df, reviews = apply_reviews(df, run_dir, log=log)
    df = _order_columns(df, names, staged.passthrough)
    write_frame(df, output, output_format)
    wall = time.monotonic() - t0
    report = build_report(
        df, labels=spec.label_names, specialists=names, rows_in=staged.n_rows, wall_s=wall, label_s=label_s,
        price_prompt_per_1k=controller_cfg.price_prompt_per_1k,
        price_completion_per_1k=controller_cfg.price_completion_per_1k, timings=timings,
        human_cost_per_row=spec.budget.human_cost_per_row,
        extra={"controller": {"model": controller_cfg.model, "base_url": controller_cfg.base_url},
               "seed": {"rows": len(seed), "source": seed.source, "from_input": not spec.seed.pool_file,
                        **seed.usage()},
               "reference": {**reference.usage(), "trained_on": len(learning.crossfit[0]) if learning.crossfit else 0,
                             **({"decided": decided_reference} if decided_reference else {})},
               "specialists": {n: learning.deployed[n] for n in names},
               "voting": spec.voting.model_dump(), "output": str(output), "run_dir": str(run_dir),
               "resumed_shards": len(done_shards), "attempts": _attempt_ended(run_dir),
               "stages": stages_report, "plan": plan,
               "budget": {**_budget_block(df, spec), "spent_before_labelling": spent_before or None},
               **({"retried": retried} if retried is not None else {}),
               **({"reviews": reviews} if reviews is not None else {}), **extra},
    )
    from labelwright.orchestrator.report import plot_stages

    base = Path(report_path) if report_path else output
    plot = plot_stages(stages_report, base.with_name(base.stem + ".stages.png"))
    report["stages"]["plot"] = str(plot)
    return publish_report(report, report_path=report_path, output=output, log=log, frame=df)


def _budget_block(df: pd.DataFrame, spec) -> dict:
    """The budgets set, and the rows they left unresolved (retryable: a re-run with more budget asks them)."""
    reasons = df["reason"].fillna("").astype(str)
    past = reasons.str.startswith(BUDGET_SPENT)
    kept = reasons.str.startswith(BUDGET_KEPT)
    return {**spec.budget.model_dump(), "rows_past_budget": int(past.sum()),
            "rows_kept_for_less_confident": int(kept.sum())}


ATTEMPTS_FILE = "attempts.json"


def _attempts(run_dir: Path) -> dict:
    path = run_dir / ATTEMPTS_FILE
    old = json.loads(path.read_text()) if path.is_file() else {}
    return {"attempts": 0, "ended": 0, "interrupted": 0, "rows_revoted": 0, "in_flight": 0, **old}


def _save_attempts(run_dir: Path, state: dict) -> None:
    tmp = run_dir / (ATTEMPTS_FILE + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(run_dir / ATTEMPTS_FILE)


def _attempt_started(run_dir: Path) -> None:
    """One more attempt at this run directory. The rows the last one labelled but had not yet written when it
    stopped (a kill) are lost with it and voted again by this one: counted."""
    state = _attempts(run_dir)
    state.update(attempts=state["attempts"] + 1, interrupted=state["interrupted"] + (state["ended"] < state["attempts"]),
                 rows_revoted=state["rows_revoted"] + state["in_flight"], in_flight=0)
    _save_attempts(run_dir, state)


def _rows_in_flight(run_dir: Path, rows: int) -> None:
    """Rows labelled by this attempt and not yet in a written part (a kill now would lose them)."""
    _save_attempts(run_dir, {**_attempts(run_dir), "in_flight": rows})


def _attempt_ended(run_dir: Path) -> dict:
    """This attempt ran to its end; what the report says of the attempts so far (``attempts``)."""
    state = _attempts(run_dir)
    state.update(ended=state["attempts"], in_flight=0)
    _save_attempts(run_dir, state)
    return {k: state[k] for k in ("attempts", "interrupted", "rows_revoted")}


def _finished(staged: StagedInput, parts_dir: Path) -> set[int]:
    return {s.index for s in staged.shards if (parts_dir / f"part-{s.index:05d}.parquet").is_file()}


def _left(limit: int | float | None, used: int | float) -> int | float | None:
    """What is left of a budget (calls, tokens or dollars); None: no limit."""
    return None if limit is None else max(0, limit - used)


def _usage_so_far(parts_dir: Path, done: set[int], asked_up_front: list[dict]) -> tuple[int, int, int]:
    """LLM calls, prompt and completion tokens spent so far: the finished shards' rows (seed and reference rows
    left out), and ``asked_up_front``, the usage (``calls``, ``prompt_tokens``, ``completion_tokens``) of each
    question asked before labelling."""
    calls = prompt = completion = 0
    for idx in done:
        path = parts_dir / f"part-{idx:05d}.parquet"
        flags = [c for c in ("seed", "reference") if c in pq.read_schema(path).names]  # parts of 0.1 have no reference
        p = pd.read_parquet(path, columns=["llm_calls", "prompt_tokens", "completion_tokens", *flags])
        p = p[~p[flags].astype(bool).any(axis=1)]
        calls += int(p["llm_calls"].sum())
        prompt += int(p["prompt_tokens"].sum())
        completion += int(p["completion_tokens"].sum())
    for a in asked_up_front:
        calls += int(a.get("calls") or 0)
        prompt += int(a.get("prompt_tokens") or 0)
        completion += int(a.get("completion_tokens") or 0)
    return calls, prompt, completion


def _revote(rows: pd.DataFrame, vote: VoteSettings, batch_size: int, gate=None) -> pd.DataFrame:
    """``rows`` voted again by the deployed specialists (the vote stage's columns), on the same index."""
    voter = VoteStage(dataclasses.replace(vote, embeddings_of=None), gate)  # no controller asks about these
    parts = [voter(rows.iloc[start:start + batch_size][["text", "skip_reason"]].copy())
             for start in range(0, len(rows), batch_size)]
    return pd.concat(parts, ignore_index=True).set_axis(rows.index)


def _recheck(df: pd.DataFrame, vote: VoteSettings, stage: int, batch_size: int, log,
             gate=None) -> tuple[pd.DataFrame, dict]:
    """Re-vote rows settled by consensus before the last stage with the final specialists. The answer
    goes to ``recheck_label`` (None where the rows are now hard) and the report; ``label`` is kept."""
    old = df[(df["decided_by"] == "consensus") & (df["stage"] < stage) & ~df["seed"].astype(bool)]
    df = df.assign(recheck_label=None)
    if old.empty:
        return df, {"rows": 0, "changed": 0, "now_hard": 0}
    part = _revote(old, vote, batch_size, gate)
    labels = [None if h else lab for h, lab in zip(part["hard"], part["specialists_label"])]
    df.loc[old.index, "recheck_label"] = pd.Series(labels, index=old.index, dtype=object)
    new = df.loc[old.index, "recheck_label"]
    changed = new.notna() & (new != old["label"])
    out = {"rows": int(len(old)), "changed": int(changed.sum()), "now_hard": int(new.isna().sum())}
    if "gold" in df.columns and old["gold"].notna().any():
        c = old[changed & old["gold"].notna()]
        out["changed_gold_rows"] = int(len(c))
        out["accuracy_kept_label"] = accuracy(c["label"], c["gold"]) if len(c) else None
        out["accuracy_recheck_label"] = accuracy(new[c.index], c["gold"]) if len(c) else None
    log(f"recheck: {out['rows']} earlier consensus rows re-voted by stage {stage}: {out['changed']} would change, "
        f"{out['now_hard']} are now hard (reported in recheck_label, not applied)")
    return df, out


def _retry_unresolved(shards, parts_dir: Path, label, log) -> dict:
    """Ask again the rows of the finished ``shards`` left unresolved for a reason that may pass, through the
    same pipeline (``label``); each shard's part is rewritten with the new rows in place of the old, their
    LLM calls and tokens added to those already spent. A kill part-way leaves the parts as they were
    (answers bought are in the controller's cache, where it is on)."""
    import ray

    parts, inputs = {}, []
    for s in shards:
        part = pd.read_parquet(parts_dir / f"part-{s.index:05d}.parquet")
        retry = part["retryable"].fillna(False).astype(bool) if "retryable" in part.columns else False
        rows = part.loc[(part["decided_by"] == "unresolved") & retry, "row"]
        if len(rows):
            parts[s.index] = part
            staged = pd.read_parquet(s.path)
            inputs.append(staged[staged["row"].isin(rows)])
    out = {"rows": int(sum(len(i) for i in inputs)), "resolved": 0, "still_unresolved": 0}
    if not inputs:
        log("retry: no row of the earlier runs was left unresolved for a transient reason")
        return out
    log(f"retry: asking again {out['rows']} row(s) left unresolved by endpoint failures or the budget")
    new = pd.concat(list(label(ray.data.from_pandas(pd.concat(inputs, ignore_index=True)), retry=True)
                         .iter_batches(batch_format="pandas", batch_size=None)), ignore_index=True)
    if len(new) != out["rows"] or new["row"].duplicated().any():
        raise InputDataError(f"internal check failed: {len(new)} rows came back from a retry of {out['rows']}")
    new = new.set_index("row", drop=False)
    for idx, part in parts.items():
        again = new[new["row"].isin(part["row"])]
        old = part.set_index("row", drop=False).loc[again.index]
        again = again.assign(**{c: again[c] + old[c] for c in ("llm_calls", "prompt_tokens", "completion_tokens")})
        merged = pd.concat([part[~part["row"].isin(again.index)], again[part.columns]], ignore_index=True)
        write_frame(merged.sort_values("row").reset_index(drop=True), parts_dir / f"part-{idx:05d}.parquet",
                    "parquet")
    still = int((new["decided_by"] == "unresolved").sum())
    out.update(resolved=out["rows"] - still, still_unresolved=still)
    log(f"retry: {out['resolved']} of {out['rows']} row(s) resolved, {still} still unresolved (see reason)")
    return out


def _write_parts(ds, staged: StagedInput, todo, parts_dir: Path, *, done_rows: int, learning, log) -> None:
    starts = [s.first_row for s in staged.shards]
    expected = {s.index: s.n_rows for s in todo}
    buffers: dict[int, list[pd.DataFrame]] = {i: [] for i in expected}
    have = {i: 0 for i in expected}
    budget_said = False
    in_flight = 0
    with Progress(staged.n_rows, done_rows) as progress:
        for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
            shard_of = [bisect.bisect_right(starts, r) - 1 for r in batch["row"]]
            batch = batch.assign(_shard=shard_of)
            for idx, part in batch.groupby("_shard"):
                buffers[idx].append(part.drop(columns="_shard"))
                have[idx] += len(part)
                if have[idx] > expected[idx]:
                    raise InputDataError(f"internal check failed: shard {idx} produced {have[idx]} rows, "
                                         f"expected {expected[idx]}")
                if have[idx] == expected[idx]:
                    out = pd.concat(buffers.pop(idx), ignore_index=True).sort_values("row")
                    write_frame(out, parts_dir / f"part-{idx:05d}.parquet", "parquet")
            if (now := sum(have[i] for i in buffers)) != in_flight:  # the file is touched only when it changes
                in_flight = now
                _rows_in_flight(parts_dir.parent, in_flight)
            learning.observe(batch)
            if not budget_said and (spent := batch["reason"].astype(str).str.startswith(BUDGET_SPENT)).any():
                budget_said = True
                log(f"budget reached: {batch['reason'][spent].iloc[0]}; the rows past it stay unresolved "
                    "(retryable: raise the budget and run again with --retry-unresolved)")
            progress.update(len(batch), int(sent_to_llm(batch).sum()), stage=learning.stage)
    missing = [i for i in expected if i in buffers]
    if missing:
        raise InputDataError(f"internal check failed: shards {missing} did not complete")


def _decide_reference_rows(df: pd.DataFrame, decisions: dict, stage: int, log) -> tuple[pd.DataFrame, dict]:
    """The gold reference rows of the input are decided like the rows around them, out of fold: by the last
    stage's routing (the specialists' label where it settles the row) and its combination, each row judged by
    models fitted without it (``voting.reference_decisions``). Until now they kept the controller's answer,
    though the run had just measured that on such rows the specialists or the combination do better. A row's
    gold label is never its output label; rows the controller failed on stay unresolved."""
    at = {r: j for j, r in enumerate(decisions["row"]) if r is not None}
    mask = df["reference"].astype(bool) & df["row"].isin(list(at)) & df["controller_label"].notna()
    mask &= df["decided_by"].isin(CONTROLLER_DECIDED)
    idx = df.index[mask]
    out = {"stage": stage, "rows": int(len(idx)), "changed": 0, "decided_by": {}}
    if not len(idx):
        return df, out
    before = df.loc[idx, "label"].copy()
    pick = [at[int(r)] for r in df.loc[idx, "row"]]
    keep = [decisions["label"][j] is not None for j in pick]
    idx, pick = idx[keep], [j for j, k in zip(pick, keep) if k]
    df.loc[idx, "label"] = [decisions["label"][j] for j in pick]
    df.loc[idx, "decided_by"] = [decisions["decided_by"][j] for j in pick]
    conf = [decisions["confidence"][j] for j in pick]
    df.loc[idx, "confidence"] = [c if c is not None else df.at[i, "controller_confidence"] for i, c in zip(idx, conf)]
    changed = df.loc[idx, "label"] != before.loc[idx]
    out.update(changed=int(changed.sum()),
               decided_by={k: int(v) for k, v in df.loc[idx, "decided_by"].value_counts().items()})
    if "gold" in df.columns and df.loc[idx, "gold"].notna().any():
        g = idx[df.loc[idx, "gold"].notna().to_numpy()]
        out.update(accuracy_before=accuracy(before.loc[g], df.loc[g, "gold"]),
                   accuracy_after=accuracy(df.loc[g, "label"], df.loc[g, "gold"]))
    log(f"reference rows: {out['rows']} gold rows the controller answered up front decided like the others, out of "
        f"fold, by stage {stage}: {out['decided_by']}; {out['changed']} labels changed"
        + (f" (right {out['accuracy_after']:.1%} after, {out['accuracy_before']:.1%} before)"
           if "accuracy_after" in out else ""))
    return df, out


def _final_vote(df: pd.DataFrame, vote: VoteSettings, learning, names: list[str], batch_size: int,
                log) -> tuple[pd.DataFrame, dict]:
    """The controller's rows voted before the last stage, which its specialists never trained on, decided again
    by that stage: its routing measured the specialists on the gold reference rows, so where it settles a row
    their label is the better bet than the controller's (``decided_by: specialists``), and on the rows it leaves
    to the controller its combination, where that pays, decides (``combined``); elsewhere the controller's answer
    stands. Seed and reference rows keep theirs; rows the specialists trained on are left alone (they learned
    the controller's answers there, so their votes say nothing new). The votes written are the final ones."""
    stage = learning.stage
    trained = learning.trained_rows()
    reference = df["reference"].astype(bool) if "reference" in df.columns else False
    mask = (df["decided_by"].isin(CONTROLLER_DECIDED) & df["controller_label"].notna()
            & (df["stage"] < stage).fillna(False).astype(bool) & ~df["seed"].astype(bool) & ~reference
            & ~df["row"].isin(trained))
    rows = df[mask]
    out = {"stage": stage, "rows": int(len(rows)), "trained_rows_left": int(df["row"].isin(trained).sum()),
           "settled": 0, "changed": 0, "decided_by": {}}
    if rows.empty:
        return df, out
    votes = _revote(rows, vote, batch_size, learning.gate)
    before = rows["label"]
    for col in [c for n in names for c in (f"vote_{n}", f"prob_{n}", f"version_{n}")] + ["specialists_label"]:
        df.loc[rows.index, col] = votes[col]
    decided = {}
    for i in rows.index:
        answer, conf = df.at[i, "controller_label"], df.at[i, "controller_confidence"]
        label, who, p = answer, "controller", conf
        if not votes.at[i, "hard"]:
            label, who, p = votes.at[i, "specialists_label"], "specialists", votes.at[i, "vote_confidence"]
        elif votes.at[i, "combine_logits"] is not None:
            label, p = combined_decision(votes.at[i, "combine_logits"], votes.at[i, "combine_weight"], answer, conf,
                                         vote.labels)
            who = "combined"
        if label == answer:
            label, who, p = answer, "controller", conf
        decided[i] = (label, who, p)
    df.loc[rows.index, "label"] = [decided[i][0] for i in rows.index]
    df.loc[rows.index, "decided_by"] = [decided[i][1] for i in rows.index]
    df.loc[rows.index, "confidence"] = [decided[i][2] for i in rows.index]
    df["stage"] = learning.row_stages(df, names)
    changed = df.loc[rows.index, "label"] != before
    out.update(settled=int((~votes["hard"].astype(bool)).sum()), changed=int(changed.sum()),
               decided_by={k: int(v) for k, v in df.loc[rows.index[changed], "decided_by"].value_counts().items()})
    if "gold" in df.columns:
        g = rows.index[changed & df.loc[rows.index, "gold"].notna()]
        if len(g):
            out.update(gold_rows=int(len(g)), accuracy_before=accuracy(before[g], df.loc[g, "gold"]),
                       accuracy_after=accuracy(df.loc[g, "label"], df.loc[g, "gold"]))
    log(f"final vote: {out['rows']} of the controller's rows voted before stage {stage}, never trained on, were "
        f"voted again by stage {stage}: {out['settled']} settled by its routing, {out['changed']} labels changed"
        + (f" (right {out['accuracy_after']:.1%} after, {out['accuracy_before']:.1%} before, on {out['gold_rows']} "
           "of them with gold)" if out.get("gold_rows") else "")
        + f"; {out['trained_rows_left']} rows the specialists trained on keep their label")
    return df, out
