"""Choosing the annotator by agreement (LLMs in the loop, 2024): each candidate LLM set-up labels a small gold
sample several times; agreement with the gold labels and with itself across repeats decides which one becomes
the task's controller.

An annotator is an endpoint, a model and a prompt variant (demonstrations, candidates mode, temperature), listed
in a YAML file (``annotators: [...]``). The statistics come from maintained libraries: Cohen's kappa and
macro-F1 from scikit-learn, Fleiss' kappa from statsmodels, Krippendorff's alpha from ``krippendorff``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from labelwright.specialists.errors import ConfigError

# The rule, as the output states it: macro-F1 first; a near tie goes to the more self-consistent, then the cheaper.
F1_TIE = 0.01
RULE = (f"the highest macro-F1 against gold (mean over the repeats); within {F1_TIE} of it, the highest Fleiss' "
        "kappa across repeats, then the lowest cost per row, then the fastest")


class Annotator(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    shots: int = Field(4, ge=0)  # nearest gold rows shown as demonstrations (never the row itself)
    mode: Literal["label", "candidates"] = "label"
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    price_prompt_per_1k: float = Field(0.0, ge=0.0)
    price_completion_per_1k: float = Field(0.0, ge=0.0)

    def controller(self) -> dict:
        """This annotator as a task's ``controller`` section."""
        return {"base_url": self.base_url, "model": self.model, "api_key_env": self.api_key_env,
                "num_demonstrations": self.shots, "mode": self.mode, "temperature": self.temperature,
                "price_prompt_per_1k": self.price_prompt_per_1k,
                "price_completion_per_1k": self.price_completion_per_1k}


class AnnotatorsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    annotators: list[Annotator] = Field(min_length=1)


def load_annotators(path: str | Path) -> list[Annotator]:
    from labelwright.specialists.config_files import error_lines, read_config_file

    data = read_config_file(path, what="annotators file", flag="--annotators")
    try:
        annotators = AnnotatorsFile.model_validate(data).annotators
    except ValidationError as err:
        raise ConfigError(f"invalid annotators file {path}:\n" + "\n".join(f"  - {x}" for x in error_lines(err))) from None
    names = [a.name for a in annotators]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"annotators file {path} repeats the name(s) {dupes}; give each annotator its own name")
    return annotators


def agreement(repeats: Sequence[Sequence[str | None]], gold: Sequence[str], labels: Sequence[str]) -> dict:
    """Agreement of K repeated labellings of the same rows (``repeats``: K lists of n labels, None: no answer)
    with ``gold`` and with each other. An unanswered row counts as wrong against gold and as missing in alpha."""
    from krippendorff import alpha
    from sklearn.metrics import cohen_kappa_score, f1_score
    from statsmodels.stats.inter_rater import fleiss_kappa

    labels = list(labels)
    codes = {lab: i for i, lab in enumerate(labels)}
    gold_idx = np.array([codes[g] for g in gold])
    runs = np.array([[codes.get(x, -1) if x is not None else -1 for x in rep] for rep in repeats])  # (K, n)
    acc = [float(np.mean(r == gold_idx)) for r in runs]
    f1 = [float(f1_score(gold_idx, r, labels=list(range(len(labels))), average="macro", zero_division=0))
          for r in runs]
    kappa = [float(cohen_kappa_score(gold_idx, r)) if len(set(r) | set(gold_idx)) > 1 else 1.0 for r in runs]
    out = {"rows": int(len(gold_idx)), "repeats": int(len(runs)), "accuracy": float(np.mean(acc)),
           "macro_f1": float(np.mean(f1)), "cohen_kappa": float(np.mean(kappa)),
           "unanswered": float(np.mean(runs < 0)), "fleiss_kappa": None, "krippendorff_alpha": None}
    if len(runs) > 1:
        answered = (runs >= 0).all(0)
        if answered.any():
            table = np.stack([np.bincount(runs[:, j], minlength=len(labels)) for j in np.flatnonzero(answered)])
            same = (table.max(1) == len(runs)).all()
            # Every repeat the same answer on every row: perfectly consistent (statsmodels gives nan when p_e = 1).
            out["fleiss_kappa"] = 1.0 if same else float(fleiss_kappa(table))
        data = np.where(runs >= 0, runs, np.nan).astype(float)
        if len(np.unique(data[~np.isnan(data)])) > 1:
            out["krippendorff_alpha"] = float(alpha(reliability_data=data, level_of_measurement="nominal"))
        elif (~np.isnan(data)).any():
            out["krippendorff_alpha"] = 1.0
    return out


def versus(a: dict, b: dict, gold: Sequence[str]) -> dict:
    """How sure it is that ``a`` beats ``b`` on these rows: McNemar's exact test (statsmodels) on the rows where
    exactly one of the two is right (their first repeat), and each one's Wilson 95% interval of accuracy."""
    from statsmodels.stats.contingency_tables import mcnemar
    from statsmodels.stats.proportion import proportion_confint

    right_a = np.array([x == g for x, g in zip(a["labels"][0], gold)])
    right_b = np.array([x == g for x, g in zip(b["labels"][0], gold)])
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    p = float(mcnemar([[0, only_a], [only_b, 0]], exact=True).pvalue) if only_a + only_b else 1.0
    interval = lambda r: [round(float(x), 3) for x in proportion_confint(int(r.sum()), len(r), method="wilson")]  # noqa: E731
    return {"runner_up": b["name"], "rows_only_chosen_right": only_a, "rows_only_runner_up_right": only_b,
            "p_value": p, "chosen_interval": interval(right_a), "runner_up_interval": interval(right_b)}


def choose(results: list[dict]) -> dict:
    """The annotator the rule (``RULE``) picks from ``results`` (each with ``name`` and the agreement figures)."""
    best_f1 = max(r["macro_f1"] for r in results)
    near = [r for r in results if r["macro_f1"] >= best_f1 - F1_TIE]
    return sorted(near, key=lambda r: (-(r["fleiss_kappa"] if r["fleiss_kappa"] is not None else -1.0),
                                       r["cost_per_row_usd"], r["seconds_per_row"]))[0]


def evaluate(annotator: Annotator, gold: pd.DataFrame, *, labels: list[str], instruction: str,
             descriptions: dict[str, str], repeats: int, embeddings: np.ndarray, label_embeddings: np.ndarray,
             max_choices: int = 12, log: Callable[[str], None] = print) -> dict:
    """``annotator`` labels every gold row ``repeats`` times (no cache: each repeat is asked anew)."""
    from labelwright.orchestrator.acquisition import nearest
    from labelwright.orchestrator.active import shortlist
    from labelwright.orchestrator.controller import Controller, ControllerConfig
    from labelwright.orchestrator.cost import token_cost

    cfg = ControllerConfig(**annotator.controller(), cache=False, max_choices=max_choices)
    controller = Controller(cfg, labels=labels, descriptions=descriptions, instruction=instruction)
    texts, gold_labels = gold["text"].tolist(), gold["label"].tolist()
    demos = None
    if annotator.shots:
        idx = nearest(embeddings, embeddings, annotator.shots, query_texts=texts, bank_texts=texts)
        demos = [[(texts[j], gold_labels[j]) for j in row[::-1]] for row in idx]
    choices = shortlist(None, embeddings @ label_embeddings.T, labels, max_choices) if len(labels) > max_choices else None
    runs, prompt, completion = [], 0, 0
    t = time.monotonic()
    for k in range(repeats):
        answers = controller.label_many(texts, demonstrations=demos, choices=choices)
        runs.append([a.label for a in answers])
        prompt += sum(a.prompt_tokens for a in answers)
        completion += sum(a.completion_tokens for a in answers)
        log(f"  {annotator.name}: repeat {k + 1}/{repeats} done")
    seconds = time.monotonic() - t
    controller.close()
    asked = max(1, len(texts) * repeats)
    out = {"name": annotator.name, "model": annotator.model, "base_url": annotator.base_url,
           "shots": annotator.shots, "mode": annotator.mode, "temperature": annotator.temperature,
           **agreement(runs, gold_labels, labels),
           "cost_per_row_usd": token_cost(prompt / asked, completion / asked,
                                          price_prompt_per_1k=annotator.price_prompt_per_1k,
                                          price_completion_per_1k=annotator.price_completion_per_1k),
           "seconds_per_row": seconds / asked, "labels": runs}
    return out


def select_annotator(gold_path: str | Path, annotators_path: str | Path, *, spec, repeats: int, output: str | Path,
                     task_path: str | Path | None = None, limit: int | None = None,
                     log: Callable[[str], None] = print) -> dict:
    """Evaluate every annotator of ``annotators_path`` on the gold file, choose one by ``RULE``, write the task
    (``task_path``'s settings, or the labels given, with the chosen ``controller`` section) to ``output`` and the
    figures next to it (``<output stem>.annotators.json``). Returns that record."""
    import json

    import yaml

    from labelwright.orchestrator.bootstrap import read_gold_file, verbalise
    from labelwright.specialists.config_files import read_config_file
    from labelwright.specialists.encoder import Encoder

    if repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {repeats}")
    annotators = load_annotators(annotators_path)
    labels = spec.label_names
    gold = read_gold_file(str(gold_path), text_column=spec.voting.gold_text_column,
                          label_column=spec.voting.gold_label_column, labels=labels, what="gold file")
    if limit:
        gold = gold.head(limit)
    if len(gold) < 2:
        raise ConfigError(f"gold file {gold_path} has {len(gold)} labelled row(s); give at least 2 (20-100 is usual)")
    encoder = Encoder("minilm")
    emb = encoder.encode(gold["text"].tolist())
    label_emb = encoder.encode([verbalise(lab, spec.descriptions.get(lab)) for lab in labels])
    log(f"select-annotator: {len(annotators)} annotator(s), {len(gold)} gold rows, {repeats} repeat(s) each")
    results = []
    for a in annotators:
        log(f"select-annotator: {a.name} ({a.model} at {a.base_url}, {a.shots} shots, {a.mode}, "
            f"temperature {a.temperature})")
        results.append(evaluate(a, gold, labels=labels, instruction=spec.instruction, descriptions=spec.descriptions,
                                repeats=repeats, embeddings=emb, label_embeddings=label_emb,
                                max_choices=spec.controller.max_choices, log=log))
    chosen = choose(results)
    for r in results:
        log(f"  {r['name']:20s} accuracy {r['accuracy']:.3f}  macro-F1 {r['macro_f1']:.3f}  kappa vs gold "
            f"{r['cohen_kappa']:.3f}  Fleiss {_fmt(r['fleiss_kappa'])}  alpha {_fmt(r['krippendorff_alpha'])}  "
            f"${r['cost_per_row_usd']:.5f}/row  {r['seconds_per_row']:.2f} s/row"
            + ("   <- chosen" if r is chosen else ""))
    log(f"select-annotator: chose {chosen['name']} by the rule: {RULE}")
    duel = None
    others = [r for r in results if r is not chosen]
    if others:
        runner_up = max(others, key=lambda r: r["macro_f1"])
        duel = versus(chosen, runner_up, gold["label"].tolist())
        if duel["p_value"] >= 0.05:
            log(f"select-annotator: {len(gold)} gold rows cannot tell {chosen['name']} from {runner_up['name']} "
                f"(only one right on {duel['rows_only_chosen_right']} + {duel['rows_only_runner_up_right']} rows, "
                f"McNemar p = {duel['p_value']:.2f}; 95% intervals {duel['chosen_interval']} and "
                f"{duel['runner_up_interval']}): label more gold rows before trusting the choice")
    task = dict(read_config_file(task_path, what="task file", flag="--task")) if task_path else {
        "labels": [{"name": lab.name, **({"description": lab.description} if lab.description else {})}
                   for lab in spec.labels], "instruction": spec.instruction}
    by_name = {a.name: a for a in annotators}
    task["controller"] = {**(task.get("controller") or {}), **by_name[chosen["name"]].controller()}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
    record = {"gold_file": str(gold_path), "gold_rows": int(len(gold)), "repeats": repeats, "rule": RULE,
              "chosen": chosen["name"], "versus_runner_up": duel, "task": str(output),
              "annotators": [{k: v for k, v in r.items() if k != "labels"} for r in results]}
    (output.with_name(output.stem + ".annotators.json")).write_text(json.dumps(record, indent=2))
    log(f"select-annotator: wrote {output} (controller: {chosen['name']}) and "
        f"{output.with_name(output.stem + '.annotators.json')}")
    return record


def _fmt(x: float | None) -> str:
    return "  -  " if x is None else f"{x:.3f}"
