"""Persistent cache of controller answers (sqlite), safe across threads and processes.

Key: sha256 of the model, the sampling parameters, the messages and the response format, so any change to
the prompt or the settings misses. Value: the parsed final answer (a small JSON object). Only resolved
answers are stored; failures and unresolved rows are never cached, so a rerun retries them.

Several Ray actors on one node may share a file: the database runs in WAL mode with a busy timeout, and
each process opens its own connection lazily (a cache object can be created before a fork or pickled).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from labelwright.specialists.errors import ConfigError

CACHE_ENV = "LABELWRIGHT_CACHE"
CACHE_FILE = "controller-cache.sqlite"
_BUSY_TIMEOUT_S = 30.0


def default_cache_path() -> Path:
    """``$LABELWRIGHT_CACHE/controller-cache.sqlite``, else ``~/.cache/labelwright/controller-cache.sqlite``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "labelwright")
    return Path(root) / CACHE_FILE


def cache_key(
    *,
    model: str,
    params: Mapping[str, Any],
    messages: Sequence[Mapping[str, Any]],
    response_format: Mapping[str, Any] | None,
) -> str:
    """sha256 hex digest of everything that decides the controller's answer."""
    payload = json.dumps(
        {"model": model, "params": dict(params), "messages": list(messages), "response_format": response_format},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class LLMCache:
    """A key -> JSON-object store in one sqlite file."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    def _connect(self) -> sqlite3.Connection:
        # Caller holds self._lock. A connection is never shared with a forked child process.
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT_S * 1000)}")
            self._retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            conn.execute("PRAGMA synchronous=NORMAL")
            self._retry_locked(
                lambda: conn.execute(
                    "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)"
                )
            )
        except (sqlite3.DatabaseError, OSError) as exc:
            raise ConfigError(
                f"cannot open the controller cache {str(self.path)!r}: {exc}. Delete the file if it is corrupt, "
                f"point controller.cache_path (or ${CACHE_ENV}) at a writable place, or set controller.cache: false."
            ) from exc
        self._conn, self._pid = conn, os.getpid()
        return conn

    @staticmethod
    def _retry_locked(fn, attempts: int = 20):  # noqa: ANN001, ANN205 - tiny private helper
        # Switching to WAL needs a moment of exclusive access; a sibling process may hold it.
        for i in range(attempts):
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or i == attempts - 1:
                    raise
                time.sleep(0.05 * (i + 1))
        return None

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._connect().execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        text = json.dumps(dict(value), ensure_ascii=False, sort_keys=True)
        with self._lock:
            self._connect().execute(
                "INSERT OR REPLACE INTO answers (key, value, created) VALUES (?, ?, ?)", (key, text, time.time())
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._connect().execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn, self._pid = None, None
