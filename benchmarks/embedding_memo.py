"""What the driver's embedding memo (``remember_embeddings``) saves on a stage's fits and checks.

    python benchmarks/embedding_memo.py                       # the Qwen probe, movie_sentiment
    python benchmarks/embedding_memo.py --model minilm --dataset yahoo_topics

Two stages of one embedding specialist, in one process, as the driver runs them: stage 0 fits on 64 seed rows,
cross-fits with 100 gold rows and is checked on them; stage 1 cross-fits with 100 new rows more and is checked
again. Timed once with the memo off and once on (the model loaded before either); the rows are the train split's,
shuffled, with their gold labels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    import numpy as np
    import pandas as pd

    from labelwright.specialists.base import SpecialistConfig
    from labelwright.specialists.embedding_linear import EmbeddingLinearSpecialist
    from labelwright.specialists.encoder import remember_embeddings, shared_encoder
    from labelwright.training.stage import folds_of

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="movie_sentiment")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)

    df = pd.read_csv(DATASETS / args.dataset / "train.csv").sample(frac=1, random_state=0)
    texts, labels = df["text"].astype(str).tolist(), df["label"].astype(str).tolist()
    names = sorted(set(labels))
    seed, gold, new = slice(0, 64), slice(64, 164), slice(164, 264)
    cfg = SpecialistConfig(name="probe", kind="embedding_linear", model=args.model, batch_size=args.batch_size)
    shared_encoder(cfg.model, max_length=cfg.max_length, batch_size=args.batch_size)  # loaded outside the timing
    asked = 64 + 164 + 100 + 264 + 100  # the embeddings the two stages ask for, 264 rows among them

    def stages() -> float:
        t = time.monotonic()
        s = EmbeddingLinearSpecialist(cfg, names)
        s.fit(texts[seed], labels[seed])
        x, y = texts[seed] + texts[gold], labels[seed] + labels[gold]
        s.cross_fit(x, y, folds=np.concatenate([np.full(64, -1), folds_of(texts[gold])]))
        s.predict_proba(texts[gold])
        x, y = x[:64] + texts[new] + x[64:], y[:64] + labels[new] + y[64:]
        s.cross_fit(x, y, folds=np.concatenate([np.full(164, -1), folds_of(texts[gold])]))
        s.predict_proba(texts[gold])
        return time.monotonic() - t

    remember_embeddings(0)
    off = stages()
    remember_embeddings(256 << 20)
    on = stages()
    remember_embeddings(0)
    print(f"{args.model} on {args.dataset}: two stages' fits and checks ({asked} embeddings asked for, 264 rows): "
          f"without the memo {off:.1f} s, with it {on:.1f} s ({off / on:.1f}x)")


if __name__ == "__main__":
    main()
