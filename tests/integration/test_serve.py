"""`labelwright serve`: a finished run as a Serve application on the session's cluster, called over HTTP
(real MiniLM/TF-IDF specialists, the fake OpenAI-compatible controller)."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from labelwright.orchestrator import service
from labelwright.orchestrator.cli import main
from labelwright.orchestrator.job import annotate
from labelwright.specialists.errors import ConfigError
from tests.conftest import movie_slice
from tests.fake_openai import FakeOpenAI, oracle
from tests.integration.test_annotate import spec_for


def call(url: str, body=None, *, raw: bytes | None = None, method: str | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            return exc.code, json.loads(text or "{}")
        except ValueError:  # not JSON (a proxy's or a crashed route's plain text): still an answer to check
            return exc.code, {"raw": text[:2000]}


@pytest.fixture(scope="module")
def served(ray_cluster, serve_port, datasets_dir, tmp_path_factory):
    """A finished run (160 movie rows, the oracle controller) and its service at the root of Serve's port."""
    tmp = tmp_path_factory.mktemp("serve")
    path, df = movie_slice(datasets_dir, tmp, 160)
    with FakeOpenAI(oracle(dict(zip(df["text"], df["label"])))) as server:
        out = tmp / "out.parquet"
        annotate(path, spec=spec_for(server), output=out)
        run_dir = tmp / "out.run"
        url = service.start_service(run_dir, host="127.0.0.1", port=serve_port, log=lambda m: None)
        yield {"url": url, "run_dir": run_dir, "out": pd.read_parquet(out), "server": server, "tmp": tmp}
        from ray import serve

        serve.delete(service.APP_NAME)


def test_the_service_labels_as_the_run_did(served):
    out, url, server = served["out"], served["url"], served["server"]
    rows = out[~out["seed"].astype(bool)]
    consensus = rows[rows["decided_by"] == "consensus"].head(20)
    asked = rows[rows["decided_by"] == "controller"].head(10)
    assert len(consensus) and len(asked)
    texts = consensus["text"].tolist() + asked["text"].tolist() + ["   "]
    before = server.chat_calls
    status, body = call(url + "/v1/label", {"texts": texts})
    assert status == 200, body
    results = body["results"]
    assert len(results) == len(texts)  # one answer per text, in the order asked
    for r, (_, row) in zip(results, consensus.iterrows()):
        assert (r["decided_by"], r["label"]) == ("consensus", row["label"])
        assert {n: v["version"] for n, v in r["votes"].items()} == {n: row[f"version_{n}"] for n in ("tfidf", "probe")}
    for r, (_, row) in zip(results[len(consensus):], asked.iterrows()):
        # the same rows are hard; the controller (an oracle) answers them as it did in the run
        assert (r["decided_by"], r["label"], r["controller_label"]) == ("controller", row["gold"], row["gold"])
    assert server.chat_calls - before == len(asked)
    assert results[-1]["decided_by"] == "unresolved" and results[-1]["reason"] == "empty text"
    assert body["stage"] == 0


def test_routes_and_bad_requests_get_4xx_never_500(served):
    url = served["url"]
    records = json.loads((served["run_dir"] / "stages.json").read_text())
    status, health = call(url + "/healthz")
    assert status == 200 and health["status"] == "ok" and health["labels"] == ["positive", "negative"]

    status, body = call(url + "/v1/specialists")
    assert status == 200
    by_name = {s["name"]: s for s in body["specialists"]}
    assert {n: s["version"] for n, s in by_name.items()} == records[-1]["versions"]
    assert all(s["replicas"] >= 1 and s["device"] == "cpu" for s in by_name.values())

    status, pred = call(url + "/v1/specialists/probe/predict", {"texts": ["a wonderful, moving film", "dull"]})
    assert status == 200 and pred["labels"] == ["positive", "negative"] and len(pred["results"]) == 2
    assert all(abs(sum(r["probs"]) - 1) < 1e-4 and r["label"] in pred["labels"] for r in pred["results"])

    status, api = call(url + "/openapi.json")
    assert status == 200 and {"/v1/label", "/v1/specialists", "/healthz"} <= set(api["paths"])

    huge = "x" * (service.MAX_TEXT_CHARS + 1)
    bad = [
        ("/v1/label", {"texts": []}, None),
        ("/v1/label", {"texts": ["fine", 3]}, None),
        ("/v1/label", {"text": "no list"}, None),
        ("/v1/label", None, b"{not json"),
        ("/v1/label", {"texts": ["a"] * (service.MAX_TEXTS + 1)}, None),
        ("/v1/label", {"texts": ["ok", huge]}, None),
        ("/v1/specialists/nobody/predict", {"texts": ["a"]}, None),
        ("/v1/specialists/probe/predict", {"texts": "not a list"}, None),
    ]
    for route, body, raw in bad:
        status, answer = call(url + route, body, raw=raw)
        assert 400 <= status < 500, (route, body, status, answer)
        assert answer.get("detail") and len(json.dumps(answer)) < 2000  # a message; never the input echoed back
    assert "texts[1]" in call(url + "/v1/label", {"texts": ["ok", huge]})[1]["detail"]
    assert "nobody" in call(url + "/v1/specialists/nobody/predict", {"texts": ["a"]})[1]["detail"]


def test_a_serve_config_file_that_serve_deploy_accepts(served, tmp_path):
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    run_dir = served["run_dir"]
    path = tmp_path / "serve.yaml"
    assert main(["serve", str(run_dir), "--write-config", str(path), "--port", "8123"]) == 0
    config = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    (app,) = config["applications"]  # the run's controller is an endpoint: no LLM application beside it
    assert app["route_prefix"] == "/" and app["args"] == {"run_dir": str(run_dir.resolve())}
    assert import_attr(app["import_path"]) is service.app_builder
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8123}

    # A run labelled by the embedded LLM: the config starts it as an application of its own, at its prefix.
    embedded = tmp_path / "embedded.run"
    shutil.copytree(run_dir, embedded)
    record = embedded / service.SERVICE_DIR / service.RECORD
    record.write_text(json.dumps({**json.loads(record.read_text()), "embedded": True}))
    config = service.serve_config(embedded, port=8123)
    llm, app = config["applications"]
    assert import_attr(llm["import_path"]).__name__ == "app_builder"
    assert app["args"]["base_url"] == f"http://127.0.0.1:8123{llm['route_prefix']}/v1"
    with pytest.raises(ConfigError, match="embedded LLM"):
        service.app_builder({"run_dir": str(embedded)})  # no endpoint to send hard rows to


def test_a_later_stage_rolls_in_while_requests_are_sent(served, tmp_path):
    """Building the application again with a newer stage is a rolling update: no request fails."""
    from ray import serve

    from labelwright.specialists.base import MANIFEST, read_manifest

    run_dir = tmp_path / "later.run"
    shutil.copytree(served["run_dir"], run_dir)
    records = json.loads((run_dir / "stages.json").read_text())
    old = records[-1]["checkpoints"]["tfidf"]
    new = run_dir / "checkpoints" / "tfidf" / "stage-1"
    shutil.copytree(old, new)
    manifest_path = new / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = read_manifest(old)["version"] + "-later"
    manifest_path.write_text(json.dumps(manifest))
    later = {**records[-1], "stage": 1, "checkpoints": {**records[-1]["checkpoints"], "tfidf": str(new)},
             "versions": {**records[-1]["versions"], "tfidf": manifest["version"]}}
    (run_dir / "stages.json").write_text(json.dumps(records + [later]))

    url, texts = served["url"], served["out"]["text"].head(8).tolist()
    statuses, failures, stop = [], [], threading.Event()

    def caller():
        while not stop.is_set():
            try:
                status, body = call(url + "/v1/label", {"texts": texts})
            except Exception as exc:  # noqa: BLE001 - a dropped connection is a failed request too
                status, body = type(exc).__name__, str(exc)
            statuses.append(status)
            if status != 200:
                failures.append(body)

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        serve.run(service.app_builder({"run_dir": str(run_dir)}), name=service.APP_NAME, route_prefix="/")
        status, body = call(url + "/v1/specialists")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(statuses) >= 3 and set(statuses) == {200}, (statuses, failures[:3])
    assert {s["name"]: s["version"] for s in body["specialists"]}["tfidf"] == manifest["version"]
    after = call(url + "/v1/label", {"texts": texts})[1]
    assert after["stage"] == 1 and {r["votes"]["tfidf"]["version"] for r in after["results"]} == {manifest["version"]}
