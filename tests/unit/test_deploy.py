"""Serve wiring for specialists: asking every specialist at once, and again where a replica was lost mid-request."""

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError

from labelwright.cluster import deploy


class _Response:
    def __init__(self, outcome):
        self.outcome = outcome

    def result(self):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class _Handle:
    """A Serve handle whose ``predict`` answers the scripted outcomes in turn (the last one from then on)."""

    def __init__(self, *outcomes):
        self.outcomes, self.calls = list(outcomes), []
        self.predict = self

    def remote(self, texts):
        self.calls.append(list(texts))
        return _Response(self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0])


class _Clock:
    """Time that passes only by sleeping: the sleeps are recorded."""

    def __init__(self):
        self.now, self.slept = 0.0, []

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def no_sleep(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(deploy, "time", clock)
    return clock.slept


def test_a_lost_replica_is_asked_again_and_only_its_specialist(no_sleep, capsys):
    answer = {"probs": [[0.9, 0.1]], "version": "v1"}
    lost = _Handle(ActorUnavailableError("node gone", None), ActorDiedError(), answer)
    steady = _Handle({"probs": [[0.2, 0.8]], "version": "v0"})
    out = deploy.predict_all({"probe": lost, "tfidf": steady}, ["a text"])
    assert out == {"probe": answer, "tfidf": {"probs": [[0.2, 0.8]], "version": "v0"}}
    assert lost.calls == [["a text"]] * 3 and steady.calls == [["a text"]]
    assert no_sleep == [0.5, 1.0]  # backing off while Serve replaces the replica
    assert "specialist probe: a replica was lost mid-request (ActorUnavailableError)" in capsys.readouterr().err


def test_a_specialists_own_error_is_not_retried(no_sleep):
    broken = _Handle(ValueError("bad checkpoint"))
    with pytest.raises(ValueError, match="bad checkpoint"):
        deploy.predict_all({"probe": broken}, ["a text"])
    assert len(broken.calls) == 1 and no_sleep == []


def test_no_live_replica_within_patience_raises_the_last_loss(no_sleep):
    gone = _Handle(ActorDiedError())
    with pytest.raises(ActorDiedError):
        deploy.predict_all({"probe": gone}, ["a text"], patience_s=3.0)
    assert len(gone.calls) == 3 and no_sleep == [0.5, 1.0]  # a third wait, 2 s, would pass the patience
