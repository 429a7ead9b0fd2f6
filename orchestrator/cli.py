"""The ``labelwright`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from labelwright.specialists.errors import InputDataError, LabelwrightError


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
    p.add_argument("--llm-backend", choices=["auto", "bfloat16", "float32"],
                   help="how the embedded LLM runs: auto (default) is bfloat16 where the CPU multiplies it natively")
    p.add_argument("--controller-mode", choices=["label", "candidates"],
                   help="label (default): one label a row; candidates: the controller names every plausible label "
                        "when unsure and a student distilled from those sets decides between them")
    p.add_argument("--max-candidates", type=int, help="most labels in a candidate set (3)")
    p.add_argument("--voting-rule", help="auto (the default: stacked, learned on the reference rows, when there are "
                                         "some; else the plan's rule or unanimity), unanimity, majority, "
                                         "confidence_weighted or stacked")
    p.add_argument("--route", choices=["measured", "threshold"],
                   help="measured (default): settle rows only where reference rows show the specialists lose at "
                        "most --max-loss against the controller; threshold: the rule's threshold alone")
    p.add_argument("--max-loss", type=float, help="accuracy the settled rows may lose against the controller (0.02)")
    p.add_argument("--reference-rows", type=int, help="rows the controller answers up front to route by (150)")
    p.add_argument("--gold-file", help="labelled rows (columns text,label; need not be in the input) to use as the "
                                       "reference rows instead of gold rows of the input or an audit")
    p.add_argument("--threshold", type=float, help="minimum mean probability for a consensus label")
    p.add_argument("--target-accuracy", type=float,
                   help="calibrate the threshold at every stage on held-out rows to reach this consensus accuracy")
    p.add_argument("--seed-size", type=int, help="rows the controller labels first to train the specialists")
    p.add_argument("--seed-file", help="gold-labelled seed file (columns text,label) used instead of the controller")
    p.add_argument("--max-llm-calls", type=int, help="budget: rows past it stay unresolved")
    p.add_argument("--max-llm-tokens", type=int, help="budget: rows past it stay unresolved")
    p.add_argument("--max-cost-usd", type=float,
                   help="budget in USD at the controller's prices (controller.price_*_per_1k): rows past it stay "
                        "unresolved")
    p.add_argument("--human-cost-per-row", type=float,
                   help="USD people are paid to label a row, for the report's comparison (default 0.036: three "
                        "Mechanical Turk workers at SageMaker Ground Truth's lowest text-classification price)")
    p.add_argument("--mode", choices=["pipeline", "active"],
                   help="pipeline (default): specialists vote, the controller settles the hard rows; active: the "
                        "controller labels the rows an acquisition strategy picks, in rounds, within --max-llm-calls, "
                        "and a task model trained on them labels the rest")
    p.add_argument("--acquisition", help="active mode: random, entropy, least_confidence, margin, kmeans, kcenter or "
                                         "hybrid (default)")
    p.add_argument("--rounds", type=int, help="active mode: split the budget over this many rounds (8)")
    p.add_argument("--batch-per-round", type=int, help="active mode: rows the controller labels per round")
    p.add_argument("--stop-kappa", type=float, help="active mode: stop the rounds once Cohen's kappa between two "
                                                    "rounds' predictions reaches this; the rest of the budget buys "
                                                    "the least confident rows")
    p.add_argument("--reweight", action=argparse.BooleanOptionalAction, default=None,
                   help="active mode: learning to reweight the controller's labels against --gold-file rows")
    p.add_argument("--limit", type=int, help="label only the first N rows")
    p.add_argument("--run-dir", help="where checkpoints, the seed set and partial output go (default: OUTPUT.run)")
    p.add_argument("--fresh", action="store_true", help="discard the run directory and start over")
    p.add_argument("--retry-unresolved", action="store_true",
                   help="ask again the rows an earlier run left unresolved for a reason that may pass (timeouts, "
                        "HTTP 429/5xx, connection errors, an unusable response, the budget: the retryable column); "
                        "the others keep their reason")
    p.add_argument("--plan", help="plan file (from `labelwright plan`) naming the specialists; default: the task's "
                                  "specialists, or a plan made now and saved as OUTPUT.plan.yaml")
    p.add_argument("--zoo", action="append", help="extra model zoo file (YAML/JSON) for planning; repeatable")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="show Ray's and the libraries' output on the terminal too (by default it goes to "
                        "RUN_DIR/logs/run.log and the terminal shows labelwright's lines and a progress bar)")


def _estimate_parser(sub) -> None:
    p = sub.add_parser(
        "estimate",
        help="what labelling INPUT would cost, without any LLM call",
        description="Count the controller's real prompts on a sample of INPUT's rows with a tokenizer and price "
                    "them: every row by the controller, and the pipeline (seed, reference rows and the expected "
                    "hard share of the rest); set against people labelling every row. Spends nothing.",
    )
    p.add_argument("input", help="CSV, JSONL or Parquet file (or a folder of them)")
    p.add_argument("--labels", help="comma-separated label set")
    p.add_argument("--task", help="task spec file (YAML or JSON): its prices (controller.price_*_per_1k) apply")
    p.add_argument("--text-column", help="column holding the text (default: text)")
    p.add_argument("--instruction", help="what the labels mean, in a sentence, for the controller")
    p.add_argument("--limit", type=int, help="only the first N rows")
    p.add_argument("--hard-share", type=float,
                   help="share (0-1) of the rows past the seed and reference rows expected to go to the "
                        "controller (default: a stated assumption)")
    p.add_argument("--seed-size", type=int, help="rows the controller labels first")
    p.add_argument("--reference-rows", type=int, help="rows the controller answers up front to route by")
    p.add_argument("--max-llm-calls", type=int, help="budget: calls past it are not made")
    p.add_argument("--human-cost-per-row", type=float, help="USD people are paid to label a row (0.036)")
    p.add_argument("--mode", choices=["pipeline", "active"], help="pipeline (default) or active")
    p.add_argument("--controller-mode", choices=["label", "candidates"], help="label (default) or candidates")
    p.add_argument("--json", metavar="FILE", help="also write the estimate as JSON here")


def _estimate_command(args) -> None:
    from labelwright.orchestrator.estimate import estimate, render
    from labelwright.orchestrator.spec import load_task

    spec = load_task(args.task, _overrides(args))
    est = estimate([args.input], spec, limit=args.limit, hard_share=args.hard_share)
    print("\n".join(render(est)))
    if args.json:
        Path(args.json).write_text(est.model_dump_json(indent=1))


def _plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="have the controller choose specialists from the model zoo (a validated plan file)",
        description="Ask the controller to choose specialists from the zoo and map their labels; the answer is "
                    "validated, repaired once, else replaced by a deterministic choice. Run it with "
                    "`labelwright annotate INPUT --plan PLAN`.",
    )
    p.add_argument("input", nargs="?", help="data file: a few of its texts are shown to the planner (as data)")
    p.add_argument("--output", "-o", required=True, help="plan file to write (.yaml)")
    p.add_argument("--task", help="task spec file (YAML or JSON)")
    p.add_argument("--labels", help="comma-separated label set")
    p.add_argument("--instruction", help="what the labels mean, in a sentence")
    p.add_argument("--text-column", help="column holding the text (default: text)")
    p.add_argument("--zoo", action="append", help="extra model zoo file (YAML/JSON); repeatable")
    p.add_argument("--address", help="Ray cluster for the embedded LLM ('auto', 'ray://...'); default: a local one")
    p.add_argument("--base-url", help="OpenAI-compatible controller endpoint; default: the embedded local LLM")
    p.add_argument("--model", help="controller model name at --base-url")
    p.add_argument("--llm", help="embedded LLM model name or path")


def _zoo_parser(sub) -> None:
    p = sub.add_parser("zoo", help="list the model zoo and what is available offline here")
    p.add_argument("--zoo", action="append", help="extra model zoo file (YAML/JSON); repeatable")
    p.add_argument("--task", help="task spec file: its planning settings (zoo entries, model_dirs) apply")


def _llm_parser(sub) -> None:
    p = sub.add_parser(
        "llm",
        help="serve the embedded LLM as an OpenAI-compatible endpoint, in the foreground",
        description="Start the embedded local LLM and serve it at http://HOST:PORT/v1 (chat completions with "
                    "label-enum JSON schemas, /v1/models) until Ctrl-C; point --base-url of other runs at it.",
    )
    p.add_argument("--model", default=None, help="qwen2.5-coder-0.5b-instruct (default), smollm2-135m-instruct, "
                                                 "or a local Hugging Face model directory")
    p.add_argument("--port", type=int, default=None, help="port to listen on (default: 8000)")
    p.add_argument("--host", default=None, help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--backend", default=None, choices=["auto", "bfloat16", "float32"],
                   help="auto (default): bfloat16 where the CPU multiplies it natively, else float32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs of this machine)")
    p.add_argument("--candidate-margin", type=float, default=None,
                   help="a candidate-set request gets the labels within this natural-log margin of the best (1.5)")


def _select_annotator_parser(sub) -> None:
    p = sub.add_parser(
        "select-annotator",
        help="choose the controller: each annotator of a list labels a gold sample K times; the best by agreement "
             "is written into a task file",
        description="Each annotator (endpoint + model + prompt variant, from --annotators) labels the gold rows "
                    "--repeats times; accuracy, macro-F1, Cohen's kappa against gold, Fleiss' kappa and "
                    "Krippendorff's alpha across repeats, cost and seconds per row are printed, one annotator is "
                    "chosen by a stated rule and written into --output as the task's controller section.",
    )
    p.add_argument("--gold", required=True, help="labelled rows (CSV/JSONL/Parquet with text and label columns)")
    p.add_argument("--annotators", required=True,
                   help="YAML/JSON: annotators: [{name, base_url, model, api_key_env?, shots?, mode?, temperature?, "
                        "price_prompt_per_1k?, price_completion_per_1k?}, ...]")
    p.add_argument("--output", "-o", required=True, help="task file to write (.yaml)")
    p.add_argument("--labels", help="comma-separated label set")
    p.add_argument("--task", help="task spec file (YAML or JSON): its settings are kept, its controller replaced")
    p.add_argument("--instruction", help="what the labels mean, in a sentence")
    p.add_argument("--repeats", type=int, default=3, help="times each annotator labels every gold row (3)")
    p.add_argument("--limit", type=int, help="use only the first N gold rows")


def _export_review_parser(sub) -> None:
    p = sub.add_parser(
        "export-review",
        help="write rows of an output for people to review in Label Studio or Argilla, labelwright's answer "
             "as a pre-annotation",
        description="Write the rows of OUTPUT to review (the most doubtful first) in the import format of Label "
                    "Studio (tasks with predictions, and the labeling config beside them) or Argilla 2.x (records "
                    "with suggestions, and the dataset settings beside them). Read the reviewed answers back with "
                    "`labelwright import-review`.",
    )
    p.add_argument("output", help="the output file of `labelwright annotate` (.parquet, .csv or .jsonl)")
    p.add_argument("--format", required=True, choices=["label-studio", "argilla"], help="the tool to review in")
    p.add_argument("--rows", default="hard", choices=["hard", "low-confidence", "disagreement", "all"],
                   help="hard (default): rows the specialists did not settle; low-confidence: the least confident "
                        "of every decider (needs --limit; measured to fix the most errors a reviewed row, README); "
                        "disagreement: rows the specialists or the controller disagree on; all")
    p.add_argument("--limit", type=int, help="at most N rows, the most doubtful first")
    p.add_argument("--output", "-o", dest="dest", required=True, help="file to write (.json)")
    p.add_argument("--run-dir", help="the run directory of OUTPUT, for its label set (default: OUTPUT.run)")
    p.add_argument("--labels", help="comma-separated label set, where the run directory is gone")


def _import_review_parser(sub) -> None:
    p = sub.add_parser(
        "import-review",
        help="read people's reviewed answers (a Label Studio or Argilla export) into a run as gold rows",
        description="Read a Label Studio JSON export or an Argilla export of rows written by `labelwright "
                    "export-review` into RUN/reviews.parquet. The same annotate command again writes them into the "
                    "output (decided_by: human); a run that starts over (--fresh) also takes them as gold reference "
                    "rows.",
    )
    p.add_argument("file", help="the tool's export (.json or .jsonl)")
    p.add_argument("--run-dir", required=True,
                   help="the run directory of the exported output (OUTPUT.run by default)")
    p.add_argument("--format", choices=["label-studio", "argilla"], help="the tool (default: told from the file)")


def _export_review_command(args) -> None:
    from labelwright.orchestrator.job import default_run_dir
    from labelwright.orchestrator.review import export_review

    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
    run_dir = args.run_dir or default_run_dir(Path(args.output))
    done = export_review(args.output, tool=args.format, dest=args.dest, rows=args.rows, limit=args.limit,
                         run_dir=run_dir, labels=labels)
    print(f"{done['written']} of {done['of']} rows ({args.rows}) written to {done['file']}")
    if args.format == "label-studio":
        print(f"Label Studio: create a project with the labeling config in {done['beside']}, import {done['file']} "
              "(labelwright's answers come as predictions), review, and export the project as JSON")
    else:
        print("Argilla (Python, argilla 2.x):\n"
              "  import json, argilla as rg\n"
              f"  dataset = rg.Dataset(name=\"review\", settings=rg.Settings.from_json({done['beside']!r}))\n"
              "  dataset.create()\n"
              f"  dataset.records.log([rg.Record.from_dict(r) for r in json.load(open({done['file']!r}))])\n"
              "review, and export the answers: "
              "json.dump(dataset.records.to_list(flatten=True), open(\"EXPORT.json\", \"w\"))")
    print(f"then: labelwright import-review EXPORT.json --run-dir {run_dir}")


def _serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a run's specialists and routing over HTTP (Ray Serve), in the foreground",
        description="Deploy a finished (or running) run as a Ray Serve application: POST /v1/label labels texts as "
                    "the run does (its specialists vote, hard rows go to its controller), POST "
                    "/v1/specialists/NAME/predict, GET /v1/specialists, GET /healthz, the OpenAPI page at /docs. "
                    "Runs until Ctrl-C; with --write-config, writes a config file for `serve deploy` instead.",
    )
    p.add_argument("run_dir", help="the run directory of an `annotate` run (OUTPUT.run by default)")
    p.add_argument("--host", default=None, help="address Serve's HTTP proxy listens on (default: 127.0.0.1; "
                                                "0.0.0.0 in a written config)")
    p.add_argument("--port", type=int, default=8000, help="Serve's HTTP port (default: 8000)")
    p.add_argument("--address", help="Ray cluster to deploy on ('auto', 'ray://host:10001'); default: the run's, "
                                     "else a local one")
    p.add_argument("--base-url", help="controller endpoint for the hard rows; default: the run's (a run with the "
                                      "embedded LLM gets one started beside the service)")
    p.add_argument("--model", help="controller model name at --base-url")
    p.add_argument("--max-texts", type=int, help="texts one request may hold (256)")
    p.add_argument("--write-config", metavar="FILE", help="write a Serve config file (YAML) for `serve deploy` and exit")


def _serve_command(args) -> None:
    from labelwright.orchestrator import service

    if args.write_config:
        path = service.write_serve_config(args.run_dir, args.write_config, host=args.host or "0.0.0.0",
                                          port=args.port, base_url=args.base_url, model=args.model)
        print(f"Serve config written to {path}; deploy it with: serve deploy {path}")
        return
    import signal
    import threading

    from ray import serve

    say = lambda msg: print(f"labelwright serve: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    url = service.start_service(args.run_dir, host=args.host or "127.0.0.1", port=args.port, address=args.address,
                                base_url=args.base_url, model=args.model, log=say,
                                **({"max_texts": args.max_texts} if args.max_texts else {}))
    print(url, flush=True)
    say(f"POST {url}/v1/label {{\"texts\": [...]}}; API at {url}/docs; Ctrl-C stops it")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ray's own handlers would leave the service up
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    serve.delete(service.APP_NAME)
    say("stopped")


def _llm_command(args) -> None:

    from labelwright.cluster.embedded_llm import EmbeddedLLMConfig, serve_foreground

    given = {"model": args.model, "port": args.port, "host": args.host, "backend": args.backend,
             "torch_threads": args.threads or os.cpu_count() or 1, "candidate_margin": args.candidate_margin}
    config = EmbeddedLLMConfig(**{k: v for k, v in given.items() if v is not None})
    print(f"labelwright llm: loading {config.model} (backend {config.backend}, {config.threads} threads)",
          file=sys.stderr, flush=True)
    try:
        serve_foreground(config, on_ready=lambda url: print(url, flush=True))
    except KeyboardInterrupt:  # Ctrl-C is how it is meant to stop: open requests were finished first
        pass
    print("labelwright llm: stopped", file=sys.stderr)


def _overrides(a: argparse.Namespace) -> dict:
    get = lambda name: getattr(a, name, None)  # noqa: E731 - not every command has every flag
    if a.command != "annotate":
        o = {"labels": get("labels"), "text_column": get("text_column"), "instruction": get("instruction"),
             "controller": {"base_url": get("base_url"), "model": get("model"), "mode": get("controller_mode")},
             "embedded_llm": {"model": get("llm")}, "runtime": {"address": get("address")},
             "seed": {"size": get("seed_size")}, "voting": {"reference_rows": get("reference_rows")},
             "budget": {"max_llm_calls": get("max_llm_calls"), "human_cost_per_row": get("human_cost_per_row")},
             "mode": get("mode")}
        return {k: ({kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v)
                for k, v in o.items()}
    o: dict = {
        "labels": a.labels, "text_column": a.text_column, "id_column": a.id_column, "gold_column": a.gold_column,
        "instruction": a.instruction,
        "controller": {"base_url": a.base_url, "model": a.model, "mode": a.controller_mode,
                       "max_candidates": a.max_candidates},
        "embedded_llm": {"model": a.llm, "backend": a.llm_backend},
        "voting": {"rule": a.voting_rule, "threshold": a.threshold, "target_accuracy": a.target_accuracy,
                   "route": a.route, "max_loss": a.max_loss, "reference_rows": a.reference_rows,
                   "gold_file": a.gold_file},
        "seed": {"size": a.seed_size, "gold_file": a.seed_file},
        "budget": {"max_llm_calls": a.max_llm_calls, "max_llm_tokens": a.max_llm_tokens,
                   "max_cost_usd": a.max_cost_usd, "human_cost_per_row": a.human_cost_per_row},
        "runtime": {"address": a.address},
        "mode": a.mode,
        "active": {"acquisition": a.acquisition, "rounds": a.rounds, "batch_per_round": a.batch_per_round,
                   "stop_kappa": a.stop_kappa, "reweight": a.reweight},
    }
    return {k: ({kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v) for k, v in o.items()}


def main(argv: list[str] | None = None, *, own_process: bool = False) -> int:
    """Run one command; its exit status. ``own_process``: the process is the command's alone (the
    ``labelwright`` script), so what Ray prints after a quiet job has ended may go to the run's log."""
    parser = argparse.ArgumentParser(prog="labelwright", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _annotate_parser(sub)
    _estimate_parser(sub)
    _plan_parser(sub)
    _zoo_parser(sub)
    _llm_parser(sub)
    _serve_parser(sub)
    _select_annotator_parser(sub)
    _export_review_parser(sub)
    _import_review_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "annotate":
            if not args.verbose:
                # Ray holds repeated worker lines back and prints them, counted, at shutdown: after the job has
                # given the terminal back. Printed as they come, they land in the run's log with the rest.
                os.environ.setdefault("RAY_DEDUP_LOGS", "0")
            from labelwright.orchestrator.job import annotate
            from labelwright.orchestrator.spec import load_task

            overrides = _overrides(args)
            spec = load_task(args.task, overrides)
            if args.zoo:
                spec.planning.zoo_files += args.zoo
            annotate(args.input, spec=spec, output=Path(args.output), run_dir=args.run_dir, report_path=args.report,
                     output_format=args.format, limit=args.limit, fresh=args.fresh, plan_path=args.plan,
                     retry_unresolved=args.retry_unresolved, quiet=not args.verbose)
            if own_process and not args.verbose:
                from labelwright.orchestrator.console import keep_in_log
                from labelwright.orchestrator.job import default_run_dir

                keep_in_log(Path(args.run_dir) if args.run_dir else default_run_dir(Path(args.output)))
        elif args.command == "estimate":
            _estimate_command(args)
        elif args.command == "plan":
            _plan_command(args)
        elif args.command == "zoo":
            _zoo_command(args)
        elif args.command == "llm":
            _llm_command(args)
        elif args.command == "select-annotator":
            from labelwright.orchestrator.annotators import select_annotator
            from labelwright.orchestrator.job import _log
            from labelwright.orchestrator.spec import load_task

            spec = load_task(args.task, _overrides(args))
            select_annotator(args.gold, args.annotators, spec=spec, repeats=args.repeats, output=args.output,
                             task_path=args.task, limit=args.limit, log=_log)
        elif args.command == "serve":
            _serve_command(args)
        elif args.command == "export-review":
            _export_review_command(args)
        elif args.command == "import-review":
            from labelwright.orchestrator.review import import_review

            import_review(args.file, run_dir=args.run_dir, tool=args.format)
    except LabelwrightError as exc:
        print(f"labelwright: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("labelwright: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def _plan_command(args) -> None:
    from labelwright.cluster import runtime
    from labelwright.orchestrator.dataset_io import read_frame
    from labelwright.orchestrator.job import _log, start_controller
    from labelwright.orchestrator.plan import make_plan
    from labelwright.orchestrator.spec import load_task
    from labelwright.specialists.encoder import shared_encoder
    from labelwright.specialists.zoo import planning_zoo

    spec = load_task(args.task, _overrides(args))
    spec.planning.zoo_files += args.zoo or []
    zoo = planning_zoo(spec.planning)
    samples: list[str] = []
    if args.input and spec.planning.sample_rows:
        df = read_frame(args.input)
        if spec.text_column not in df.columns:
            raise InputDataError(f"{args.input} has no column {spec.text_column!r}; its columns are {list(df.columns)}; "
                                 "pass --text-column")
        texts = df[spec.text_column].dropna().astype(str)
        samples = texts[texts.str.strip() != ""].head(spec.planning.sample_rows).tolist()
    if spec.controller.base_url is None:
        runtime.connect(spec.runtime.address, num_cpus=spec.runtime.num_cpus)
    _, controller = start_controller(spec)
    plan = make_plan(controller, zoo, labels=spec.label_names, descriptions=spec.descriptions,
                     instruction=spec.instruction, cfg=spec.planning, samples=samples, encode=shared_encoder("minilm").encode,
                     log=_log)
    path = plan.save(args.output)
    print(f"plan ({plan.source}): {', '.join(s.zoo_id for s in plan.specialists)}; voting {plan.voting_rule}; "
          f"written to {path}")
    for note in plan.notes:
        print(f"  note: {note}")


def _zoo_command(args) -> None:
    from labelwright.orchestrator.plan import ineligible
    from labelwright.orchestrator.spec import PlanningConfig, load_task
    from labelwright.specialists.zoo import planning_zoo

    cfg = load_task(args.task).planning if args.task else PlanningConfig(allow_hub=True)
    cfg.zoo_files += args.zoo or []
    zoo = planning_zoo(cfg)
    print(f"{'id':26} {'kind':20} {'families':24} {'params':>8}  offline  model")
    for e in zoo:
        kind = e.kind + (f"/{e.head or e.method}" if (e.head or e.method) else "")
        print(f"{e.id:26} {kind:20} {','.join(e.families)[:24]:24} {e.params_m:>7g}M  {'yes' if e.offline() else 'no':7}  "
              f"{e.model}" + (f"  [not plannable: {ineligible(e, cfg)}]" if args.task and ineligible(e, cfg) else ""))


def run() -> None:
    """The ``labelwright`` script."""
    sys.exit(main(own_process=True))


if __name__ == "__main__":
    run()
