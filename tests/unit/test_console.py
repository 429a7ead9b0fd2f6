"""The console: labelwright's lines on the terminal, everything else in the run's log file, one progress bar."""

from __future__ import annotations

import io
import os
import sys

import pytest

from labelwright.orchestrator import console
from labelwright.orchestrator.console import Progress, captured, log_path, say


def test_captured_sends_other_output_to_the_log_and_labelwright_lines_to_the_terminal(tmp_path, capfd):
    with captured(tmp_path) as path:
        os.write(2, b"[2026 W 1 1] core_worker.cc: a C++ line\n")  # what Ray's core worker writes
        os.write(1, b"(MapWorker pid=1) Loading weights\n")
        print("a library's warning", file=sys.stderr)
        say("seed: 64 labelled rows")
    out, err = capfd.readouterr()
    assert err == "seed: 64 labelled rows\n" and out == ""
    log = path.read_text()
    assert path == log_path(tmp_path) and path.parent.name == "logs"
    for line in ("core_worker.cc: a C++ line", "(MapWorker pid=1) Loading weights", "a library's warning",
                 "labelwright: seed: 64 labelled rows"):
        assert line in log
    os.write(2, b"after\n")  # the terminal has its descriptors back
    assert capfd.readouterr().err == "after\n"


def test_an_error_inside_gives_the_terminal_back_before_it_is_reported(tmp_path, capfd):
    with pytest.raises(RuntimeError):
        with captured(tmp_path):
            os.write(2, b"noise\n")
            raise RuntimeError("boom")
    print("labelwright: error: boom", file=sys.stderr)
    assert capfd.readouterr().err == "labelwright: error: boom\n"
    # a resumed run appends to the same log
    with captured(tmp_path):
        say("resuming")
    log = log_path(tmp_path).read_text()
    assert log.count("---- run started") == 2 and "noise" in log and "resuming" in log


def test_verbose_keeps_everything_on_the_terminal_and_still_logs_labelwright_lines(tmp_path, capfd):
    with captured(tmp_path, enabled=False):
        os.write(2, b"ray line\n")
        say("phase")
    assert capfd.readouterr().err == "ray line\nphase\n"
    log = log_path(tmp_path).read_text()
    assert "labelwright: phase" in log and "ray line" not in log


def test_progress_prints_plain_lines_where_stderr_is_no_terminal(capsys):
    with Progress(10, 2, every_s=3600) as p:
        p.update(4, 4, stage=0)  # too soon after the first line for another
        p.update(4, 1, stage=1)  # the last rows: always a line
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("labelled 6/10 rows (60%)") and "LLM on 100% of new rows" in lines[0]
    assert lines[1].startswith("labelled 10/10 rows (100%)") and "LLM on 62% of new rows" in lines[1]
    assert "stage 1" in lines[1]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_a_bar_on_a_terminal_and_prints_lines_above_it(monkeypatch):
    tty = _Tty()
    monkeypatch.setattr(console, "_terminal", tty)
    with Progress(100, 0) as p:
        p.update(40, 10, stage=0)
        say("budget reached: LLM budget exhausted (budget.max_llm_calls)")
        assert console._bar is not None
        p.update(60, 0, stage=1)
    assert console._bar is None
    shown = tty.getvalue()
    assert "budget reached" in shown
    assert "━" in shown  # the bar was drawn
    assert "labelled 100/100 rows (100%)" in shown  # and its last figures stay as a line
