"""The ``labelwright`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from labelwright.orchestrator.errors import LabelwrightError


def _annotate_parser(sub) -> None:
    p = sub.add_parser(
        "annotate",
        help="label every row of a CSV / JSONL / Parquet file",
        description="Label every row of INPUT: specialists vote, the LLM controller settles the hard rows.",
    )
    p.add_argument("input", help="CSV, JSONL or Parquet file (or a folder of them)")
    p.add_argument("--output", "-o", required=True, help="output file (.parquet, .csv or .jsonl)")
    p.add_argument("--labels", help="comma-separated label set, e.g. positive,negative")
    p.add_argument("--task", help="task spec file (YAML or JSON); flags override it")
    p.add_argument("--text-column", help="column holding the text (default: text)")
    p.add_argument("--id-column", help="column holding unique row ids (default: row numbers)")
    p.add_argument("--gold-column", help="column with gold labels: the report then gives accuracy")
    p.add_argument("--instruction", help="what the labels mean, in a sentence, for the controller")
    p.add_argument("--report", help="write the run report (JSON) here")
    p.add_argument("--format", choices=["parquet", "csv", "jsonl"], help="output format (default: from suffix)")
    p.add_argument("--address", help="Ray cluster to use ('auto', 'ray://host:10001'); default: start a local one")
    p.add_argument("--base-url", help="OpenAI-compatible controller endpoint; default: the embedded local LLM")
    p.add_argument("--model", help="controller model name at --base-url")
    p.add_argument("--llm", help="embedded LLM model: qwen2.5-coder-0.5b-instruct, smollm2-135m-instruct or a path")
    p.add_argument("--voting-rule", help="unanimity, majority or confidence_weighted")
    p.add_argument("--threshold", type=float, help="minimum mean probability for a consensus label")
    p.add_argument("--seed-size", type=int, help="rows the controller labels first to train the specialists")
    p.add_argument("--seed-file", help="gold-labelled seed file (columns text,label) used instead of the controller")
    p.add_argument("--max-llm-calls", type=int, help="budget: rows past it stay unresolved")
    p.add_argument("--max-llm-tokens", type=int, help="budget: rows past it stay unresolved")
    p.add_argument("--limit", type=int, help="label only the first N rows")
    p.add_argument("--run-dir", help="where checkpoints, the seed set and partial output go (default: OUTPUT.run)")
    p.add_argument("--fresh", action="store_true", help="discard the run directory and start over")


def _overrides(a: argparse.Namespace) -> dict:
    o: dict = {
        "labels": a.labels, "text_column": a.text_column, "id_column": a.id_column, "gold_column": a.gold_column,
        "instruction": a.instruction,
        "controller": {"base_url": a.base_url, "model": a.model},
        "embedded_llm": {"model": a.llm},
        "voting": {"rule": a.voting_rule, "threshold": a.threshold},
        "seed": {"size": a.seed_size, "gold_file": a.seed_file},
        "budget": {"max_llm_calls": a.max_llm_calls, "max_llm_tokens": a.max_llm_tokens},
        "runtime": {"address": a.address},
    }
    return {k: ({kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v) for k, v in o.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labelwright", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _annotate_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "annotate":
            from labelwright.orchestrator.job import annotate
            from labelwright.orchestrator.spec import load_task

            spec = load_task(args.task, _overrides(args))
            annotate(args.input, spec=spec, output=Path(args.output), run_dir=args.run_dir, report_path=args.report,
                     output_format=args.format, limit=args.limit, fresh=args.fresh)
    except LabelwrightError as exc:
        print(f"labelwright: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("labelwright: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
