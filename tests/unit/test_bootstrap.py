import numpy as np
import pandas as pd
import pytest

from labelwright.orchestrator.bootstrap import _file_pool, label_choices, verbalise
from labelwright.specialists.errors import InputDataError


def test_file_pool_samples_texts_with_ids_that_cannot_collide(tmp_path):
    f = tmp_path / "pool.csv"
    pd.DataFrame({"text": [f"t{i}" for i in range(50)] + ["  "], "label": "x"}).to_csv(f, index=False)
    pool = _file_pool(str(f), "text", 20, seed=0)
    assert len(pool) == 20 and pool["id"].str.startswith("pool-").all()
    assert pool["text"].str.strip().ne("").all()
    with pytest.raises(InputDataError, match="no column 'body'"):
        _file_pool(str(f), "body", 20, seed=0)


def test_label_choices_narrow_by_similarity():
    labels = ["card_arrival", "exchange_rate", "top_up"]
    label_emb = np.eye(3, dtype=np.float32)
    texts = np.array([[0.1, 0.9, 0.0], [0.0, 0.2, 0.7]], dtype=np.float32)
    assert label_choices(texts, label_emb, labels, 2) == [["exchange_rate", "card_arrival"], ["top_up", "exchange_rate"]]
    assert verbalise("card_arrival", None) == "card arrival"
    assert verbalise("top-up", "adding money") == "top up: adding money"
