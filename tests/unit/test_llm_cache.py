"""The persistent controller cache: keys, round trips, threads and processes sharing one file."""

import multiprocessing
from concurrent.futures import ThreadPoolExecutor

import pytest

from labelwright.specialists.errors import ConfigError
from labelwright.orchestrator.llm_cache import CACHE_FILE, LLMCache, cache_key, default_cache_path

MESSAGES = [{"role": "user", "content": "hi"}]


def test_key_changes_with_every_input():
    base = dict(model="m", params={"temperature": 0.0}, messages=MESSAGES, response_format=None)
    key = cache_key(**base)
    assert key == cache_key(**{**base, "params": {"temperature": 0.0}})
    assert len({key, *(cache_key(**{**base, k: v}) for k, v in [
        ("model", "m2"),
        ("params", {"temperature": 0.5}),
        ("messages", [{"role": "user", "content": "hi!"}]),
        ("response_format", {"type": "json_object"}),
    ])}) == 5


def test_round_trip_and_reopen(tmp_path):
    cache = LLMCache(tmp_path / "c.sqlite")
    assert cache.get("k") is None
    cache.put("k", {"label": "a", "confidence": 0.5})
    cache.close()
    assert LLMCache(tmp_path / "c.sqlite").get("k") == {"label": "a", "confidence": 0.5}


def test_default_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LABELWRIGHT_CACHE", str(tmp_path))
    assert default_cache_path() == tmp_path / CACHE_FILE


def test_corrupt_file_is_a_config_error(tmp_path):
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match="controller.cache_path"):
        LLMCache(path).get("k")


def test_threads_share_one_cache(tmp_path):
    cache = LLMCache(tmp_path / "c.sqlite")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: cache.put(f"k{i}", {"i": i}), range(200)))
    assert len(cache) == 200 and cache.get("k199") == {"i": 199}
    cache.close()


def _write(path: str, start: int) -> None:
    cache = LLMCache(path)
    for i in range(start, start + 50):
        cache.put(f"k{i}", {"i": i})
    cache.close()


def test_processes_share_one_file(tmp_path):
    path = str(tmp_path / "c.sqlite")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write, args=(path, start)) for start in (0, 50, 100)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    cache = LLMCache(path)
    assert len(cache) == 150 and cache.get("k120") == {"i": 120}
    cache.close()
