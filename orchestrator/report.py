"""The run report: counts, LLM use and cost, speed and, with gold labels, accuracy.

Plain functions over the output frame; :func:`summary` renders the readable version printed at the
end of a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from labelwright.orchestrator.cost import token_cost


def _labels(values: Sequence) -> np.ndarray:
    """Labels as an object array with every kind of missing value (None, NaN, pd.NA) as None."""
    s = pd.Series(list(values), dtype=object)
    return s.where(s.notna(), None).to_numpy(dtype=object)


def accuracy(pred: Sequence, gold: Sequence) -> float | None:
    pred, gold = _labels(pred), _labels(gold)
    if len(gold) == 0:
        return None
    return float(np.mean(pred == gold))


def macro_f1(pred: Sequence, gold: Sequence, labels: Sequence[str]) -> float | None:
    """Macro-F1 over the labels present in gold or prediction; an unresolved row (None) is a miss."""
    pred, gold = _labels(pred), _labels(gold)
    if len(gold) == 0:
        return None
    scores = []
    for lab in labels:
        tp = np.sum((pred == lab) & (gold == lab))
        fp = np.sum((pred == lab) & (gold != lab))
        fn = np.sum((pred != lab) & (gold == lab))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else None


# decided_by values of rows whose label the controller answered (the combination may have changed it)
CONTROLLER_DECIDED = ("controller", "combined")


def sent_to_llm(df: pd.DataFrame) -> pd.Series:
    """Rows the controller labelled or was asked about, its answer cached or not: what the LLM share counts."""
    return df["decided_by"].isin(CONTROLLER_DECIDED) | (df["llm_calls"] > 0) | df["cached"].astype(bool)


def build_report(
    df: pd.DataFrame,
    *,
    labels: Sequence[str],
    specialists: Sequence[str],
    rows_in: int,
    wall_s: float,
    label_s: float,
    price_prompt_per_1k: float,
    price_completion_per_1k: float,
    timings: dict | None = None,
    extra: dict | None = None,
    human_cost_per_row: float | None = None,
) -> dict:
    counts = df["decided_by"].value_counts().to_dict()
    asked = df["llm_calls"] > 0
    llm_rows = int(sent_to_llm(df).sum())
    prices = {"price_prompt_per_1k": price_prompt_per_1k, "price_completion_per_1k": price_completion_per_1k}
    prompt = int(df["prompt_tokens"].sum())
    completion = int(df["completion_tokens"].sum())
    cost = token_cost(prompt, completion, **prices)
    # What the same LLM would cost on every row: mean tokens of a row it answered, times all rows.
    spent = df[asked & ~df["cached"].astype(bool)]
    if len(spent):
        per_row = token_cost(spent["prompt_tokens"].mean(), spent["completion_tokens"].mean(), **prices)
        tokens_per_row = float((spent["prompt_tokens"] + spent["completion_tokens"]).mean())
    else:
        per_row, tokens_per_row = 0.0, 0.0
    report = {
        "rows_in": int(rows_in),
        "rows_out": int(len(df)),
        "decided_by": {k: int(v) for k, v in sorted(counts.items())},
        "llm_share": llm_rows / max(1, len(df)),
        "llm": {
            "calls": int(df["llm_calls"].sum()),
            "rows": llm_rows,
            "cache_hits": int(df["cached"].astype(bool).sum()),
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "cost_usd": round(cost, 6),
        },
        "all_rows_by_llm_estimate": {
            "tokens": round(tokens_per_row * rows_in),
            "cost_usd": round(per_row * rows_in, 6),
        },
        "wall_s": round(wall_s, 2),
        "rows_per_s": round(len(df) / wall_s, 3) if wall_s > 0 else None,
        "labelling_rows_per_s": round(len(df) / label_s, 3) if label_s > 0 else None,
        "timings_s": {k: round(v, 2) for k, v in (timings or {}).items()},
    }
    if human_cost_per_row is not None:
        report["people"] = people_block(rows_in, human_cost_per_row, report["llm"]["cost_usd"])
    if "gold" in df.columns:
        g = df[df["gold"].notna()]
        if len(g):
            gold_block = {
                "rows": int(len(g)),
                "accuracy": accuracy(g["label"], g["gold"]),
                "macro_f1": macro_f1(g["label"], g["gold"], labels),
                "accuracy_resolved": accuracy(g["label"][g["label"].notna()], g["gold"][g["label"].notna()]),
                "accuracy_by_decided_by": {
                    k: {"rows": int(len(part)), "accuracy": accuracy(part["label"], part["gold"])}
                    for k, part in g.groupby("decided_by")
                },
                "specialist_accuracy": {
                    s: accuracy(g[f"vote_{s}"], g["gold"]) for s in specialists if f"vote_{s}" in g.columns
                },
            }
            report["gold"] = gold_block
    if "controller_label" in df.columns:
        report["combined"] = combined_block(df)
    if extra:
        report.update(extra)
    return report


def people_block(rows: int, cost_per_row: float, llm_cost_usd: float) -> dict:
    """What people would be paid to label the ``rows`` (``budget.human_cost_per_row`` each) against what the
    LLM cost this run: ``times_cheaper`` is None where the LLM had no price (the embedded one)."""
    people = rows * cost_per_row
    return {"cost_per_row_usd": round(cost_per_row, 6), "rows": int(rows), "cost_usd": round(people, 6),
            "llm_cost_usd": llm_cost_usd,
            "times_cheaper": round(people / llm_cost_usd, 1) if llm_cost_usd > 0 else None}


def publish_report(report: dict, *, report_path, output, log, frame: pd.DataFrame | None = None) -> dict:
    """Write ``report`` as JSON to ``report_path`` (when given) and, beside it, as an HTML page with its plots
    drawn from ``frame`` (the output frame: :func:`html_report_path`); log its summary and where things went."""
    import json

    html_path = None
    if report_path:
        html_path = html_report_path(report_path)
        report["html"] = str(html_path)
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(json.dumps(report, indent=2, default=str))
    log(summary(report))
    if html_path is not None:
        from labelwright.orchestrator.report_html import write_html_report

        write_html_report(report, frame, html_path)
    log(f"output: {output}" + (f", report: {report_path}, HTML report: {html_path}" if report_path else ""))
    return report


def html_report_path(report_path: str | Path) -> Path:
    """Where the HTML report goes: the JSON report's path with ``.html`` for its suffix (``r.json``: ``r.html``)."""
    p = Path(report_path)
    return p.with_name(p.name + ".html") if p.suffix == ".html" else p.with_suffix(".html")


def combined_block(df: pd.DataFrame) -> dict:
    """What the combination of the controller with the specialists (``voting.combine``) did: of the rows the
    controller answered while labelling (not the seed or reference rows), how many it overruled, and with
    gold how often the controller's own label and the combination's were right on those."""
    asked = df["decided_by"].isin(CONTROLLER_DECIDED) & df["controller_label"].notna()
    for flag in ("seed", "reference"):
        if flag in df.columns:
            asked &= ~df[flag].fillna(False).astype(bool)
    over = df[asked & (df["decided_by"] == "combined")]
    out = {"controller_rows": int(asked.sum()), "overruled": int(len(over))}
    if "gold" in df.columns:
        g = over[over["gold"].notna()]
        out.update(gold_rows=int(len(g)), accuracy=accuracy(g["label"], g["gold"]) if len(g) else None,
                   controller_accuracy=accuracy(g["controller_label"], g["gold"]) if len(g) else None)
    return out


def combine_text(fit: dict) -> str:
    """A stage's fitted combination of the controller with the specialists, in words."""
    verdict = ("it decides the controller's rows" if fit["applied"] else
               "not used: the controller's answers stand")
    what = "the controller's answers recalibrated" if fit.get("sources") == "controller" else \
        "the controller combined with the specialists"
    return (f"{what} on {fit['rows']} gold reference rows: out of fold it overruled "
            f"{fit['overruled']} ({fit['won']} won, {fit['lost']} lost; {fit['accuracy']:.1%} against the controller's "
            f"{fit['controller_accuracy']:.1%}): {verdict}")


def people_text(people: dict) -> str:
    text = (f"people labelling all {people['rows']} rows at ${people['cost_per_row_usd']:g} a row "
            f"(budget.human_cost_per_row): ${people['cost_usd']:.2f}")
    if people["times_cheaper"] is not None:
        return text + f"; the LLM cost ${people['llm_cost_usd']:.4f}, {people['times_cheaper']:g}x less"
    return text + "; the LLM here has no price (controller.price_*_per_1k)"


def summary(report: dict) -> str:
    lines = [
        f"rows: {report['rows_in']} in, {report['rows_out']} out",
        "decided by: " + ", ".join(f"{k} {v}" for k, v in report["decided_by"].items()),
        f"LLM share: {report['llm_share']:.1%} of rows "
        f"({report['llm']['calls']} calls, {report['llm']['prompt_tokens']}+{report['llm']['completion_tokens']} "
        f"tokens, {report['llm']['cache_hits']} cache hits, ${report['llm']['cost_usd']:.4f})",
        f"all rows by the LLM (estimate): {report['all_rows_by_llm_estimate']['tokens']} tokens, "
        f"${report['all_rows_by_llm_estimate']['cost_usd']:.4f}",
        *([people_text(report["people"])] if report.get("people") else []),
        f"time: {report['wall_s']:.1f} s wall, {report['rows_per_s'] or 0:.2f} rows/s overall, "
        f"{report['labelling_rows_per_s'] or 0:.2f} rows/s while labelling",
    ]
    tries = report.get("attempts") or {}
    if tries.get("interrupted"):
        lines.append(f"attempts: {tries['attempts']} at this run directory, {tries['interrupted']} of them stopped "
                     f"before the end; {tries['rows_revoted']} rows labelled but not yet written when one stopped "
                     "were voted again (answers bought before are in the controller's cache)")
    seed = report.get("seed")
    if seed and not seed.get("from_input", True):
        lines.append(f"seed: {seed['rows']} rows labelled ({seed['source']}) from a separate pool, "
                     f"{seed['llm_calls']} LLM calls and {seed['prompt_tokens'] + seed['completion_tokens']} tokens "
                     "not counted above")
    ref = report.get("reference")
    if ref and ref.get("asked"):
        where = "in the LLM share above" if ref.get("in_input", True) else "not counted above: not input rows"
        lines.append(f"reference: {ref['asked']} {ref['source']} rows asked of the controller up front to measure "
                     f"routing on ({ref['llm_calls']} LLM calls, {where})")
    cand = report.get("candidates")
    if cand and cand.get("rows"):
        text = (f"candidates: {cand['rows']} rows answered with a set, {cand['mean_size']:.2f} labels on average, "
                f"{cand['singleton_share']:.0%} with one")
        student = cand.get("student") or {}
        if student.get("rows_decided"):
            text += f"; student {student['name']} decided {student['rows_decided']} rows with several"
        elif student.get("note"):
            text += f"; {student['note']}"
        lines.append(text)
        if cand.get("coverage") is not None:
            lines.append(f"  on {cand['gold_rows']} gold rows: the set holds the true label {cand['coverage']:.1%}, the "
                         f"controller's first label is right {cand['single_label_accuracy']:.3f}, the final labels "
                         f"{cand['student_accuracy']:.3f}")
    stages = (report.get("stages") or {}).get("stages") or []
    fits = [(r["stage"], r["check"]["gate"]) for r in stages if (r.get("check") or {}).get("gate")]
    if fits and fits[-1][1].get("kind") == "route":
        lines.append(f"routing (stage {fits[-1][0]}): threshold {routing_text(fits[-1][1])}")
        if fits[-1][1].get("combine"):
            lines.append(f"  {combine_text(fits[-1][1]['combine'])}")
    comb = report.get("combined")
    if comb and comb.get("overruled"):
        text = f"combined: overruled the controller on {comb['overruled']} of its {comb['controller_rows']} rows"
        if comb.get("gold_rows"):
            text += (f"; on {comb['gold_rows']} of them with gold the combination is right {comb['accuracy']:.3f}, "
                     f"the controller {comb['controller_accuracy']:.3f}")
        lines.append(text)
    g = report.get("gold")
    if g:
        lines.append(f"gold ({g['rows']} rows): accuracy {g['accuracy']:.3f}, macro-F1 {g['macro_f1']:.3f}")
        for k, v in g["accuracy_by_decided_by"].items():
            acc = "n/a" if v["accuracy"] is None else f"{v['accuracy']:.3f}"
            lines.append(f"  {k}: {v['rows']} rows, accuracy {acc}")
        for s, acc in g["specialist_accuracy"].items():
            lines.append(f"  specialist {s} alone: accuracy {acc:.3f}")
    st = report.get("stages")
    if st and len(st.get("stages", [])) > 1:
        lines.append(f"stages ({st['buffer_rows']} controller rows in the buffer):")
        for r in st["stages"]:
            share = "n/a" if r["hard_share"] is None else f"{r['hard_share']:.0%}"
            text = f"  stage {r['stage']}: voted {r['rows']} rows, LLM share {share}, {r['llm_calls']} LLM calls"
            if r.get("consensus_accuracy") is not None:
                text += f", consensus accuracy {r['consensus_accuracy']:.3f}"
            chk = r.get("check") or {}
            if chk.get("rows"):
                text += f", held-out {chk['source']} ({chk['rows']}): " + ", ".join(
                    f"{n} {a:.3f}" for n, a in chk["specialists"].items())
            if chk.get("gate"):
                t = chk["gate"]["threshold"]
                text += ", calibrated threshold " + ("none (all to the LLM)" if t is None else f"{t:.3f}")
            if r.get("train_s") is not None:
                text += f", trained in {r['train_s']:.0f} s"
            if r.get("train_restarts"):
                from labelwright.orchestrator.report_html import restarted

                text += ", Ray Train workers restarted: " + restarted(r["train_restarts"])
            if r.get("rolled_back"):
                text += f", rolled back {', '.join(r['rolled_back'])}"
            if r.get("failed"):
                text += f", FAILED: {r['failed']}"
            lines.append(text)
    return "\n".join(lines)


def _save_figure(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_stages(stages: dict, path: str | Path) -> Path:
    """PNG of :func:`labelwright.orchestrator.report_plots.stages_figure`."""
    from labelwright.orchestrator.report_plots import stages_figure

    return _save_figure(stages_figure(stages), path)


def plot_rounds(rounds: list[dict], path: str | Path) -> Path:
    """PNG of :func:`labelwright.orchestrator.report_plots.rounds_figure`."""
    from labelwright.orchestrator.report_plots import rounds_figure

    return _save_figure(rounds_figure(rounds), path)


def routing_text(fit: dict) -> str:
    """A fitted routing in words: what it settles, what that rests on, or why it settles nothing."""
    rows, level = fit["rows"], f"{fit['confidence_level']:.0%}"
    if fit["target_accuracy"] is not None:
        bar = f"a {level} lower bound of the specialists' accuracy reaching {fit['target_accuracy']:.0%}"
    elif fit["reference"] == "gold":
        bar = f"the specialists losing at most {fit['max_loss']:.0%} accuracy against the controller ({level} bound)"
    else:
        bar = (f"the specialists disagreeing with the controller on at most {fit['max_loss']:.0%} of rows "
               f"({level} bound)")
    if fit["threshold"] is None:
        return (f"on {rows} {fit['reference']} reference rows no confidence level is shown to meet {bar}: every row "
                "goes to the controller (more reference rows, voting.reference_rows, or better specialists "
                f"would let them settle some){stack_text(fit.get('stack_choice'))}")
    ctrl = "" if fit["controller_accuracy"] is None else f", the controller {fit['controller_accuracy']:.0%}"
    return (f"{fit['threshold']:.3f}, from {rows} {fit['reference']} reference rows: it settles "
            f"{fit['settled_share']:.0%} of them, where the specialists are right {fit['accuracy']:.0%}{ctrl} "
            f"({bar}){stack_text(fit.get('stack_choice'))}")


def stack_text(choice: dict | None) -> str:
    """Which specialists the stacked rule weighs, and why (``voting.chosen_stack``), as a clause."""
    if not choice or "best_single" not in choice:
        return ""
    counts = (f"out of fold it was right on {choice['won']} rows {choice['best_single']} got wrong and wrong on "
              f"{choice['lost']} it got right, p={choice['p_value']:.2g}")
    if len(choice["sources"]) > 1:
        return f"; the stack over {', '.join(choice['sources'])} ({counts})"
    return (f"; stacked on {choice['best_single']} alone, the best single specialist (the stack over them all "
            f"is not shown better: {counts})")
