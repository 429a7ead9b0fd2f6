"""The run report as one HTML page to look at: written next to the JSON report, self-contained (the plots
are PNGs embedded as ``data:`` URIs, the tables plain HTML, no script and nothing fetched from elsewhere).

:func:`write_html_report` takes the report dict (:func:`labelwright.orchestrator.report.build_report` and what
the job adds to it) and the output frame. A section whose figures the report lacks (no gold column, no
stages in active mode, no plan) is left out or says why; every string from the data (labels, texts, notes,
paths) is escaped.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd


def restarted(restarts: dict[str, int]) -> str:
    """A stage's Ray Train restarts ({specialist: times}) in words."""
    return ", ".join(f"{name} {times}x" for name, times in restarts.items())


# The confusion matrix shows at most this many labels (the most frequent in gold); the rest are pooled.
CONFUSION_MAX_LABELS = 15
OTHER = "(other labels)"
NONE = "(unresolved)"

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;
color:#222;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
.sub{color:#666;margin-top:0}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:110px;background:#fafafa}
.card .v{font-size:1.5em;font-weight:600}.card .k{color:#666;font-size:.85em}
table{border-collapse:collapse;margin:8px 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;display:block;margin:8px 0}
.note{color:#666;font-size:.9em}
"""


def write_html_report(report: dict, df: pd.DataFrame | None, path: str | Path) -> Path:
    """Write ``report`` (and the plots drawn from ``df``, the output frame; None draws none of them) as one
    HTML file at ``path``; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    sections = [
        _summary(report),
        _decided_by(report, df),
        _stages(report),
        _active(report),
        _labels_given(df),
        _confidence(df),
        _gold(report, df),
        _cost(report),
        _reviews(report),
        _plan(report),
    ]
    title = "labelwright report" + (f": {Path(str(report['output'])).name}" if report.get("output") else "")
    sub = [f"{report.get('rows_out', '?')} rows labelled"]
    if (report.get("controller") or {}).get("model"):
        sub.append(f"controller {report['controller']['model']}")
    if report.get("mode"):
        sub.append(f"mode {report['mode']}")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1><p class=\"sub\">{_e(', '.join(sub))}</p>"
            + "".join(s for s in sections if s) + "</body></html>\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


# --- sections ---------------------------------------------------------------------------------------------


def _summary(report: dict) -> str:
    llm = report.get("llm") or {}
    gold = report.get("gold") or {}
    cards = [
        ("rows", report.get("rows_out")),
        ("LLM share", _pct(report.get("llm_share"))),
        ("LLM calls", llm.get("calls")),
        ("LLM cost", _usd(llm.get("cost_usd"))),
        ("wall time", _num(report.get("wall_s"), "{:.1f} s")),
    ]
    if gold:
        cards += [("accuracy (gold)", _num(gold.get("accuracy"), "{:.3f}")),
                  ("macro-F1 (gold)", _num(gold.get("macro_f1"), "{:.3f}"))]
    body = "<div class=\"cards\">" + "".join(
        f"<div class=\"card\"><div class=\"v\">{_e(_str(v))}</div><div class=\"k\">{_e(k)}</div></div>"
        for k, v in cards) + "</div>"
    facts = [
        ("rows in / out", f"{_str(report.get('rows_in'))} / {_str(report.get('rows_out'))}"),
        ("rows the LLM was asked about", llm.get("rows")),
        ("tokens (prompt + completion)", f"{_str(llm.get('prompt_tokens'))} + {_str(llm.get('completion_tokens'))}"),
        ("cache hits", llm.get("cache_hits")),
        ("rows/s overall, while labelling", f"{_num(report.get('rows_per_s'), '{:.2f}')}, "
                                            f"{_num(report.get('labelling_rows_per_s'), '{:.2f}')}"),
        ("output", report.get("output")),
        ("run directory", report.get("run_dir")),
    ]
    if gold:
        facts.append(("gold rows; accuracy on resolved rows",
                      f"{_str(gold.get('rows'))}; {_num(gold.get('accuracy_resolved'), '{:.3f}')}"))
    seed = report.get("seed") or {}
    if seed and not seed.get("from_input", True):
        facts.append(("seed (separate pool, not counted above)",
                      f"{_str(seed.get('rows'))} rows, {_str(seed.get('llm_calls'))} LLM calls"))
    ref = report.get("reference") or {}
    if ref.get("asked"):
        facts.append(("reference rows asked up front", f"{ref['asked']} ({_str(ref.get('source'))})"))
    timings = report.get("timings_s") or {}
    if timings:
        facts.append(("time by phase", ", ".join(f"{k} {_num(v, '{:.1f}')} s" for k, v in timings.items())))
    return _section("Summary", body + _table(["", ""], [(k, _str(v)) for k, v in facts if v is not None]))


def _decided_by(report: dict, df: pd.DataFrame | None) -> str:
    counts = report.get("decided_by") or {}
    if not counts:
        return _section("Who decided", _note("the report has no decided_by counts"))
    total = sum(counts.values()) or 1
    by_acc = (report.get("gold") or {}).get("accuracy_by_decided_by") or {}
    head = ["decided by", "rows", "share"] + (["accuracy (gold)", "gold rows"] if by_acc else [])
    rows = []
    for k, v in sorted(counts.items(), key=lambda kv: -kv[1]):
        row = [k, v, _pct(v / total)]
        if by_acc:
            a = by_acc.get(k) or {}
            row += [_num(a.get("accuracy"), "{:.3f}"), _str(a.get("rows", ""))]
        rows.append(row)
    fig, ax = _plt().subplots(figsize=(7, 0.45 * len(counts) + 1.0))
    names = [r[0] for r in rows][::-1]
    ax.barh(names, [counts[n] / total for n in names], color="#4c78a8")
    for i, n in enumerate(names):
        ax.text(counts[n] / total, i, f" {counts[n] / total:.1%}", va="center", fontsize=9)
    ax.set(xlim=(0, 1.12), xlabel="share of rows", title="decided by")
    ax.grid(axis="x", alpha=0.3)
    body = _table(head, rows) + _img(fig, "share of rows by who decided them")
    if df is not None and "reason" in df.columns and "decided_by" in df.columns:
        why = df.loc[df["decided_by"] == "unresolved", "reason"].fillna("(no reason)").astype(str)
        if len(why):
            top = why.str.slice(0, 120).value_counts().head(8)
            body += "<p>Why rows are unresolved (most frequent reasons):</p>" + _table(
                ["reason", "rows"], list(top.items()))
    return _section("Who decided", body)


def _stages(report: dict) -> str:
    st = report.get("stages") or {}
    stages = st.get("stages") or []
    if not stages:
        if report.get("mode") == "active":
            return ""  # active mode has rounds, not stages: its own section
        return _section("Stages", _note("the report has no stages"))
    gold = any(r.get("accuracy") is not None for r in stages)
    head = ["stage", "rows voted", "LLM share", "LLM calls", "LLM tokens"]
    head += ["accuracy (gold)", "consensus accuracy (gold)"] if gold else []
    head += ["held-out check", "trained", "notes"]
    rows = []
    for r in stages:
        chk = r.get("check") or {}
        check = ""
        if chk.get("rows"):
            check = f"{_str(chk.get('source'))} ({chk['rows']} rows): " + ", ".join(
                f"{n} {_num(a, '{:.3f}')}" for n, a in (chk.get("specialists") or {}).items())
            if chk.get("gate"):
                t = chk["gate"].get("threshold")
                check += "; threshold " + ("none (all to the LLM)" if t is None else _num(t, "{:.3f}"))
        notes = []
        if r.get("rolled_back"):
            notes.append("rolled back " + ", ".join(map(str, r["rolled_back"])))
        if r.get("failed"):
            notes.append(f"FAILED: {r['failed']}")
        if r.get("train_restarts"):
            notes.append("Ray Train workers restarted: " + restarted(r["train_restarts"]))
        row = [r.get("stage"), r.get("rows"), _pct(r.get("hard_share")), r.get("llm_calls"), r.get("llm_tokens")]
        if gold:
            row += [_num(r.get("accuracy"), "{:.3f}"), _num(r.get("consensus_accuracy"), "{:.3f}")]
        row += [check, _num(r.get("train_s"), "{:.0f} s"), "; ".join(notes)]
        rows.append(row)
    body = _table(head, rows)
    extra = []
    if st.get("buffer_rows") is not None:
        extra.append(f"{st['buffer_rows']} controller rows in the training buffer")
    fv = st.get("final_vote") or {}
    if fv.get("rows"):
        extra.append(f"final vote (stage {_str(fv.get('stage'))}): {fv['rows']} rows voted again, "
                     f"{_str(fv.get('changed'))} changed")
    rc = st.get("recheck") or {}
    if rc:
        extra.append("recheck: " + ", ".join(f"{k} {_str(v)}" for k, v in rc.items() if not isinstance(v, dict)))
    if extra:
        body += _note("; ".join(extra))
    from labelwright.orchestrator.report_plots import stages_figure

    drawn = {"stages": [{"stage": i, "hard_share": None, **r} for i, r in enumerate(stages)]}
    body += _img(stages_figure(drawn), "LLM share and accuracy per stage")
    return _section("Stages: LLM share and accuracy", body)


def _active(report: dict) -> str:
    act = report.get("active") or {}
    if report.get("mode") != "active" and not act:
        return ""
    rounds = act.get("rounds") or []
    facts = [(k, _fmt(act.get(k))) for k in ("acquisition", "budget", "spent", "rows_bought",
                                             "model_accuracy_on_its_rows") if k in act]
    if act.get("reweight"):
        facts.append(("reweight", ", ".join(f"{k} {_fmt(v)}" for k, v in act["reweight"].items())))
    body = _table(["", ""], facts)
    stop = [r for r in rounds if "stopped" in r or "final_top_up" in r]
    rec = [r for r in rounds if "round" in r and r not in stop]
    if rec:
        keys = [k for k in ("round", "strategy", "asked", "labelled", "calls", "spent", "kappa", "check_accuracy",
                            "model_accuracy_before", "controller_accuracy") if any(k in r for r in rec)]
        body += _table(keys, [[_fmt(r.get(k)) for k in keys] for r in rec])
    if stop:
        body += _note("; ".join(", ".join(f"{k} {_fmt(v)}" for k, v in r.items()) for r in stop))
    if rounds:
        from labelwright.orchestrator.report_plots import rounds_figure

        drawn = [r for r in rounds if isinstance(r.get("spent"), (int, float))]
        body += _img(rounds_figure(drawn), "the task model's accuracy against the LLM calls bought")
    else:
        body += _note("no rounds were run")
    return _section("Active mode: rounds (no stages in this mode)", body)


def _labels_given(df: pd.DataFrame | None) -> str:
    if df is None or "label" not in df.columns:
        return ""
    given = pd.Series(_labels(df["label"]), dtype=object).dropna().value_counts()
    if not len(given):
        return _section("Labels", _note("no row has a label"))
    gold = (pd.Series(_labels(df["gold"]), dtype=object).dropna().value_counts()
            if _gold_mask(df) is not None else None)
    shown = given.head(CONFUSION_MAX_LABELS)
    rows = [[lab, int(n), _pct(n / len(df))] + ([int(gold.get(lab, 0))] if gold is not None else [])
            for lab, n in shown.items()]
    body = _table(["label", "rows", "share"] + (["gold rows"] if gold is not None else []), rows)
    if len(given) > len(shown):
        body += _note(f"the {len(shown)} most frequent of the {len(given)} labels given")
    return _section("Labels", body)


def _confidence(df: pd.DataFrame | None) -> str:
    title = "Confidence by who decided"
    if df is None or "confidence" not in df.columns or "decided_by" not in df.columns:
        return _section(title, _note("the output frame has no confidence column"))
    conf = pd.to_numeric(df["confidence"], errors="coerce")
    deciders = [d for d in df["decided_by"].dropna().astype(str).value_counts().index
                if conf[df["decided_by"] == d].notna().any()]
    if not deciders:
        return _section(title, _note("no row has a confidence"))
    gold = _gold_mask(df)
    right = gold & pd.Series(_labels(df["label"]) == _labels(df["gold"]), index=df.index) if gold is not None else None
    cols = min(3, len(deciders))
    nrows = -(-len(deciders) // cols)
    fig, axes = _plt().subplots(nrows, cols, figsize=(3.8 * cols, 2.8 * nrows), squeeze=False)
    bins = np.linspace(0, 1, 21)
    for ax, d in zip(axes.flat, deciders):
        mine = (df["decided_by"] == d) & conf.notna()
        if right is not None and (mine & gold).any():
            ax.hist([conf[mine & right].clip(0, 1), conf[mine & gold & ~right].clip(0, 1)], bins=bins,
                    stacked=True, color=["#54a24b", "#e45756"], label=["right", "wrong"])
            ax.legend(fontsize=8)
        else:
            ax.hist(conf[mine].clip(0, 1), bins=bins, color="#4c78a8")
        ax.set_title(f"{d} ({int(mine.sum())} rows)", fontsize=10)
        ax.set_xlabel("confidence", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(deciders):]:
        ax.axis("off")
    note = ("Stacked by whether the label matches gold. " if right is not None else "") + (
        "Consensus rows: the specialists' vote confidence; controller rows: the controller's probability for its "
        "answer (from logprobs, where the endpoint gives them).")
    return _section(title, _note(note) + _img(fig, "confidence histograms by who decided"))


def _gold(report: dict, df: pd.DataFrame | None) -> str:
    g = report.get("gold") or {}
    mask = _gold_mask(df)
    if not g and mask is None:
        return _section("Against gold", _note("no gold labels (--gold-column): no accuracy or confusion matrix"))
    body = ""
    if g:
        facts = [("gold rows", g.get("rows")), ("accuracy", _num(g.get("accuracy"), "{:.3f}")),
                 ("macro-F1", _num(g.get("macro_f1"), "{:.3f}")),
                 ("accuracy on resolved rows", _num(g.get("accuracy_resolved"), "{:.3f}"))]
        body += _table(["", ""], [(k, _str(v)) for k, v in facts])
        if g.get("accuracy_by_decided_by"):
            body += _note("Accuracy by who decided: in the table under Who decided.")
        alone = g.get("specialist_accuracy") or {}
        if alone:
            body += "<p>Each specialist alone (its vote on every gold row):</p>" + _table(
                ["specialist", "accuracy"], [(k, _num(v, "{:.3f}")) for k, v in alone.items()])
    comb = report.get("combined") or {}
    if comb.get("overruled"):
        text = (f"The combination overruled the controller on {comb['overruled']} of its "
                f"{_str(comb.get('controller_rows'))} rows")
        if comb.get("gold_rows"):
            text += (f"; on {comb['gold_rows']} of them with gold it is right {_num(comb.get('accuracy'), '{:.3f}')}, "
                     f"the controller {_num(comb.get('controller_accuracy'), '{:.3f}')}")
        body += _note(text + ".")
    if mask is not None and mask.any():
        body += _confusion(df[mask])
    return _section("Against gold", body)


def _confusion(g: pd.DataFrame) -> str:
    gold = g["gold"].astype(str)
    pred = pd.Series(_labels(g["label"]), index=g.index, dtype=object)
    freq = gold.value_counts()
    shown = list(freq.index[:CONFUSION_MAX_LABELS])
    pooled = len(freq) > len(shown) or bool((~pred.dropna().astype(str).isin(shown)).any())
    rows_l = shown + ([OTHER] if pooled and len(freq) > len(shown) else [])
    cols_l = shown + ([OTHER] if pooled else []) + ([NONE] if pred.isna().any() else [])
    pos_r = {lab: i for i, lab in enumerate(rows_l)}
    pos_c = {lab: i for i, lab in enumerate(cols_l)}
    m = np.zeros((len(rows_l), len(cols_l)), dtype=int)
    for t, p in zip(gold, pred):
        r = pos_r.get(t, pos_r.get(OTHER))
        c = pos_c[NONE] if p is None else pos_c.get(str(p), pos_c.get(OTHER))
        m[r, c] += 1
    n = len(rows_l)
    fig, ax = _plt().subplots(figsize=(max(4.5, 0.5 * len(cols_l) + 2.5), max(3.5, 0.45 * n + 2)))
    ax.imshow(m / np.maximum(m.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    if m.size <= 400:
        for (i, j), v in np.ndenumerate(m):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                        color="white" if v > 0.6 * m[i].sum() else "black")
    ax.set_xticks(range(len(cols_l)), [_short(x) for x in cols_l], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), [_short(x) for x in rows_l], fontsize=8)
    ax.set(xlabel="label given", ylabel="gold label", title="confusion matrix (colour: share of the gold row)")
    note = f"{len(g)} gold rows, {len(freq)} gold labels"
    if len(freq) > len(shown):
        note += (f"; the {len(shown)} most frequent gold labels are shown, the other {len(freq) - len(shown)} "
                 f"pooled as {OTHER}")
    return "<h3>Confusion matrix</h3>" + _note(note + ".") + _img(fig, "confusion matrix against gold")


def _cost(report: dict) -> str:
    llm = report.get("llm") or {}
    alone = report.get("all_rows_by_llm_estimate") or {}
    people = report.get("people") or {}
    if not llm and not alone and not people:
        return _section("Cost", _note("the report has no cost figures"))
    rows = [("this run's controller", _str(llm.get("calls")),
             _str((llm.get("prompt_tokens") or 0) + (llm.get("completion_tokens") or 0)), _usd(llm.get("cost_usd")))]
    if alone:
        rows.append((f"the controller alone on all {_str(report.get('rows_in'))} rows (estimate)", "",
                     _str(alone.get("tokens")), _usd(alone.get("cost_usd"))))
    if people:
        rows.append((f"people, ${_str(people.get('cost_per_row_usd'))} a row (--human-cost-per-row)", "", "",
                     _usd(people.get("cost_usd"))))
    body = _table(["who labels", "LLM calls", "tokens", "cost"], rows)
    notes = []
    if alone and alone.get("tokens") and (llm.get("prompt_tokens") or llm.get("completion_tokens")):
        used = (llm.get("prompt_tokens") or 0) + (llm.get("completion_tokens") or 0)
        notes.append(f"this run used {used / alone['tokens']:.0%} of the tokens the controller alone would")
    if people:
        if people.get("times_cheaper") is not None:
            notes.append(f"{people['times_cheaper']:g}x cheaper than people")
        else:
            notes.append("the controller here has no price (controller.price_*_per_1k): no comparison in dollars")
    if notes:
        body += _note("; ".join(notes) + ".")
    bars = [(name, v) for name, v in (("this run", llm.get("cost_usd")), ("controller alone", alone.get("cost_usd")),
                                      ("people", people.get("cost_usd"))) if isinstance(v, (int, float)) and v > 0]
    if len(bars) > 1:
        fig, ax = _plt().subplots(figsize=(6, 0.5 * len(bars) + 1.2))
        names = [b[0] for b in bars][::-1]
        vals = [b[1] for b in bars][::-1]
        ax.barh(names, vals, color="#f58518")
        ax.set_xscale("log")
        for i, v in enumerate(vals):
            ax.text(v, i, f" ${v:,.4g}", va="center", fontsize=9)
        ax.set_xlim(min(vals) / 3, max(vals) * 8)
        ax.set(xlabel="USD (log scale)", title="cost of labelling the rows")
        ax.grid(axis="x", alpha=0.3)
        body += _img(fig, "cost: this run against the controller alone and people")
    return _section("Cost", body)


def _reviews(report: dict) -> str:
    rev = report.get("reviews") or {}
    if not rev:
        return ""
    facts = [(k, _fmt(v)) for k, v in rev.items() if not isinstance(v, (dict, list))]
    for k, v in rev.items():
        if isinstance(v, dict):
            facts.append((k, ", ".join(f"{a} {_fmt(b)}" for a, b in v.items()) or "none"))
    return _section("Reviews by people", _table(["", ""], facts))


def _plan(report: dict) -> str:
    plan = report.get("plan") or {}
    specialists = report.get("specialists") or {}
    voting = report.get("voting") or {}
    if not plan and not specialists and not voting:
        return ""
    body = ""
    if plan:
        facts = [("source", plan.get("source")), ("file", plan.get("file")),
                 ("specialists planned", ", ".join(map(str, plan.get("specialists") or []))),
                 ("kept after the sample check", ", ".join(map(str, plan.get("kept") or []))),
                 ("voting rule", plan.get("voting_rule")), ("notes", plan.get("notes"))]
        usage = plan.get("llm") or {}
        if usage:
            facts.append(("LLM spent planning", ", ".join(f"{k} {_str(v)}" for k, v in usage.items())))
        body += _table(["", ""], [(k, _str(v)) for k, v in facts if v not in (None, "")])
    else:
        body += _note("no plan in this run: the specialists are the task's (its list, or the default ones)")
    if specialists:
        body += "<p>Specialists and the weights that voted last:</p>" + _table(
            ["specialist", "checkpoint"], list(specialists.items()))
    if voting:
        body += "<p>Voting:</p>" + _table(["setting", "value"], [
            (k, _str(v)) for k, v in voting.items() if not isinstance(v, dict) and v is not None])
    return _section("The plan and the specialists", body)


# --- helpers ----------------------------------------------------------------------------------------------


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _img(fig, alt: str) -> str:
    """The figure as an embedded PNG (and closed)."""
    plt = _plt()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img alt=\"{_e(alt)}\" src=\"data:image/png;base64,{data}\">"


def _gold_mask(df: pd.DataFrame | None) -> pd.Series | None:
    if df is None or "gold" not in df.columns or "label" not in df.columns:
        return None
    mask = df["gold"].notna()
    return mask if mask.any() else None


def _labels(values: pd.Series) -> np.ndarray:
    """Labels as strings in an object array, every kind of missing value (None, NaN, pd.NA) as None."""
    return np.array([None if pd.isna(v) else str(v) for v in values], dtype=object)


def _section(title: str, body: str) -> str:
    return f"<section><h2>{_e(title)}</h2>{body}</section>"


def _table(head: list, rows: list) -> str:
    if not rows:
        return ""
    th = "".join(f"<th>{_e(h)}</th>" for h in head) if any(head) else ""
    out = [f"<tr>{th}</tr>"] if th else []
    for r in rows:
        out.append("<tr>" + "".join(
            f"<td class=\"n\">{_e(c)}</td>" if isinstance(c, (int, float, np.number)) else f"<td>{_e(_str(c))}</td>"
            for c in r) + "</tr>")
    return "<table>" + "".join(out) + "</table>"


def _note(text: str) -> str:
    return f"<p class=\"note\">{_e(text)}</p>"


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _str(value) -> str:
    return "n/a" if value is None else str(value)


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else _str(value)


def _num(value, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float, np.number)) else "n/a"


def _pct(value) -> str:
    return _num(value, "{:.1%}")


def _usd(value) -> str:
    return _num(value, "${:,.4f}")


def _short(label: str, width: int = 28) -> str:
    label = str(label)
    return label if len(label) <= width else label[: width - 1] + "…"
