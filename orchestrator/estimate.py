"""What a job will cost before it runs, without one call to the LLM.

The controller's real prompts (its system turn, the label list, ``controller.num_demonstrations`` shown rows,
the row) are built for a sample of the input's rows and counted with a tokenizer: the embedded LLM's own where
its converted copy is on disk, else the bundled MiniLM's (a WordPiece vocabulary: a count for comparison, not the
provider's bill). Two figures follow: every row sent to the controller, and the pipeline (its seed, its
reference rows and the share of the other rows it expects to be hard), each priced at the task's
``controller.price_*_per_1k`` and set against people labelling every row (``budget.human_cost_per_row``).

The hard share is the one figure that cannot be known before the specialists are trained: where the task names
specialists that work untrained (zero-shot kinds), it is what they leave to the controller on the sample; else an
assumption, stated as such; ``--hard-share`` gives one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterable, Sequence

from pydantic import BaseModel

from labelwright.orchestrator.cost import token_cost
from labelwright.orchestrator.dataset_io import iter_texts
from labelwright.orchestrator.reference import MAX_AUDIT_SHARE
from labelwright.orchestrator.spec import TaskSpec
from labelwright.specialists import prompts

SAMPLE_ROWS = 200  # rows whose prompts are built and counted; the mean stands for every row
# The share of rows past the seed and the reference rows that go to the controller, when nothing says better:
# measured from 25% to 100% on the shared datasets (README, "The controller combined with the specialists").
ASSUMED_HARD_SHARE = 0.5
PER_MESSAGE_TOKENS = 4  # a chat message's framing, counted where the tokenizer has no chat template


class Spend(BaseModel):
    rows: int  # rows the controller is asked about
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None  # None: the task gives the controller no prices


class Estimate(BaseModel):
    rows: int  # input rows (after --limit)
    votable_rows: int  # rows with a text: the others are never sent
    sample_rows: int
    tokenizer: str
    prompt_tokens_per_row: float  # with the demonstrations a row is shown
    prompt_tokens_per_seed_row: float  # the seed is asked before there is anything to demonstrate
    completion_tokens_per_row: float
    all_rows: Spend
    pipeline: Spend
    seed_rows: int
    reference_rows: int
    hard_rows: int
    hard_share: float
    hard_share_source: str
    people_cost_usd: float | None
    notes: list[str]


def load_tokenizer(spec: TaskSpec) -> tuple[Any, str]:
    """The tokenizer to count with, and what it is: the embedded LLM's where it is on disk without converting
    anything, else MiniLM's."""
    from transformers import AutoTokenizer

    from labelwright.specialists.local_model import BUNDLED_MODELS, model_cache_path

    name = spec.embedded_llm.model
    local = model_cache_path(name) if name in BUNDLED_MODELS else Path(name).expanduser()
    if (local / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(local)), f"{name} (the embedded LLM's)"
    from labelwright.specialists.encoder import load_pretrained

    return (load_pretrained(AutoTokenizer, "minilm"),
            "minilm (WordPiece; the embedded LLM's own is counted once `labelwright llm` or a run has converted it)")


def count_prompt_tokens(messages: list[dict[str, str]], tokenizer: Any) -> int:
    """Tokens of one request's messages: through the tokenizer's chat template where it has one."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tokenizer.encode(text, add_special_tokens=False, verbose=False))
    return sum(len(tokenizer.encode(m["content"], add_special_tokens=False, verbose=False)) + PER_MESSAGE_TOKENS
               for m in messages)


def _sample(sources: Iterable[str | Path], text_column: str, *, limit: int | None, k: int,
            seed: int) -> tuple[int, int, list[str]]:
    """Rows read, rows with a text, and a uniform sample of ``k`` of their texts (one pass, reservoir)."""
    rng = random.Random(seed)
    rows = votable = 0
    sample: list[str] = []
    for source in sources:
        for texts in iter_texts(source, text_column):
            for text in texts:
                if limit is not None and rows >= limit:
                    return rows, votable, sample
                rows += 1
                if not text.strip():
                    continue
                votable += 1
                if len(sample) < k:
                    sample.append(text)
                elif (j := rng.randrange(votable)) < k:
                    sample[j] = text
    return rows, votable, sample


def zero_shot_hard_share(texts: Sequence[str], spec: TaskSpec) -> tuple[float, str] | None:
    """The share of ``texts`` the task's specialists that work untrained (the zero-shot kinds, used as shipped)
    leave to the controller under the voting rule, and what it rests on; None where the task names none."""
    import numpy as np

    from labelwright.orchestrator.voting import get_rule
    from labelwright.specialists.registry import build_specialist, specialist_class

    ready = [s for s in spec.specialists if not specialist_class(s.kind).trainable]
    if not ready or not texts:
        return None
    probs = np.stack([build_specialist(s, spec.label_names).predict_proba(list(texts)) for s in ready])
    rule = spec.voting.rule if spec.voting.rule in ("unanimity", "majority", "confidence_weighted") else "unanimity"
    votes = get_rule(rule)(probs, threshold=spec.voting.threshold or 0.0)
    return float(votes.hard.mean()), (
        f"measured: what {', '.join(s.name for s in ready)} (zero-shot, untrained) leave under {rule} on "
        f"{len(texts)} sampled rows; trained specialists settle more, routing by measured correctness may settle "
        "fewer")


def _spend(rows: int, seed_rows: int, prompt: float, seed_prompt: float, completion: float, spec: TaskSpec) -> Spend:
    c = spec.controller
    priced = c.price_prompt_per_1k > 0 or c.price_completion_per_1k > 0
    p, q = round((rows - seed_rows) * prompt + seed_rows * seed_prompt), round(rows * completion)
    cost = token_cost(p, q, price_prompt_per_1k=c.price_prompt_per_1k,
                      price_completion_per_1k=c.price_completion_per_1k) if priced else None
    return Spend(rows=rows, prompt_tokens=p, completion_tokens=q, cost_usd=None if cost is None else round(cost, 6))


def estimate(sources: Sequence[str | Path], spec: TaskSpec, *, text_column: str | None = None,
             limit: int | None = None, hard_share: float | None = None, tokenizer: tuple[Any, str] | None = None,
             sample_rows: int = SAMPLE_ROWS, seed: int = 0, zero_shot: bool = True) -> Estimate:
    """The estimate for the rows of ``sources`` (input files, or a run's staged shards) under ``spec``;
    ``zero_shot=False`` keeps the task's zero-shot specialists from running on the sample (a run's first line:
    it is about to run them on every row anyway)."""
    if hard_share is not None and not 0.0 <= hard_share <= 1.0:
        from labelwright.specialists.errors import ConfigError

        raise ConfigError(f"--hard-share must be between 0 and 1, not {hard_share}")
    rows, votable, texts = _sample(sources, text_column or spec.text_column, limit=limit, k=sample_rows, seed=seed)
    tok, tok_name = tokenizer or load_tokenizer(spec)
    c = spec.controller
    labels = spec.label_names
    most = min(c.max_candidates, len(labels)) if c.mode == "candidates" else None
    offered = labels[: c.max_choices]  # past max_choices the controller is offered a shortlist of that many
    prompt_counts, bare_counts = [], []
    for i, text in enumerate(texts):
        # demonstrations: other sampled rows, as long as the rows the job will show are on average
        others = [texts[(i + 1 + j) % len(texts)] for j in range(min(c.num_demonstrations, len(texts) - 1))]
        demos = [(t, labels[(i + j) % len(labels)]) for j, t in enumerate(others)]
        messages, _ = prompts.build_messages(
            text, instruction=spec.instruction, labels=offered, descriptions=spec.descriptions,
            demonstrations=demos, max_text_chars=c.max_text_chars, max_candidates=most,
            max_demonstration_chars=c.max_demonstration_chars)
        prompt_counts.append(count_prompt_tokens(messages, tok))
        bare, _ = prompts.build_messages(
            text, instruction=spec.instruction, labels=offered, descriptions=spec.descriptions,
            max_text_chars=c.max_text_chars, max_candidates=most)
        bare_counts.append(count_prompt_tokens(bare, tok))
    answers = [prompts.answer_json(lab, candidates=most is not None) for lab in labels]
    completion = sum(len(tok.encode(a, add_special_tokens=False, verbose=False)) for a in answers) / len(answers)
    prompt = sum(prompt_counts) / len(prompt_counts) if prompt_counts else 0.0
    seed_prompt = sum(bare_counts) / len(bare_counts) if bare_counts else 0.0

    notes: list[str] = []
    planned, cut = spec.within_budget()
    if cut:
        notes.append(cut)
    if spec.mode == "active":
        calls = spec.budget.max_llm_calls or votable
        seed_rows, reference_rows = 0, 0
        hard = min(calls, votable)
        share, source = (hard / votable if votable else 0.0), "active mode: the rows budget.max_llm_calls buys"
    else:
        seed_rows = 0 if planned.seed.gold_file else min(planned.seed.resolved_size(len(labels)), votable)
        reference_rows = 0
        if planned.voting.route == "measured":
            reference_rows = planned.voting.reference_rows
            if not planned.voting.gold_file:  # an audit or the input's gold rows: a capped share of the input
                reference_rows = min(reference_rows, int(votable * MAX_AUDIT_SHARE))
        rest = max(0, votable - seed_rows - (0 if planned.voting.gold_file else reference_rows))
        measured = zero_shot_hard_share(texts, spec) if zero_shot and hard_share is None else None
        if hard_share is not None:
            share, source = hard_share, "given (--hard-share)"
        elif measured is not None:
            share, source = measured
        else:
            share = ASSUMED_HARD_SHARE
            source = (f"assumed: {ASSUMED_HARD_SHARE:.0%} of the other rows; measured 25% to 100% on the shared "
                      "datasets, 100% where the specialists are far below the controller (pass --hard-share)")
        hard = round(rest * share)
        if spec.budget.max_llm_calls is not None:
            left = max(0, spec.budget.max_llm_calls - seed_rows - reference_rows)
            if hard > left:
                notes.append(f"budget.max_llm_calls={spec.budget.max_llm_calls} buys {left} of the {hard} hard "
                             "rows expected: the others would stay unresolved")
                hard = left
    if c.price_prompt_per_1k == 0 and c.price_completion_per_1k == 0:
        notes.append("the controller has no prices (controller.price_prompt_per_1k, price_completion_per_1k in the "
                     "task file): tokens only")
    notes.append("retries and repair rounds are not counted; a cached answer costs nothing")
    human = spec.budget.human_cost_per_row
    return Estimate(
        rows=rows, votable_rows=votable, sample_rows=len(texts), tokenizer=tok_name,
        prompt_tokens_per_row=round(prompt, 1), prompt_tokens_per_seed_row=round(seed_prompt, 1),
        completion_tokens_per_row=round(completion, 1),
        all_rows=_spend(votable, seed_rows, prompt, seed_prompt, completion, spec),
        pipeline=_spend(seed_rows + reference_rows + hard, seed_rows, prompt, seed_prompt, completion, spec),
        seed_rows=seed_rows, reference_rows=reference_rows, hard_rows=hard, hard_share=share,
        hard_share_source=source, people_cost_usd=None if human is None else round(votable * human, 2),
        notes=notes,
    )


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:,.4f}" if value < 1 else f"${value:,.2f}"


def render(est: Estimate) -> list[str]:
    """The estimate as lines for a terminal."""
    def line(name: str, s: Spend) -> str:
        return (f"  {name:<28} {s.rows:>9,} rows {s.prompt_tokens:>13,} + {s.completion_tokens:>10,} tokens  "
                f"{_money(s.cost_usd):>12}")

    out = [f"rows: {est.rows:,} ({est.votable_rows:,} with a text); prompts of {est.sample_rows} sampled rows counted "
           f"with {est.tokenizer}: {est.prompt_tokens_per_row:,.0f} prompt + {est.completion_tokens_per_row:,.0f} "
           f"completion tokens a row ({est.prompt_tokens_per_seed_row:,.0f} prompt tokens for a seed row: no "
           "demonstrations yet)",
           line("every row by the controller", est.all_rows),
           line("the pipeline", est.pipeline),
           f"    seed {est.seed_rows:,} + reference {est.reference_rows:,} + hard {est.hard_rows:,} "
           f"(hard share {est.hard_share:.0%}, {est.hard_share_source})"]
    if est.people_cost_usd is not None:
        out.append(f"  people labelling every row (budget.human_cost_per_row): {_money(est.people_cost_usd)}")
    out += [f"  note: {n}" for n in est.notes]
    return out


def summary_line(est: Estimate) -> str:
    """One line for the top of a run's log."""
    def part(s: Spend) -> str:
        return f"{s.rows:,} rows, {s.prompt_tokens + s.completion_tokens:,} tokens" + (
            f", {_money(s.cost_usd)}" if s.cost_usd is not None else "")

    return (f"estimate: every row by the controller {part(est.all_rows)}; the pipeline about {part(est.pipeline)} "
            f"(hard share {est.hard_share:.0%}, {est.hard_share_source.split(':')[0].split(' ')[0]}; "
            f"counted with {est.tokenizer.split(' ')[0]})")
