"""End to end with the real embedded LLM (Qwen2.5-Coder-0.5B-Instruct) on a small real slice."""

import pandas as pd

from labelwright.orchestrator.job import annotate
from labelwright.orchestrator.spec import load_task


def test_annotate_movie_slice_with_embedded_llm(embedded_llm, datasets_dir, tmp_path):
    _, llm = embedded_llm
    df = pd.read_csv(datasets_dir / "movie_sentiment" / "test.csv").head(40)
    src = tmp_path / "slice.csv"
    df.to_csv(src, index=False)
    spec = load_task(None, {
        "labels": "positive,negative",
        "instruction": "Classify the sentiment of this movie review sentence.",
        "gold_column": "label",
        # base_url null: the job starts the embedded LLM itself (here it finds the session's one running)
        "embedded_llm": {"port": llm.port},
        "controller": {"cache_path": str(tmp_path / "cache.sqlite")},
        "seed": {"size": 12},
        "specialists": [{"name": "tfidf", "kind": "tfidf_linear"}, {"name": "probe", "kind": "embedding_linear"}],
    })
    report = annotate(src, spec=spec, output=tmp_path / "out.parquet")
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert len(out) == 40 and out["row"].tolist() == list(range(40))
    assert report["controller"]["model"] == "qwen2.5-coder-0.5b-instruct"
    asked = out[out["llm_calls"] > 0]
    assert len(asked) >= 12  # the seed at least
    assert asked["prompt_tokens"].gt(0).all()
    ctrl = out[out["decided_by"] == "controller"]
    assert ctrl["controller_confidence"].between(0, 1).all()  # from the endpoint's logprobs
    # A real model on real data: well above chance on the rows it settled (the README reports ~80-86%).
    assert (ctrl["label"] == ctrl["gold"]).mean() >= 0.6
    assert report["gold"]["accuracy"] >= 0.55
