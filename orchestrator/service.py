"""A run as a Ray Serve application people call over HTTP (``labelwright serve RUN_DIR``).

The job records what serving needs in ``<run_dir>/service/`` before it labels: the resolved task (the plan's
specialists, the voting rule ``auto`` became), the controller's settings and its demonstration bank. The
application is built from that record and the run's stage records (``stages.json``), so a finished run and
a running one are served alike, with what the run has accepted so far:

- each specialist's latest accepted checkpoint is a deployment of its own (autoscaling and resources from the
  task, a fractional GPU where the cluster has GPUs), the same deployment a job votes through;
- one ingress deployment votes on the texts of a request with the run's rule and the fits of its last checked
  stage (threshold, stacked weights, the controller's combination), sends the hard ones to the controller with
  the run's prompts, demonstrations and cache, and answers in the order asked.

Routes sit at the root of Serve's HTTP port: ``POST /v1/label``, ``POST /v1/specialists/{name}/predict``,
``GET /v1/specialists``, ``GET /healthz``, and FastAPI's OpenAPI page (``/docs``, ``/openapi.json``). Running the
builder again with newer checkpoints (a later stage) is a rolling update: requests in flight finish.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures of the ingress class at
# runtime, from a wrapper Serve makes, where the annotations' names would not resolve.
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, StrictStr

from labelwright.orchestrator.learning import RECORDS, fits_for, published_fits
from labelwright.orchestrator.spec import TaskSpec
from labelwright.specialists.errors import ConfigError

SERVICE_DIR = "service"
RECORD = "service.json"
DEMONSTRATIONS = "demonstrations.parquet"
APP_NAME = "labelwright"
IMPORT_PATH = "labelwright.orchestrator.service:app_builder"
LLM_IMPORT_PATH = "labelwright.cluster.embedded_llm:app_builder"
MAX_TEXTS = 256  # texts per request
MAX_TEXT_CHARS = 100_000  # characters per text (the specialists read runtime.max_vote_chars of them)


# ---- the run's record ------------------------------------------------------------------------------------------
def save_record(run_dir: Path, *, spec: TaskSpec, controller: dict, embedded: bool, calibrated: bool,
                demonstrations: tuple) -> Path:
    """Write what ``labelwright serve`` needs to answer as this run does. ``demonstrations``: the controller's bank
    (texts, labels, embeddings or None). Written again by every (resumed) run; atomic."""
    folder = Path(run_dir) / SERVICE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    texts, labels, emb = demonstrations
    bank = pd.DataFrame({"text": list(texts), "label": list(labels)})
    if emb is not None and len(texts):
        bank["embedding"] = [np.asarray(e, dtype=np.float32) for e in emb]
    tmp = folder / (DEMONSTRATIONS + ".tmp")
    bank.to_parquet(tmp, index=False)
    os.replace(tmp, folder / DEMONSTRATIONS)
    record = {"format": 1, "task": spec.model_dump(mode="json"), "controller": controller, "embedded": embedded,
              "calibrated": calibrated}
    tmp = folder / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, folder / RECORD)
    return folder / RECORD


@dataclass
class ServiceState:
    """A run as a service reads it: its task, controller settings, demonstrations and accepted stages."""

    run_dir: Path
    spec: TaskSpec
    controller: dict
    embedded: bool  # the run's controller was the embedded LLM (started by the job, not a URL the user gave)
    calibrated: bool  # the voters' thresholds (and fits) come from the stages' checks
    demo_texts: list[str]
    demo_labels: list[str]
    demo_embeddings: np.ndarray | None
    records: list[dict]

    @property
    def stage(self) -> int:
        return self.records[-1]["stage"]

    @property
    def checkpoints(self) -> dict[str, str]:
        return dict(self.records[-1]["checkpoints"])

    @property
    def versions(self) -> dict[str, str]:
        return dict(self.records[-1].get("versions") or {})

    def fits(self):
        """The voters' lookup of threshold and fits by specialist versions, as the run's StageGate answered it."""
        published = published_fits(self.records)
        return lambda versions: fits_for(published, versions)


def load_service(run_dir: str | Path) -> ServiceState:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"no run directory at {run_dir}: give the run directory of an `annotate` run "
                          "(OUTPUT.run by default, or its --run-dir)")
    path = run_dir / SERVICE_DIR / RECORD
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} has no service record ({SERVICE_DIR}/{RECORD}): the run stopped before labelling began, or "
            "a labelwright older than `serve` made it. Run the same `labelwright annotate` command again: it resumes "
            "(nothing is bought twice) and writes the record before it labels")
    data = json.loads(path.read_text())
    stages = run_dir / RECORDS
    records = json.loads(stages.read_text()) if stages.is_file() else []
    if not records:
        raise ConfigError(f"{run_dir} has no accepted stage ({RECORDS} is missing or empty): the specialists were not "
                          "trained yet; run the `labelwright annotate` command again to finish the run")
    missing = [f"{n}: {p}" for n, p in records[-1]["checkpoints"].items() if not Path(p).is_dir()]
    if missing:
        raise ConfigError(f"checkpoints of {run_dir} are missing ({'; '.join(missing)}); a run directory must stay "
                          "whole (and, on a cluster, on storage every node reads at the same path)")
    bank = pd.read_parquet(run_dir / SERVICE_DIR / DEMONSTRATIONS)
    emb = np.stack(bank["embedding"].to_numpy()) if "embedding" in bank.columns and len(bank) else None
    return ServiceState(run_dir=run_dir, spec=TaskSpec.model_validate(data["task"]), controller=data["controller"],
                        embedded=bool(data["embedded"]), calibrated=bool(data["calibrated"]),
                        demo_texts=bank["text"].tolist(), demo_labels=bank["label"].tolist(), demo_embeddings=emb,
                        records=records)


# ---- the application -------------------------------------------------------------------------------------------
class TextsRequest(BaseModel):
    texts: list[StrictStr] = Field(min_length=1, description="the texts to label, answered in this order")


class Vote(BaseModel):
    label: str | None
    prob: float | None
    version: str | None


class LabelResult(BaseModel):
    label: str | None = Field(description="the label; null when the row could not be labelled (see reason)")
    decided_by: str = Field(description="consensus (the specialists), controller, combined or unresolved")
    confidence: float | None
    reason: str | None = None
    controller_label: str | None = None
    votes: dict[str, Vote] = Field(default_factory=dict)


class LabelResponse(BaseModel):
    results: list[LabelResult]
    stage: int


class SpecialistPrediction(BaseModel):
    label: str
    confidence: float
    probs: list[float] = Field(description="one per label, in the order of `labels`")


class PredictResponse(BaseModel):
    name: str
    version: str
    labels: list[str]
    results: list[SpecialistPrediction]


def _number(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def _service_deployment(*, replicas: int, max_ongoing_requests: int):
    """The ingress deployment (built here, not at import: FastAPI and Serve load only where a service runs)."""
    from fastapi import FastAPI, HTTPException
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from ray import serve

    api = FastAPI(title="labelwright", description="Label texts as a labelwright run does: its specialists vote, "
                                                   "its controller settles the hard rows.")

    @api.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        # FastAPI's own answer echoes the input back (a 10 MB text, too); say what is wrong and where, only.
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse(status_code=422, content={"detail": f"bad request: {problems}. Send a JSON body "
                                                                f"{{\"texts\": [\"...\", ...]}}"})

    @serve.deployment(name="LabelService", num_replicas=replicas, max_ongoing_requests=max_ongoing_requests,
                      logging_config={"log_level": "WARNING", "enable_access_log": False})
    @serve.ingress(api)
    class LabelService:
        def __init__(self, state: ServiceState, controller: dict, limits: dict, specialists: dict):
            from labelwright.orchestrator.stages import (
                ControllerSettings, ControllerStage, VoteSettings, VoteStage, demonstration_embeddings,
            )

            spec = state.spec  # the run as the builder read it: the stage whose checkpoints it deployed
            self.state, self.labels, self.limits = state, spec.label_names, limits
            self.handles = dict(specialists)
            vote = VoteSettings(labels=spec.label_names, endpoints={n: None for n in self.handles},
                                rule=spec.voting.rule, threshold=spec.voting.threshold, weights=spec.voting.weights,
                                calibrated=state.calibrated, max_chars=spec.runtime.max_vote_chars,
                                candidates_k=int(controller.get("max_choices") or 12),
                                embeddings_of=demonstration_embeddings(controller))
            self.vote = VoteStage(vote, handles=self.handles, fits=state.fits())
            self.ask = ControllerStage(ControllerSettings(
                controller=controller, labels=spec.label_names, descriptions=spec.descriptions,
                instruction=spec.instruction, demo_texts=state.demo_texts, demo_labels=state.demo_labels,
                demo_embeddings=state.demo_embeddings))

        def _check(self, texts: list[str]) -> None:
            if len(texts) > self.limits["max_texts"]:
                raise HTTPException(413, f"{len(texts)} texts in one request; send at most {self.limits['max_texts']} "
                                         "(split the list)")
            for i, t in enumerate(texts):
                if len(t) > self.limits["max_text_chars"]:
                    raise HTTPException(413, f"texts[{i}] has {len(t)} characters; at most "
                                             f"{self.limits['max_text_chars']} are accepted")

        @api.post("/v1/label", response_model=LabelResponse)
        def label(self, body: TextsRequest) -> dict:
            """Label the texts as the run would: consensus of the specialists where the run's routing lets them
            settle a row, else the controller (combined with the specialists where the run fitted that)."""
            from labelwright.specialists.errors import LabelwrightError

            texts = body.texts
            self._check(texts)
            batch = pd.DataFrame({"id": [f"request-{i}" for i in range(len(texts))], "text": texts,
                                  "skip_reason": ["empty text" if not t.strip() else None for t in texts]})
            try:
                out = self.ask(self.vote(batch))
            except LabelwrightError as exc:  # the controller endpoint is down: the caller may try again later
                raise HTTPException(503, str(exc)) from None
            results = []
            for _, row in out.iterrows():
                votes = {n: {"label": _text(row[f"vote_{n}"]), "prob": _number(row[f"prob_{n}"]),
                             "version": _text(row[f"version_{n}"])} for n in self.handles}
                results.append({"label": _text(row["label"]), "decided_by": row["decided_by"],
                                "confidence": _number(row["confidence"]), "reason": _text(row["reason"]),
                                "controller_label": _text(row["controller_label"]), "votes": votes})
            return {"results": results, "stage": self.state.stage}

        @api.post("/v1/specialists/{name}/predict", response_model=PredictResponse)
        def predict(self, name: str, body: TextsRequest) -> dict:
            """One specialist's probabilities over the labels, for each text."""
            from labelwright.cluster.deploy import predict_all

            handle = self._handle(name)
            self._check(body.texts)
            out = predict_all({name: handle}, list(body.texts))[name]
            probs = np.asarray(out["probs"], dtype=np.float64)
            top = probs.argmax(1)
            return {"name": name, "version": out["version"], "labels": self.labels,
                    "results": [{"label": self.labels[k], "confidence": float(p[k]), "probs": [float(x) for x in p]}
                                for k, p in zip(top, probs)]}

        @api.get("/v1/specialists")
        def specialists(self) -> dict:
            """The specialists: kind, version, checkpoint, device, and how many replicas Serve runs of each."""
            from labelwright.cluster.deploy import deployment_name

            replicas = _replicas()
            out = []
            for name, handle in self.handles.items():
                info = handle.info.remote().result()
                out.append({**info, "name": name, "replicas": replicas.get(deployment_name(name))})
            return {"specialists": out, "stage": self.state.stage}

        @api.get("/healthz")
        def healthz(self) -> dict:
            return {"status": "ok", "run_dir": str(self.state.run_dir), "stage": self.state.stage,
                    "labels": self.labels}

        def _handle(self, name: str):
            if name not in self.handles:
                raise HTTPException(404, f"no specialist {name!r}; this run has {sorted(self.handles)}")
            return self.handles[name]

    return LabelService


def _replicas() -> dict[str, int]:
    """Running replicas of each deployment of this application (empty where Serve's status cannot be read)."""
    from ray import serve

    try:
        app = serve.get_replica_context().app_name
        status = serve.status().applications[app]
        return {name: int(d.replica_states.get("RUNNING", 0)) for name, d in status.deployments.items()}
    except Exception:  # noqa: BLE001 - the counts are informative; the route must answer without them
        return {}


def _controller(state: ServiceState, base_url: str | None, model: str | None) -> dict:
    controller = dict(state.controller)
    if base_url:
        controller.update(base_url=base_url, **({"model": model} if model else {}))
    elif state.embedded:
        raise ConfigError(
            f"{state.run_dir} was labelled by the embedded LLM, which a service starts beside itself: use "
            "`labelwright serve RUN_DIR` (it starts it), or give base_url (--base-url) of an endpoint to use instead")
    return controller


def app_builder(args: dict[str, Any]):
    """The application of a run (``serve deploy`` calls this by ``import_path``; so does ``labelwright serve``).

    ``args``: ``run_dir`` (required), ``base_url`` and ``model`` (the controller to use; required where the run used
    the embedded LLM), ``max_texts`` (256) and ``max_text_chars`` (100000) a request may hold, ``replicas`` of the
    ingress (1) and its ``max_ongoing_requests`` (16). Ray must be connected (Serve's build does that)."""
    from labelwright.cluster.deploy import specialist_deployment
    from labelwright.cluster.runtime import describe, use_gpu

    known = {"run_dir", "base_url", "model", "max_texts", "max_text_chars", "replicas", "max_ongoing_requests"}
    unknown = sorted(set(args) - known)
    if unknown or "run_dir" not in args:
        raise ConfigError(f"labelwright service args: {'unknown ' + str(unknown) if unknown else 'run_dir is missing'}; "
                          f"it takes {sorted(known)}")
    state = load_service(Path(args["run_dir"]).resolve())
    controller = _controller(state, args.get("base_url"), args.get("model"))
    gpu = use_gpu(state.spec.runtime.use_gpu, describe())
    specialists = {c.name: specialist_deployment(c, gpu=gpu, checkpoint=state.checkpoints[c.name])
                   for c in state.spec.specialists}
    limits = {"max_texts": int(args.get("max_texts") or MAX_TEXTS),
              "max_text_chars": int(args.get("max_text_chars") or MAX_TEXT_CHARS)}
    service = _service_deployment(replicas=int(args.get("replicas") or 1),
                                  max_ongoing_requests=int(args.get("max_ongoing_requests") or 16))
    return service.bind(state, controller, limits, specialists)


def serve_config(run_dir: str | Path, *, host: str = "0.0.0.0", port: int = 8000, base_url: str | None = None,
                 model: str | None = None) -> dict:
    """A Serve config file's content (``serve deploy`` takes it) for the run: its application at ``/``, and the
    embedded LLM as an application of its own at its prefix where the run used it and no ``base_url`` is given."""
    state = load_service(run_dir)
    args: dict[str, Any] = {"run_dir": str(Path(run_dir).resolve())}
    apps = []
    if base_url:
        args.update(base_url=base_url, **({"model": model} if model else {}))
    elif state.embedded:
        llm = state.spec.embedded_llm.model_copy(update={"host": host, "port": port})
        apps.append({"name": llm.app_name, "route_prefix": llm.route_prefix, "import_path": LLM_IMPORT_PATH,
                     "args": llm.model_dump(mode="json")})
        # Every node runs a proxy (proxy_location EveryNode): the LLM is reachable on loopback wherever the
        # labelling replica lands.
        args["base_url"] = f"http://127.0.0.1:{port}{llm.route_prefix}/v1"
    apps.append({"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": args})
    return {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port}, "applications": apps}


def write_serve_config(run_dir: str | Path, path: str | Path, **kwargs) -> Path:
    import yaml

    config = serve_config(run_dir, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Serve config for the labelwright run {Path(run_dir).resolve()}\n"
              f"# deploy with: serve deploy {path.name}   (labelwright installed on every node; the run directory "
              "on storage every node reads at the same path)\n")
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path


def start_service(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                  base_url: str | None = None, model: str | None = None, log=print, **args) -> str:
    """Deploy the run's application on the Ray cluster at ``address`` (a local one by default), with Serve's HTTP
    proxy on ``host:port``; start the embedded LLM beside it where the run used it and no ``base_url`` is given.
    Returns the URL once ``/healthz`` answers there."""
    from ray import serve

    from labelwright.cluster import runtime

    state = load_service(run_dir)  # a bad run directory fails here, before Ray starts
    runtime.connect(address if address is not None else state.spec.runtime.address)
    serve.start(http_options={"host": host, "port": port})
    if not base_url and state.embedded:
        from labelwright.cluster.embedded_llm import served_model, start_embedded_llm

        llm = state.spec.embedded_llm.model_copy(update={"host": host, "port": port})
        log(f"starting the embedded LLM ({llm.model}) beside the service")
        base_url = start_embedded_llm(llm)
        model = served_model(base_url) or state.controller.get("model")
    log(f"deploying {len(state.spec.specialists)} specialist(s) of stage {state.stage} and the labelling route")
    serve.run(app_builder({"run_dir": str(run_dir), "base_url": base_url, "model": model, **args}),
              name=APP_NAME, route_prefix="/")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    _wait_healthy(url)
    return url


def _wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    import urllib.error
    import urllib.request

    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.5)
    raise ConfigError(f"the service was deployed but {url}/healthz did not answer within {timeout_s:.0f} s ({last}); "
                      "Serve keeps the HTTP port it was first started on in a cluster: check `serve status` and "
                      "pass that --port")
