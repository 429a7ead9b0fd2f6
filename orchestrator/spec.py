"""The task spec: what to label, with what, under which budgets. One config system, pydantic.

Loaded from a YAML or JSON file (``--task``) and/or CLI flags; flags override the file. Validation
errors name the field and say what to do (see :func:`load_task`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from labelwright.cluster.embedded_llm import EmbeddedLLMConfig
from labelwright.orchestrator.controller import ControllerConfig
from labelwright.orchestrator.voting import RULES
from labelwright.specialists.base import SpecialistConfig
from labelwright.specialists.config_files import error_lines, read_config_file
from labelwright.specialists.errors import ConfigError
from labelwright.training.distill import Refinery


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LabelSpec(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None  # a verbalisation shown to the controller

    @field_validator("name")
    @classmethod
    def _clean(cls, v: str) -> str:
        if v != v.strip() or not v.strip():
            raise ValueError(f"label {v!r} has leading/trailing whitespace or is blank; write it trimmed")
        return v


class VotingConfig(_Strict):
    # auto: stacked (a conditional logit over the specialists, fitted on the reference rows) when the run has
    # reference rows the controller answered, else the plan's rule or unanimity
    rule: str = "auto"
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)  # None = the rule's own default
    weights: dict[str, float] | None = None  # per specialist name; default equal
    # measured: fit the threshold at every stage on reference rows, the rows the controller is asked about
    # up front (random gold rows, else a random audit sample): the lowest one whose settled rows are shown
    # to lose at most `max_loss` accuracy against the controller on those same rows. threshold: the rule's
    # `threshold`, or the point calibration to `target_accuracy` (no bound).
    route: Literal["measured", "threshold"] = "measured"
    reference_rows: int = Field(default=150, ge=0)  # rows the controller answers up front; 0: no reference rows
    gold_file: str | None = None  # labelled reference rows (text, label columns), in place of the input's own
    gold_text_column: str = "text"
    gold_label_column: str = "label"
    max_loss: float = Field(default=0.02, ge=0.0, le=1.0)
    confidence_level: float = Field(default=0.95, gt=0.5, lt=1.0)  # of the one-sided bounds
    bound: Literal["wilson", "clopper_pearson"] = "wilson"
    # With route measured: the settled rows' lower bound must reach this accuracy instead (against gold, or
    # against the controller's audit answers). With route threshold: the point calibration's target.
    target_accuracy: float | None = Field(default=None, gt=0.0, le=1.0)
    # auto: with gold reference rows, a stacked combination of the controller's answer (and its logprob
    # confidence) with the specialists' probabilities decides the rows the controller answers, where on those
    # reference rows (out of fold) it won more rows from the controller than it lost; never: the controller's
    # answer stands.
    combine: Literal["auto", "never"] = "auto"

    @field_validator("rule")
    @classmethod
    def _known(cls, v: str) -> str:
        if v != "auto" and v not in RULES:
            raise ValueError(f"unknown voting rule {v!r}; choose auto or one of {sorted(RULES)}")
        return v

    def resolved(self, *, measured: bool, fallback: str = "unanimity") -> "VotingConfig":
        """This config with ``rule: auto`` made a rule: stacked when reference rows were ``measured`` (the
        controller answered some), else ``fallback`` (a plan's rule, or unanimity)."""
        if self.rule != "auto":
            return self
        return self.model_copy(update={"rule": "stacked" if measured and self.route == "measured" else fallback})


# With budget.max_llm_calls in pipeline mode, the seed and the reference rows (asked up front) may take at most this
# share of it; the rest is for the hard rows (TaskSpec.within_budget).
UPFRONT_BUDGET_SHARE = 0.5


# What people would be paid to label a row, for the report's comparison: three Mechanical Turk workers a row (a
# majority of three) at $0.012 each, the lowest price per worker SageMaker Ground Truth accepts for a text
# classification task (AWS API reference, PublicWorkforceTaskPrice); Ground Truth's own fee per object is extra.
HUMAN_COST_PER_ROW = 0.036  # 3 x 0.012


class BudgetConfig(_Strict):
    max_llm_calls: int | None = Field(default=None, ge=0)  # rows past it are unresolved, never guessed
    max_llm_tokens: int | None = Field(default=None, ge=0)
    max_cost_usd: float | None = Field(default=None, ge=0)  # at controller.price_*_per_1k; pipeline mode
    human_cost_per_row: float = Field(default=HUMAN_COST_PER_ROW, ge=0)  # USD; the report's cost against people


class SeedConfig(_Strict):
    size: int | None = Field(default=None, ge=1)  # None: 8 per label, clamped to [64, 512]
    pool_size: int = Field(default=3000, ge=1)  # rows embedded for k-means seed selection
    gold_file: str | None = None  # labelled seed file (CSV/JSONL/Parquet): used instead of the controller
    pool_file: str | None = None  # pick the seed from this file's texts (same text column) instead of the input
    gold_text_column: str = "text"
    gold_label_column: str = "label"

    def resolved_size(self, n_labels: int) -> int:
        return self.size if self.size is not None else max(64, min(512, 8 * n_labels))


class RuntimeConfig(_Strict):
    address: str | None = None  # None: start a local Ray cluster; "auto" or ray://... to join one
    num_cpus: int | None = None  # logical CPUs for a local cluster (None: cores + headroom)
    # Only with stages off (with stages on, voting runs in the controller actors). Two, so one batch is in a
    # specialist while the other is packed and unpacked: 52 -> 72 rows/s at 10,000 rows on 2 cores (README, Scale).
    vote_actors: int = Field(default=2, ge=1)
    vote_batch_size: int = Field(default=128, ge=1)
    controller_actors: int = Field(default=1, ge=1)
    # batches each controller actor works on at once: a batch held up by one row's retries or a hung request
    # holds up no other (its requests still share controller.concurrency)
    controller_batches: int = Field(default=4, ge=1)
    shard_rows: int = Field(default=1000, ge=1)  # rows per staged input shard (a resume unit)
    train_workers: int = Field(default=1, ge=1)
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    max_vote_chars: int = Field(default=20000, ge=100)  # specialists see at most this many characters


class StagesConfig(_Strict):
    """Staged fine-tuning while the job runs: the controller's answers teach the specialists."""

    enabled: bool = True
    every_rows: int | None = Field(default=200, ge=1)  # new controller-settled rows that start a stage
    every_fraction: float | None = Field(default=None, gt=0, le=1)  # ... or this fraction of the rows seen
    max_stages: int | None = Field(default=None, ge=0)
    replay_ratio: float = Field(default=1.0, ge=0)  # earlier rows replayed per new row (transformers)
    wait: bool = False  # True: voting pauses while a stage trains; False: it goes on with the old version
    check_rows: int = Field(default=300, ge=0)  # held-out gold rows that check each stage (at most 1/4 of them)
    validation_fraction: float = Field(default=0.15, ge=0, lt=1)  # controller rows held out when there is no gold
    min_check_rows: int = Field(default=20, ge=1)  # fewer held-out rows than this: a stage is accepted unchecked
    rollback_tolerance: float = Field(default=0.01, ge=0, le=1)  # accuracy a stage may lose before rollback
    recheck: bool = False  # re-vote earlier consensus rows with the final specialists; report changes
    # with gold reference rows: the controller's rows the final specialists never trained on are decided again
    # by the last stage's routing and combination (the controller's answer stays in controller_label)
    final_vote: bool = True
    # the reference rows' labels (gold, a gold file's, or the audit's answers) also train the specialists that fit
    # in seconds (linear kinds), cross-fitted: each reference row is judged by a fold model that never saw it
    train_on_reference: bool = True

    @model_validator(mode="after")
    def _some_trigger(self) -> "StagesConfig":
        if self.enabled and self.every_rows is None and self.every_fraction is None:
            raise ValueError("stages.enabled needs stages.every_rows or stages.every_fraction; set one")
        return self


class PlanningConfig(_Strict):
    """How the controller plans the job: which specialists from the zoo, with which label maps."""

    mode: Literal["auto", "always", "never"] = "auto"  # auto: plan unless the task lists its specialists
    planner: Literal["controller", "similarity"] = "controller"  # similarity: the deterministic choice, no LLM
    zoo_files: list[str] = Field(default_factory=list)  # extra catalogue files, after the shipped one
    zoo: list[dict[str, Any]] = Field(default_factory=list)  # extra catalogue entries inline
    model_dirs: list[str] = Field(default_factory=list)  # the only folders a zoo entry's local model may be in
    specialists: int = Field(default=3, ge=1, le=8)  # how many the planner is asked to choose
    min_specialists: int = Field(default=2, ge=1)
    max_specialists: int = Field(default=4, ge=1)
    allow_hub: bool = False  # True: entries not in the local cache may be chosen (the hub must be reachable)
    max_params_m: float = Field(default=150.0, gt=0)  # larger models are left out of plans
    language: str = "en"  # entries must list it (or multilingual)
    sample_rows: int = Field(default=5, ge=0, le=20)  # input texts shown to the planner, fenced as data
    check: bool = True  # drop untrained specialists that disagree with the controller on the seed rows
    min_agreement: float | None = Field(default=None, ge=0, le=1)  # None: beat the seed's majority-label share
    max_tokens: int = Field(default=600, ge=64)  # for the planner's answer

    @model_validator(mode="after")
    def _bounds(self) -> "PlanningConfig":
        if not self.min_specialists <= self.specialists <= self.max_specialists:
            raise ValueError(
                f"need min_specialists ({self.min_specialists}) <= specialists ({self.specialists}) <= "
                f"max_specialists ({self.max_specialists}); adjust them"
            )
        return self


class DistillConfig(_Strict):
    """The student of candidate annotation (``controller.mode: candidates``), distilled on Ray Train."""

    student: SpecialistConfig = Field(
        default_factory=lambda: SpecialistConfig(name="student", kind="transformer_classifier"))
    refinery: Refinery = Field(default_factory=Refinery)
    min_rows: int = Field(default=32, ge=1)  # fewer settled rows: no student; the first candidate stands

    @field_validator("student")
    @classmethod
    def _trainable(cls, value: SpecialistConfig) -> SpecialistConfig:
        if value.kind != "transformer_classifier":
            raise ValueError(f"the student is distilled with a neural training loop; kind {value.kind!r} cannot be: "
                             "give kind: transformer_classifier")
        return value


class ActiveConfig(_Strict):
    """Active annotation (``mode: active``): which rows the controller labels, in rounds, under budget.max_llm_calls."""

    acquisition: Literal["random", "entropy", "least_confidence", "margin", "kmeans", "kcenter", "hybrid"] = "hybrid"
    rounds: int | None = Field(default=8, ge=1)  # the budget split evenly over this many rounds (the first: a seed)
    batch_per_round: int | None = Field(default=None, ge=1)  # instead of rounds: rows bought per round
    stop_kappa: float | None = Field(default=None, gt=-1.0, le=1.0)  # predictions this stable: the rounds stop
    reweight: bool = False  # learning to reweight (Ren et al. 2018) against a gold file, else the first round


def _default_specialists() -> list[SpecialistConfig]:
    return [
        SpecialistConfig(name="tfidf", kind="tfidf_linear"),
        SpecialistConfig(name="minilm_probe", kind="embedding_linear"),
        SpecialistConfig(name="minilm_ft", kind="transformer_classifier"),
    ]


class TaskSpec(_Strict):
    labels: list[LabelSpec]
    instruction: str = "Classify the text into exactly one of the labels."
    text_column: str = "text"
    id_column: str | None = None
    gold_column: str | None = None
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    voting: VotingConfig = Field(default_factory=VotingConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    seed: SeedConfig = Field(default_factory=SeedConfig)
    specialists: list[SpecialistConfig] = Field(default_factory=_default_specialists)
    stages: StagesConfig = Field(default_factory=StagesConfig)
    planning: PlanningConfig = Field(default_factory=PlanningConfig)
    embedded_llm: EmbeddedLLMConfig = Field(default_factory=EmbeddedLLMConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    # pipeline: specialists vote, the controller settles the hard rows. active: the controller labels the rows
    # an acquisition strategy picks, in rounds, and a task model trained on them labels the rest (``active``).
    mode: Literal["pipeline", "active"] = "pipeline"
    active: ActiveConfig = Field(default_factory=ActiveConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_from_strings(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip()]
        if isinstance(v, dict):  # {name: description}
            v = [{"name": k, "description": d} for k, d in v.items()]
        if isinstance(v, list):
            v = [{"name": x} if isinstance(x, str) else x for x in v]
        return v

    @model_validator(mode="after")
    def _check(self) -> "TaskSpec":
        names = [lab.name for lab in self.labels]
        if len(names) < 2:
            raise ValueError(
                f"labels has {len(names)} label(s) {names}; a label set needs at least 2 "
                "(add the alternative, e.g. 'other')"
            )
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"labels repeats {dupes}; each label must appear once")
        spec_names = [s.name for s in self.specialists]
        if not spec_names:
            raise ValueError("specialists is empty; give at least one (or omit it for the default three)")
        for n in spec_names:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", n):
                raise ValueError(f"specialist name {n!r} may only use letters, digits, '_' and '-'")
        dupes = sorted({n for n in spec_names if spec_names.count(n) > 1})
        if dupes:
            raise ValueError(f"specialists repeats the name(s) {dupes}; names must be unique")
        if self.mode == "active" and self.budget.max_llm_calls is None:
            raise ValueError("active mode spends a budget of LLM calls: give --max-llm-calls N (budget.max_llm_calls)")
        if self.mode == "active" and self.active.reweight and not self.voting.gold_file:
            # Measured (benchmarks/active.py --reweight first-round): the controller's own answers on the first
            # round as the reference cost 4 to 13 points on yahoo_topics and movie_sentiment.
            raise ValueError("active.reweight (--reweight) needs gold reference rows: give --gold-file FILE "
                             "(text,label rows); the controller's own answers as the reference lost accuracy where "
                             "measured")
        c = self.controller
        if self.budget.max_cost_usd is not None and not (c.price_prompt_per_1k or c.price_completion_per_1k):
            raise ValueError("budget.max_cost_usd (--max-cost-usd) is counted at the controller's prices: set "
                             "controller.price_prompt_per_1k and price_completion_per_1k (USD per 1,000 tokens)")
        if self.mode == "active" and (self.budget.max_cost_usd is not None or self.budget.max_llm_tokens is not None):
            raise ValueError("active mode spends budget.max_llm_calls (--max-llm-calls) alone; drop "
                             "budget.max_cost_usd and budget.max_llm_tokens, or use the pipeline mode")
        if self.voting.weights:
            unknown = sorted(set(self.voting.weights) - set(spec_names))
            if unknown:
                raise ValueError(f"voting.weights names unknown specialists {unknown}; known: {spec_names}")
        return self

    def within_budget(self) -> tuple["TaskSpec", str | None]:
        """This task with the rows the controller is asked about up front (the seed, unless it comes from
        ``seed.gold_file``, and the reference rows) cut to at most :data:`UPFRONT_BUDGET_SHARE` of
        ``budget.max_llm_calls``, in proportion, so the hard rows keep the rest; and a line saying what was cut
        (None where nothing was). Counted at one call a row: retries are paid from the rest."""
        limit = self.budget.max_llm_calls
        seed = 0 if self.seed.gold_file else self.seed.resolved_size(len(self.labels))
        ref = self.voting.reference_rows if self.voting.route == "measured" else 0
        if limit is None or seed + ref <= UPFRONT_BUDGET_SHARE * limit:
            return self, None
        share = UPFRONT_BUDGET_SHARE * limit / (seed + ref)
        new_seed, new_ref = (max(1, int(seed * share)) if seed else 0), int(ref * share)
        update = {"voting": self.voting.model_copy(update={"reference_rows": new_ref})}
        if seed:
            update["seed"] = self.seed.model_copy(update={"size": new_seed})
        cut = ([f"the seed from {seed} to {new_seed} rows"] if seed else []) + (
            [f"the reference rows from {ref} to {new_ref}"] if ref else [])
        note = (f"budget: the rows asked up front may spend {UPFRONT_BUDGET_SHARE:.0%} of budget.max_llm_calls={limit}: "
                + " and ".join(cut) + " (the rest is for the hard rows)")
        return self.model_copy(update=update), note

    @property
    def label_names(self) -> list[str]:
        return [lab.name for lab in self.labels]

    @property
    def descriptions(self) -> dict[str, str]:
        return {lab.name: lab.description for lab in self.labels if lab.description}


def _format_errors(err: ValidationError, source: str) -> str:
    return f"invalid task spec ({source}):\n" + "\n".join(f"  - {line}" for line in error_lines(err))


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_task(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TaskSpec:
    """Build a :class:`TaskSpec` from a YAML/JSON file and/or a dict of overrides (CLI flags).

    Raises :class:`ConfigError` naming every bad field.
    """
    data: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        source = str(path)
        data = read_config_file(path, what="task file", flag="--task")
        if not isinstance(data, dict):
            raise ConfigError(f"task file {path} must hold a mapping of settings at the top level")
    if overrides:
        data = _deep_merge(data, {k: v for k, v in overrides.items() if v is not None})
        source = f"{source} + command line" if path else source
    if "labels" not in data:
        raise ConfigError("no labels given; pass --labels a,b,c or put 'labels:' in the task file")
    try:
        return TaskSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
