import numpy as np
import pytest

from labelwright.training.stage import balanced_weights


def test_balanced_weights_equalise_label_totals():
    labels = ["pos"] * 6 + ["neg"] * 2
    w = balanced_weights(labels)
    assert w[:6].sum() == pytest.approx(w[6:].sum())
    assert w.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(balanced_weights(["a", "b"]), [1.0, 1.0])


# ---- hard-sample buffer ----------------------------------------------------------------------------

import pandas as pd  # noqa: E402

from labelwright.orchestrator.report import plot_stages  # noqa: E402
from labelwright.orchestrator.spec import VotingConfig  # noqa: E402
from labelwright.orchestrator.voting import check_judge  # noqa: E402
from labelwright.specialists.base import SpecialistConfig  # noqa: E402
from labelwright.training.buffer import HardBuffer, held_out  # noqa: E402
from labelwright.training.stage import CheckSet, evaluate, run_stage, train_stage  # noqa: E402


def rows(start, n, label="pos"):
    return pd.DataFrame({"row": range(start, start + n), "id": [f"r{i}" for i in range(start, start + n)],
                         "text": [f"text {i}" for i in range(start, start + n)], "label": label, "confidence": 0.9})


def test_buffer_survives_restart_without_doubling(tmp_path):
    buf = HardBuffer(tmp_path / "buffer")
    assert buf.append(rows(0, 5), stage=0) == 5
    assert buf.append(rows(3, 5), stage=1) == 3  # rows 3 and 4 are already kept
    assert buf.last_seq == 7
    # A batch the killed run was writing (never renamed into place) is dropped on reopen.
    (tmp_path / "buffer" / "batch-000099.parquet.tmp").write_bytes(b"half a file")
    again = HardBuffer(tmp_path / "buffer")
    f = again.frame()
    assert f["row"].tolist() == list(range(8)) and f["row"].is_unique
    assert f["stage"].tolist() == [0] * 5 + [1] * 3
    assert not list((tmp_path / "buffer").glob("*.tmp"))
    # The resumed run re-asks rows 6..9: only 8 and 9 are new; seq continues.
    assert again.append(rows(6, 4), stage=1) == 2
    assert again.frame()["seq"].tolist() == list(range(10))
    assert again.new_since(7) == 2
    assert len(HardBuffer(tmp_path / "buffer")) == 10


def test_held_out_is_stable_and_near_the_fraction():
    ids = [f"row-{i}" for i in range(4000)]
    picks = [held_out(i, 0.2) for i in ids]
    assert picks == [held_out(i, 0.2) for i in ids]
    assert 0.17 < np.mean(picks) < 0.23
    assert not any(held_out(i, 0.0) for i in ids[:100])


# ---- stages, check and rollback (linear specialists, in-process) ---------------------------------

LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def movie_split(datasets_dir):
    df = pd.read_csv(datasets_dir / "movie_sentiment" / "train.csv").head(700)
    return df.iloc[:100], df.iloc[100:400], df.iloc[400:700]


def test_a_harmful_stage_is_rolled_back_and_a_good_one_kept(movie_split, tmp_path):
    seed, stream, held = movie_split
    configs = [SpecialistConfig(name="probe", kind="embedding_linear")]
    stage0 = train_stage(configs, seed["text"].tolist(), seed["label"].tolist(), label_names=LABELS,
                         run_dir=tmp_path, stage=0, log=lambda m: None)
    check = CheckSet(held["text"].tolist(), held["label"].tolist(), "gold")

    def buffer_of(labels):
        return pd.DataFrame({"row": range(len(stream)), "id": [str(i) for i in range(len(stream))],
                             "text": stream["text"].tolist(), "label": labels, "confidence": 0.9,
                             "stage": 0, "seq": range(len(stream)), "holdout": False})

    flipped = [LABELS[1 - LABELS.index(lab)] for lab in stream["label"]]
    bad = run_stage(configs, stage=1, deployed=stage0, seed_texts=seed["text"].tolist(),
                    seed_labels=seed["label"].tolist(), buffer=buffer_of(flipped), since_seq=-1, replay_ratio=1.0,
                    check=check, label_names=LABELS, run_dir=tmp_path, log=lambda m: None)
    assert bad["rolled_back"] == ["probe"]
    assert bad["checkpoints"] == stage0 and bad["candidates"]["probe"] != stage0["probe"]
    assert bad["check_after"]["specialists"]["probe"] < bad["check_before"]["specialists"]["probe"]
    assert bad["check"] == bad["check_before"]

    good = run_stage(configs, stage=2, deployed=stage0, seed_texts=seed["text"].tolist(),
                     seed_labels=seed["label"].tolist(), buffer=buffer_of(stream["label"].tolist()), since_seq=-1,
                     replay_ratio=1.0, check=check, label_names=LABELS, run_dir=tmp_path, log=lambda m: None)
    assert good["rolled_back"] == [] and good["checkpoints"]["probe"].endswith("stage-2")
    assert good["check"]["specialists"]["probe"] > good["check_before"]["specialists"]["probe"]
    assert good["new_rows"] == len(stream) and good["linear_rows"] == len(seed) + len(stream)
    assert good["replay_rows"] == len(seed)  # replay pool is the seed (no earlier buffer rows): all of it


def test_too_few_check_rows_accept_the_stage_unchecked(movie_split, tmp_path):
    seed, stream, held = movie_split
    configs = [SpecialistConfig(name="tfidf", kind="tfidf_linear")]
    stage0 = train_stage(configs, seed["text"].tolist(), seed["label"].tolist(), label_names=LABELS,
                         run_dir=tmp_path, stage=0, log=lambda m: None)
    buf = pd.DataFrame({"row": range(50), "id": [str(i) for i in range(50)], "text": stream["text"][:50].tolist(),
                        "label": "positive", "confidence": 0.9, "stage": 0, "seq": range(50), "holdout": False})
    rec = run_stage(configs, stage=1, deployed=stage0, seed_texts=seed["text"].tolist(),
                    seed_labels=seed["label"].tolist(), buffer=buf, since_seq=-1, upto_seq=29, replay_ratio=0.0,
                    check=CheckSet(held["text"][:5].tolist(), held["label"][:5].tolist(), "controller"),
                    label_names=LABELS, run_dir=tmp_path, log=lambda m: None)
    assert not rec["checked"] and rec["rolled_back"] == []
    assert rec["new_rows"] == 30 and rec["upto_seq"] == 29 and rec["replay_rows"] == 0


def test_evaluate_reports_hard_share_and_consensus_accuracy(movie_split, tmp_path):
    seed, _, held = movie_split
    configs = [SpecialistConfig(name="a", kind="tfidf_linear"), SpecialistConfig(name="b", kind="tfidf_linear", l2=10.0)]
    ck = train_stage(configs, seed["text"].tolist(), seed["label"].tolist(), label_names=LABELS,
                     run_dir=tmp_path, log=lambda m: None)
    ev = evaluate(ck, CheckSet(held["text"].tolist(), held["label"].tolist(), "gold"), label_names=LABELS,
                  judge=check_judge(None))
    assert ev["rows"] == len(held) and set(ev["specialists"]) == {"a", "b"}
    assert 0.0 <= ev["hard_share"] <= 1.0 and 0.0 <= ev["consensus_accuracy"] <= 1.0
    assert evaluate(ck, CheckSet([], [], "controller"), label_names=LABELS, judge=check_judge(None))["hard_share"] is None
    # without a judge the specialists are measured alone
    alone = evaluate(ck, CheckSet(held["text"].tolist(), held["label"].tolist(), "gold"), label_names=LABELS)
    assert alone["specialists"] == ev["specialists"] and alone["hard_share"] is None
    calibrated = VotingConfig(target_accuracy=0.7)
    fit = evaluate(ck, CheckSet(held["text"].tolist(), held["label"].tolist(), "gold"), label_names=LABELS,
                   judge=check_judge(calibrated, min_fit_rows=len(held)))["gate"]
    assert fit["rows"] == len(held) and fit["target_accuracy"] == 0.7
    # too few rows to fit on: no gate, and the shares are the configured rule's (what the voters use)
    few = evaluate(ck, CheckSet(held["text"].tolist(), held["label"].tolist(), "gold"), label_names=LABELS,
                   judge=check_judge(calibrated, min_fit_rows=len(held) + 1))
    assert "gate" not in few and few["hard_share"] == ev["hard_share"]


def test_the_judge_routes_by_the_controllers_answers_on_the_reference_rows(movie_split, tmp_path):
    seed, _, held = movie_split
    configs = [SpecialistConfig(name="a", kind="tfidf_linear"), SpecialistConfig(name="b", kind="tfidf_linear", l2=10.0)]
    ck = train_stage(configs, seed["text"].tolist(), seed["label"].tolist(), label_names=LABELS,
                     run_dir=tmp_path, log=lambda m: None)
    texts, gold = held["text"].tolist(), held["label"].tolist()
    measured = VotingConfig(rule="confidence_weighted", max_loss=0.5)
    # A controller that is always wrong: the specialists lose nothing wherever they settle.
    wrong = [LABELS[1 - LABELS.index(g)] for g in gold]
    asked = [w if i % 2 == 0 else None for i, w in enumerate(wrong)]  # asked about every other row
    ev = evaluate(ck, CheckSet(texts, gold, "gold", controller=asked), label_names=LABELS,
                  judge=check_judge(measured, min_fit_rows=5))
    gate = ev["gate"]
    assert gate["kind"] == "route" and gate["reference"] == "gold" and gate["rows"] == len(asked[::2])
    assert gate["controller_accuracy_all"] == 0.0 and gate["threshold"] is not None and gate["curve"]
    assert ev["hard_share"] == pytest.approx(np.mean(_conf(ck, texts) < gate["threshold"]))
    # The controller combined with the specialists, judged out of fold on the same rows: a binary controller
    # always wrong is always overruled (its answer, weighted negatively, is evidence of the other label).
    # Judged only on the reference rows it would decide, those the routing leaves to the controller: here
    # (nearly) all of them are settled, so too few remain to fit on.
    hard = _conf(ck, texts)[::2] < gate["threshold"]
    assert hard.sum() < len(asked[::2]) and (gate["combine"] is None or gate["combine"]["rows"] == hard.sum())
    strict = measured.model_copy(update={"target_accuracy": 0.999})  # settles nothing: every row is the controller's
    combine = evaluate(ck, CheckSet(texts, gold, "gold", controller=asked), label_names=LABELS,
                       judge=check_judge(strict, min_fit_rows=5))["gate"]["combine"]
    assert combine["rows"] == len(asked[::2]) and combine["controller_accuracy"] == 0.0
    assert combine["applied"] and combine["won"] > combine["lost"] and len(combine["stack"]["a"]) == 3
    never = evaluate(ck, CheckSet(texts, gold, "gold", controller=asked), label_names=LABELS,
                     judge=check_judge(measured.model_copy(update={"combine": "never"}), min_fit_rows=5))["gate"]
    assert "combine" not in never
    # An audit: the labels are the controller's own; nothing is asked beyond them.
    audit = evaluate(ck, CheckSet(texts, gold, "audit", controller=list(gold)), label_names=LABELS,
                     judge=check_judge(measured, min_fit_rows=5))["gate"]
    assert audit["reference"] == "audit" and audit["controller_accuracy"] is None
    assert "combine" not in audit  # the labels are the controller's: nothing to combine it against
    # The stacked rule: its weights are fitted on the reference rows and published with the threshold.
    stack = evaluate(ck, CheckSet(texts, gold, "gold", controller=asked), label_names=LABELS,
                     judge=check_judge(VotingConfig(rule="stacked", max_loss=0.5), min_fit_rows=5))["gate"]
    assert len(stack["stack"]["a"]) == 2 and len(stack["stack"]["b"]) == 2 and stack["kind"] == "route"
    # Fewer answered rows than min_fit_rows: nothing fitted, the rule's own threshold.
    few = evaluate(ck, CheckSet(texts, gold, "gold", controller=asked), label_names=LABELS,
                   judge=check_judge(measured, min_fit_rows=len(held)))
    assert "gate" not in few
    # route: threshold ignores the controller's answers (no target: the configured threshold)
    fixed = evaluate(ck, CheckSet(texts, gold, "gold", controller=asked), label_names=LABELS,
                     judge=check_judge(measured.model_copy(update={"route": "threshold"}), min_fit_rows=5))
    assert "gate" not in fixed


def _conf(ck, texts):
    from labelwright.specialists.registry import load_specialist

    return np.mean([load_specialist(p).predict_proba(texts) for p in ck.values()], axis=0).max(1)


def test_plot_stages_writes_a_png(tmp_path):
    stages = {"stages": [
        {"stage": 0, "hard_share": 0.5, "consensus_accuracy": 0.8,
         "check": {"rows": 10, "source": "gold", "hard_share": 0.4, "specialists": {"a": 0.7}}},
        {"stage": 1, "hard_share": 0.3, "consensus_accuracy": None,
         "check": {"rows": 10, "source": "gold", "hard_share": 0.3, "specialists": {"a": 0.8}}},
    ]}
    path = plot_stages(stages, tmp_path / "r.stages.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- reference rows trained on, cross-fitted ------------------------------------------------------

from labelwright.specialists.registry import build_specialist  # noqa: E402
from labelwright.specialists.base import OUT_OF_FOLD  # noqa: E402
from labelwright.specialists.registry import load_specialist  # noqa: E402
from labelwright.training.stage import checkpoint_probs, cross_fittable, folds_of  # noqa: E402


@pytest.mark.parametrize("kind", ["tfidf_linear", "embedding_linear"])
def test_cross_fit_scores_each_held_row_by_a_model_that_never_saw_it(movie_split, kind):
    seed, _, held = movie_split
    texts = seed["text"].tolist() + held["text"].tolist()[:90]
    # the held rows' labels drawn at random: a model that trained on a row reproduces its label; the fold
    # models, which never saw it, can do no better than chance on it
    noise = list(np.random.default_rng(0).choice(LABELS, 90))
    labels = seed["label"].tolist() + noise
    folds = np.concatenate([np.full(len(seed), -1), np.arange(90) % 3])
    spec = build_specialist(SpecialistConfig(name="s", kind=kind), LABELS)
    oof = spec.cross_fit(texts, labels, folds=folds)
    assert np.isnan(oof[: len(seed)]).all() and not np.isnan(oof[len(seed):]).any()
    np.testing.assert_allclose(oof[len(seed):].sum(axis=1), 1.0, rtol=1e-5)
    target = np.array([LABELS.index(x) for x in noise])
    in_sample = np.mean(spec.predict_proba(texts[len(seed):]).argmax(axis=1) == target)
    out_of_fold = np.mean(oof[len(seed):].argmax(axis=1) == target)
    assert in_sample > 0.8 and out_of_fold < 0.65
    assert spec.other_row_weight in (1.0, 0.5, 0.2, 0.0)
    np.testing.assert_allclose(spec.predict(texts[len(seed):]), oof[len(seed):], rtol=1e-6)  # kept for predict
    spec.fit(texts, labels)  # a plain fit afterwards: the model saw every row, so no fold answers are kept
    assert spec.out_of_fold is None and spec.other_row_weight is None
    np.testing.assert_allclose(spec.predict(texts[len(seed):]), spec.predict_proba(texts[len(seed):]))


def test_cross_fit_head_weighs_the_other_rows_by_what_they_are_worth_out_of_fold():
    from labelwright.specialists.linear_head import cross_fit_head

    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 5))
    truth = (X[:, 0] > 0).astype(int)
    folds = np.concatenate([np.full(200, -1), np.arange(200) % 5])
    w = np.ones(400)
    # the other rows agree with the held rows' labels: all of them count
    *_, scale = cross_fit_head(X, truth, w, folds, 2, l2=1e-3)
    assert scale == 1.0
    # the other rows' labels are flipped: they only hurt, and are left out
    flipped = np.where(folds < 0, 1 - truth, truth)
    W, b, oof, scale = cross_fit_head(X, flipped, w, folds, 2, l2=1e-3)
    assert scale == 0.0 and np.mean(oof[200:].argmax(axis=1) == truth[200:]) > 0.9
    assert np.isnan(oof[:200]).all()
    # no other rows: nothing to weigh
    *_, scale = cross_fit_head(X[200:], truth[200:], w[200:], folds[200:], 2, l2=1e-3)
    assert scale == 1.0


def test_train_stage_keeps_out_of_fold_probabilities_where_it_cross_fitted(movie_split, tmp_path):
    seed, _, held = movie_split
    configs = [SpecialistConfig(name="tfidf", kind="tfidf_linear"),
               SpecialistConfig(name="ft", kind="transformer_classifier")]
    assert [c.name for c in cross_fittable(configs)] == ["tfidf"]
    ref_x, ref_y = held["text"].tolist()[:50], held["label"].tolist()[:50]
    # a seed row repeating a reference text is left out, so no fold model sees that text
    seed_x, seed_y = seed["text"].tolist() + [ref_x[0]], seed["label"].tolist() + [ref_y[0]]
    logs = []
    ck = train_stage(cross_fittable(configs), seed_x, seed_y, label_names=LABELS, run_dir=tmp_path, stage=0,
                     tag="reference", crossfit=(ref_x, ref_y), log=logs.append)
    path = ck["tfidf"]
    assert path.endswith("stage-0-reference") and (tmp_path / "checkpoints/tfidf/stage-0-reference" / OUT_OF_FOLD).is_file()
    assert any(f"{len(seed) + 50} rows, 50 of them cross-fitted" in m and f"the other {len(seed)} weigh" in m
               for m in logs)
    from labelwright.specialists.base import read_manifest

    assert read_manifest(path)["other_row_weight"] in (1.0, 0.5, 0.2, 0.0)  # the chosen weight, recorded
    saved = np.load(f"{path}/{OUT_OF_FOLD}")
    assert saved["probs"].shape == (50, 2)
    others = held["text"].tolist()[100:110]
    probs = checkpoint_probs(path, ref_x[:5] + others)
    np.testing.assert_allclose(probs[:5], saved["probs"][:5], rtol=1e-6)  # the reference rows: out of fold
    loaded = load_specialist(path)
    np.testing.assert_allclose(probs[5:], loaded.predict_proba(others), rtol=1e-6)  # other texts: the checkpoint
    # its Serve replica answers the same: out of fold for the texts it was cross-fitted on
    from labelwright.specialists.deployment import SpecialistReplica

    replica = SpecialistReplica()
    replica.reconfigure({"checkpoint": path})
    np.testing.assert_allclose(replica.predict(ref_x[:5] + others)["probs"], probs, rtol=1e-5)
    assert not np.allclose(loaded.predict_proba(ref_x[:5]), probs[:5])  # in-sample, they would differ
    assert (folds_of(ref_x) == folds_of(list(reversed(ref_x)))[::-1]).all()  # a text's fold ignores the order
    assert set(folds_of(ref_x)) == {0, 1, 2, 3, 4}


def test_reference_training_rows_are_the_gold_check_rows_and_the_audit():
    from labelwright.orchestrator.reference import Reference

    # gold check rows from the input, asked of the controller or not, and a gold file's rows: all of them
    check = CheckSet(["a", "b", "c"], ["x", "y", "x"], "gold", controller=["x", None, ""], rows=[3, 5, 7])
    assert Reference(check).training_rows() == (["a", "b", "c"], ["x", "y", "x"])
    file_rows = CheckSet(["a", "b"], ["x", "y"], "gold", controller=["y", None], rows=None)
    assert Reference(file_rows).training_rows() == (["a", "b"], ["x", "y"])
    # an audit: the controller's answers are the labels
    audit = CheckSet(["a", "b"], ["x", "y"], "audit", controller=["x", "y"], rows=[0, 1])
    assert Reference(audit).training_rows() == (["a", "b"], ["x", "y"])
    # controller rows held out of the buffer: nothing (they are the buffer's own)
    assert Reference(CheckSet(["a"], ["x"], "controller")).training_rows() == ([], [])
