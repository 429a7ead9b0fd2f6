"""What the person running a job sees: labelwright's own lines and one progress bar on the terminal, while
Ray's output, the libraries' and the actors' (forwarded to the driver) go to the run's log file.

:func:`say` is the job's one way to tell the user something; :func:`captured` (the CLI's default, off with
``--verbose``) points file descriptors 1 and 2, and ``sys.stdout`` / ``sys.stderr``, at
``<run_dir>/logs/run.log`` for the length of a job, so C++ lines of Ray's core worker, Python logging, weight
loading bars and worker output land there; labelwright's lines go to the terminal and, stamped, to the same
file. :class:`Progress` draws a live bar (``rich``) when the terminal is a terminal, and prints a plain line
every few seconds otherwise (a ``ray job submit`` log, a pipe, a CI log).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import IO, Iterator

LOG_NAME = "run.log"
PLAIN_EVERY_S = 5.0  # a plain progress line at most this often

_lock = threading.RLock()
_terminal: IO[str] | None = None  # where the user's lines go; None: sys.stderr as it is when one is written
_logfile: IO[str] | None = None  # the run's log file while a job is captured (labelwright's lines, stamped)
_bar = None  # the live rich Progress, while one is drawn: lines are printed above it


def _stream() -> IO[str]:
    return _terminal if _terminal is not None else sys.stderr


def say(msg: str) -> None:
    """Tell the user ``msg``: one line on the terminal (above the progress bar while one is drawn) and in the
    run's log file."""
    with _lock:
        if _bar is not None:
            _bar.console.print(msg, markup=False, highlight=False, soft_wrap=True)
        else:
            stream = _stream()
            stream.write(msg + "\n")
            stream.flush()
        if _logfile is not None:
            _logfile.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} labelwright: {msg}\n")
            _logfile.flush()


def log_path(run_dir: Path) -> Path:
    return Path(run_dir) / "logs" / LOG_NAME


def _point_at(log: IO[str]) -> None:
    """Descriptors 1 and 2, and the sys streams, write to ``log`` from now on."""
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log


@contextlib.contextmanager
def captured(run_dir: Path, *, enabled: bool = True) -> Iterator[Path]:
    """For the length of the block, everything but labelwright's own lines goes to ``<run_dir>/logs/run.log``
    (appended to, so a resumed run's log follows the first's). With ``enabled=False`` (``--verbose``) the
    terminal keeps everything and the log file gets labelwright's lines alone. The terminal gets its streams
    back when the block ends, by an exception too, so a traceback or an error message reaches the user."""
    global _terminal, _logfile
    path = log_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    log = open(path, "a", encoding="utf-8", errors="replace", buffering=1)
    log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} labelwright: ---- run started (pid {os.getpid()}; "
              f"{'Ray and library output below' if enabled else 'verbose: Ray output on the terminal'})\n")
    saved_fds = saved_sys = terminal = None
    with _lock:
        old_terminal, old_logfile = _terminal, _logfile
        _logfile = log
        if enabled:
            # The terminal is a copy of descriptor 2 made before it is pointed at the file.
            terminal = os.fdopen(os.dup(2), "w", encoding="utf-8", errors="replace", buffering=1)
            saved_fds = (os.dup(1), os.dup(2))
            saved_sys = (sys.stdout, sys.stderr)
            _point_at(log)
            _terminal = terminal
    try:
        yield path
    finally:
        with _lock:
            if saved_fds is not None:
                sys.stdout, sys.stderr = saved_sys
                os.dup2(saved_fds[0], 1)
                os.dup2(saved_fds[1], 2)
                for fd in saved_fds:
                    os.close(fd)
                terminal.close()
            _terminal, _logfile = old_terminal, old_logfile
            log.close()


def keep_in_log(run_dir: Path) -> None:
    """From now until the process exits, its output goes to the run's log: what Ray prints after the job has
    ended (actors' last lines arrive late, its shutdown at exit). For the command line's own process only, once
    the job has ended well: nothing is said after it."""
    sys.stdout.flush()
    sys.stderr.flush()
    _point_at(open(log_path(run_dir), "a", encoding="utf-8", errors="replace", buffering=1))


class Progress:
    """Rows labelled so far, rows/s, the LLM's share of the new rows, the specialists' stage and the time left.

    A live bar where the terminal is one; elsewhere a plain line at most every ``PLAIN_EVERY_S`` seconds and
    at the end. Use it as a context manager so the bar is taken down however the block ends."""

    def __init__(self, total: int, done: int = 0, *, every_s: float = PLAIN_EVERY_S):
        self.total, self.done, self.first, self.every = total, done, done, every_s
        self.llm = 0
        self.stage = 0
        self.start = time.monotonic()
        self.last = float("-inf")  # the first update prints a line
        self._rich = None
        self._task = None

    def __enter__(self) -> "Progress":
        global _bar
        stream = _stream()
        if stream.isatty() and self.total > self.done:
            from rich.console import Console
            from rich.progress import (
                BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn,
            )

            self._rich = RichProgress(
                TextColumn("labelling"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} rows/s  LLM {task.fields[llm]}  stage {task.fields[stage]}"),
                TimeRemainingColumn(), console=Console(file=stream), transient=True,
                redirect_stdout=False, redirect_stderr=False,
            )
            self._task = self._rich.add_task("labelling", total=self.total, completed=self.done,
                                             **self._fields(time.monotonic()))
            self._rich.start()
            with _lock:
                _bar = self._rich
        return self

    def __exit__(self, *exc) -> None:
        global _bar
        if self._rich is not None:
            with _lock:
                _bar = None
            self._rich.stop()
            self._rich = None
            if exc[0] is None:
                self._line(time.monotonic())  # the bar goes; its last figures stay, as a line, in the log too

    def _rate(self, now: float) -> float:
        return (self.done - self.first) / max(now - self.start, 1e-9)

    def _fields(self, now: float) -> dict:
        new = self.done - self.first
        return {"rate": f"{self._rate(now):.1f}", "llm": f"{self.llm / max(1, new):.0%}" if new else "-",
                "stage": self.stage}

    def _line(self, now: float) -> None:
        f = self._fields(now)
        rate = self._rate(now)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = f"{left / 60:.1f} min" if left != float("inf") else "?"
        say(f"labelled {self.done}/{self.total} rows ({self.done / max(1, self.total):.0%}), {f['rate']} rows/s, "
            f"LLM on {f['llm']} of new rows, specialists at stage {self.stage}, ETA {eta}")

    def update(self, rows: int, llm_rows: int, *, stage: int | None = None) -> None:
        """``rows`` more rows labelled, ``llm_rows`` of them sent to the controller."""
        self.done += rows
        self.llm += llm_rows
        if stage is not None:
            self.stage = stage
        now = time.monotonic()
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done, **self._fields(now))
            return
        if self.done < self.total and now - self.last < self.every:
            return
        self.last = now
        self._line(now)
