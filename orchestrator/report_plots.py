"""The report's figures as matplotlib figures (Agg): the stages' LLM share and accuracy, and active mode's learning
curve. :mod:`labelwright.orchestrator.report` saves them as PNGs beside the report; the HTML report embeds them."""

from __future__ import annotations


def stages_figure(stages: dict):
    """The per-stage figures: LLM (hard-row) share and accuracy, stage by stage (a matplotlib figure).

    Left: share of rows sent to the controller among the rows each stage's specialists voted on,
    and the hard share on the held-out check slice. Right: each specialist's accuracy on the check
    slice and, with gold, the accuracy of the consensus rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = stages["stages"]
    x = [r["stage"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(x, [r["hard_share"] for r in rows], "o-", label="rows voted by the stage")
    ax1.plot(x, [(r.get("check") or {}).get("hard_share") for r in rows], "s--", label="held-out check slice")
    ax1.set(title="LLM (hard-row) share", xlabel="stage", ylabel="share of rows", ylim=(0, 1))
    ax1.legend()
    names = sorted({n for r in rows for n in ((r.get("check") or {}).get("specialists") or {})})
    for n in names:
        ax2.plot(x, [((r.get("check") or {}).get("specialists") or {}).get(n) for r in rows], "o-", label=n)
    if any(r.get("consensus_accuracy") is not None for r in rows):
        ax2.plot(x, [r.get("consensus_accuracy") for r in rows], "k^-", label="consensus rows (gold)")
    src = next(((r.get("check") or {}).get("source") for r in rows if (r.get("check") or {}).get("rows")), None)
    ax2.set(title=f"accuracy (check slice: {src or 'none'})", xlabel="stage", ylabel="accuracy", ylim=(0, 1))
    if ax2.get_legend_handles_labels()[1]:  # nothing to plot without a check slice or gold
        ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    return fig


def rounds_figure(rounds: list[dict]):
    """Active mode's learning curve: the task model's accuracy against the LLM calls bought before it was
    fitted, on the gold file's rows (``check_accuracy``) and, with a gold column, on the rows not bought."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    fitted = [r for r in rounds if "final_top_up" not in r]
    x = [r["spent"] - r.get("calls", 0) for r in fitted]
    for key, name in (("check_accuracy", "gold file rows"), ("model_accuracy_before", "rows not bought (gold column)")):
        pts = [(a, r[key]) for a, r in zip(x, fitted) if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", label=name)
    ax.set(title="active mode: the task model's accuracy", xlabel="LLM calls bought", ylabel="accuracy", ylim=(0, 1))
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no gold rows to measure on", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    return fig
