"""Staging: every row kept exactly once, bad input named clearly."""

import json

import pandas as pd
import pytest

from labelwright.orchestrator.dataset_io import read_frame, stage_input, write_frame
from labelwright.specialists.errors import InputDataError


def staged_frame(staged):
    return pd.concat([pd.read_parquet(s.path) for s in staged.shards], ignore_index=True)


def test_csv_shards_rows_ids_and_passthrough(tmp_path):
    src = tmp_path / "in.csv"
    pd.DataFrame({"text": [f"t{i}" for i in range(25)], "label": ["a", "b"] * 12 + ["a"],
                  "extra": range(25)}).to_csv(src, index=False)
    st = stage_input(src, run_dir=tmp_path / "run", text_column="text", gold_column="label",
                     labels=["a", "b"], shard_rows=10)
    assert [s.n_rows for s in st.shards] == [10, 10, 5]
    df = staged_frame(st)
    assert df["row"].tolist() == list(range(25))
    assert df["id"].tolist() == [str(i) for i in range(25)]
    assert df["gold"].tolist()[:3] == ["a", "b", "a"]
    assert df["extra"].tolist()[:3] == ["0", "1", "2"]  # CSV columns pass through as text
    assert st.passthrough == ["extra"]


def test_restaging_unchanged_input_is_reused(tmp_path):
    src = tmp_path / "in.csv"
    pd.DataFrame({"text": ["x", "y"]}).to_csv(src, index=False)
    a = stage_input(src, run_dir=tmp_path / "run", text_column="text", shard_rows=1)
    mtime = a.shards[0].path.stat().st_mtime_ns
    b = stage_input(src, run_dir=tmp_path / "run", text_column="text", shard_rows=1)
    assert b.shards[0].path.stat().st_mtime_ns == mtime
    c = stage_input(src, run_dir=tmp_path / "run", text_column="text", shard_rows=2)  # options changed
    assert len(c.shards) == 1


def test_missing_text_column_names_columns(tmp_path):
    src = tmp_path / "in.csv"
    pd.DataFrame({"body": ["x"]}).to_csv(src, index=False)
    with pytest.raises(InputDataError, match=r"text column 'text' is not in .*\['body'\].*--text-column"):
        stage_input(src, run_dir=tmp_path / "run", text_column="text")


def test_empty_and_whitespace_texts_are_kept_and_marked(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in ["ok", "", "   ", None]) + "\n")
    df = staged_frame(stage_input(src, run_dir=tmp_path / "run", text_column="text"))
    assert len(df) == 4
    assert pd.isna(df["skip_reason"][0])
    assert df["skip_reason"].tolist()[1:] == ["empty text", "empty text", "empty text"]


def test_non_utf8_bytes_are_replaced_with_a_note(tmp_path):
    src = tmp_path / "in.csv"
    src.write_bytes(b"text\ngood row\nbad \xff\xfe row\n")
    df = staged_frame(stage_input(src, run_dir=tmp_path / "run", text_column="text"))
    assert df["text"].tolist() == ["good row", "bad \ufffd\ufffd row"]
    assert pd.isna(df["note"][0])
    assert "not valid UTF-8" in df["note"][1]


def test_duplicate_ids_name_both_rows(tmp_path):
    src = tmp_path / "in.csv"
    pd.DataFrame({"id": ["a", "b", "a"], "text": ["x", "y", "z"]}).to_csv(src, index=False)
    with pytest.raises(InputDataError, match=r"duplicate id 'a' .* rows 0 and 2"):
        stage_input(src, run_dir=tmp_path / "run", text_column="text", id_column="id")


def test_unknown_gold_label_names_row_and_value(tmp_path):
    src = tmp_path / "in.csv"
    pd.DataFrame({"text": ["x", "y"], "label": ["pos", "meh"]}).to_csv(src, index=False)
    with pytest.raises(InputDataError, match=r"row 1 has gold label 'meh'"):
        stage_input(src, run_dir=tmp_path / "run", text_column="text", gold_column="label", labels=["pos", "neg"])


def test_one_megabyte_text_survives_staging(tmp_path):
    src = tmp_path / "in.parquet"
    big = "word " * 200_000
    pd.DataFrame({"text": [big, "small"]}).to_parquet(src)
    df = staged_frame(stage_input(src, run_dir=tmp_path / "run", text_column="text"))
    assert len(df["text"][0]) == len(big)


def test_limit_and_bad_json_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n')
    st = stage_input(src, run_dir=tmp_path / "run", text_column="text", limit=2)
    assert st.n_rows == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(InputDataError, match="line 2 is not valid JSON"):
        stage_input(bad, run_dir=tmp_path / "run2", text_column="text")


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "in.txt").write_text("x")
    with pytest.raises(InputDataError, match="cannot tell the format"):
        stage_input(tmp_path / "in.txt", run_dir=tmp_path / "run", text_column="text")
    with pytest.raises(InputDataError, match="does not exist"):
        stage_input(tmp_path / "nope.csv", run_dir=tmp_path / "run", text_column="text")


def test_write_frame_round_trips_each_format(tmp_path):
    df = pd.DataFrame({"id": ["1", "2"], "label": ["a", None]})
    for name in ("o.parquet", "o.csv", "o.jsonl"):
        back = read_frame(write_frame(df, tmp_path / name))
        assert back["label"].tolist()[0] == "a"
        assert len(back) == 2


def test_jsonl_non_utf8_bytes_and_mixed_field_types(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "ok", "n": 1}\n{"text": "caf\xe9 au lait", "n": 2.5}\n{"text": "x", "meta": {"a": 1}}\n')
    df = staged_frame(stage_input(src, run_dir=tmp_path / "run", text_column="text"))
    assert df["text"].tolist() == ["ok", "caf\ufffd au lait", "x"]
    assert "not valid UTF-8" in df["note"][1]
    assert df["n"].tolist()[:2] == ["1", "2.5"] and df["meta"][2] == '{"a": 1}'


def test_hostile_texts_are_kept_and_marked(tmp_path):
    """NUL bytes and right-to-left overrides are text like any other; a lone surrogate (a JSON escape no UTF-8
    can hold) becomes U+FFFD with a note; a ten-megabyte CSV row, longer than Arrow's read block, is read whole
    (with larger blocks, no row twice); a Parquet text column of numbers is labelled as written, with a note.
    Every output format writes them back."""
    nul = tmp_path / "nul.csv"
    nul.write_bytes(b'text\n"a\x00b"\n"abc \xe2\x80\xae evil"\nok\n')
    df = staged_frame(stage_input(nul, run_dir=tmp_path / "r1", text_column="text"))
    assert df["text"].tolist() == ["a\x00b", "abc \u202e evil", "ok"] and df["note"].isna().all()
    lone = tmp_path / "lone.jsonl"
    lone.write_text('{"text": "lone \\ud800 surrogate"}\n{"text": "fine"}\n')
    df = staged_frame(stage_input(lone, run_dir=tmp_path / "r2", text_column="text"))
    assert df["text"][0] == "lone \ufffd\ufffd\ufffd surrogate" and "not valid UTF-8" in df["note"][0]
    assert df["text"][1] == "fine"
    big = tmp_path / "big.csv"
    long_text = "word " * 2_000_000  # 10 MB
    short = [f"r{i}" for i in range(600_000)]  # 4.6 MB: a first block is read before the long row fails one
    big.write_text("text\n" + "\n".join(short) + f'\n"{long_text}"\nlast\n')
    df = staged_frame(stage_input(big, run_dir=tmp_path / "r3", text_column="text", shard_rows=10**6))
    assert len(df) == len(short) + 2 and df["text"].tolist()[-3:] == [short[-1], long_text, "last"]
    assert df["text"].iloc[:-2].tolist() == short
    numbers = tmp_path / "numbers.parquet"
    pd.DataFrame({"text": [1, 2]}).to_parquet(numbers)
    df = staged_frame(stage_input(numbers, run_dir=tmp_path / "r4", text_column="text"))
    assert df["text"].tolist() == ["1", "2"] and df["note"].str.contains("holds int64 values, not text").all()
    out = pd.DataFrame({"text": ["a\x00b", "abc \u202e evil", "lone \ufffd surrogate"], "label": ["x", "y", "z"]})
    for fmt in ("parquet", "csv", "jsonl"):
        assert read_frame(write_frame(out, tmp_path / f"out.{fmt}"))["text"].tolist() == out["text"].tolist()


def test_broken_csv_quoting_and_null_ids_are_clear_errors(tmp_path):
    src = tmp_path / "broken.csv"
    src.write_text('text,label\nok,a\n"unterminated,b\nmore,c\n' + "x,y\n" * 500)
    with pytest.raises(InputDataError, match=r"cannot read .* as CSV: .*a quote left open") as err:
        stage_input(src, run_dir=tmp_path / "r1", text_column="text")
    assert len(str(err.value)) < 600 and "\n" not in str(err.value)  # not the rest of the file
    ids = tmp_path / "ids.parquet"
    pd.DataFrame({"id": ["1", None], "text": ["a", "b"]}).to_parquet(ids)
    with pytest.raises(InputDataError, match=r"row 1 has an empty id in column 'id'"):
        stage_input(ids, run_dir=tmp_path / "r2", text_column="text", id_column="id")
