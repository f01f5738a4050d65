"""A candidate that raises, returns garbage or never returns is reported as a
candidate error naming the step, never as a harness crash (DESIGN §4)."""

from __future__ import annotations

import pytest

import conformance.platform.calls
from candidates.reference import ReferenceCandidate
from conformance.protocol import Exit
from conformance.runner import run

BUDGET = dict(profile="ci", max_examples=30)


class RaisesOnFault(ReferenceCandidate):
    def handle_guest_abort(self, vcpu, fault):
        raise RuntimeError("boom in the fault path")


class ReturnsGarbage(ReferenceCandidate):
    def handle_guest_abort(self, vcpu, fault):
        super().handle_guest_abort(vcpu, fault)
        return "resume"


class BadDirtyLog(ReferenceCandidate):
    def get_dirty_log(self, slot):
        return [1, 2, 3]


class NeverReturns(ReferenceCandidate):
    def handle_guest_abort(self, vcpu, fault):
        while True:
            pass


class SpinsOnServices(ReferenceCandidate):
    def handle_guest_abort(self, vcpu, fault):
        while True:
            self.services.memslots()


class BrokenConstructor(ReferenceCandidate):
    def __init__(self, services, config):
        raise ValueError("cannot build")


@pytest.mark.parametrize("cls, kind, needle", [
    (RaisesOnFault, "raised", "RuntimeError: boom in the fault path"),
    (ReturnsGarbage, "bad-return", "handle_guest_abort() returned 'resume'"),
    (BadDirtyLog, "bad-return", "get_dirty_log() returned [1, 2, 3]"),
    (SpinsOnServices, "timeout", "service calls"),
    (BrokenConstructor, "raised", "ValueError: cannot build"),
])
def test_candidate_error_is_reported_with_step(cls, kind, needle, monkeypatch):
    monkeypatch.setattr(conformance.platform.calls, "MAX_SERVICE_CALLS", 20_000)
    result = run(cls.__name__, cls, **BUDGET)
    assert result.status == "error"
    failure = result.failure
    assert failure.kind == kind
    assert needle in str(failure)
    assert failure.step and failure.step.split(":")[0].isdigit()
    assert "[candidate-error" in str(failure)


def test_a_hang_is_a_timeout(monkeypatch):
    monkeypatch.setattr(conformance.platform.calls, "CALL_TIMEOUT", 0.2)
    monkeypatch.setattr(conformance.platform.calls, "MAX_SERVICE_CALLS", 10**9)
    result = run("NeverReturns", NeverReturns, **{**BUDGET, "max_examples": 5})
    assert result.status == "error"
    assert result.failure.kind == "timeout"
    assert "did not return" in str(result.failure)


def test_exit_enum_is_required():
    assert isinstance(Exit.RESUME, Exit)
