"""Calling into the candidate (DESIGN §2): the guard around every call.

Every harness call of a candidate method goes through :meth:`CandidateCalls.call`:
the vCPU context is set, an exception, a hang or a wrong return type becomes a
:class:`~conformance.errors.CandidateError` naming the call, a property
violation the candidate caught is re-raised, and when the outermost call
returns the per-call monitors run and RCU callbacks whose grace period has
elapsed are invoked.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from conformance.errors import CandidateError, PropertyViolation

#: Service calls one candidate call may make before it is declared stuck.
MAX_SERVICE_CALLS = 200_000
#: Wall-clock safety net for a candidate call that never returns (seconds).
CALL_TIMEOUT = 10.0


class _Timeout(BaseException):
    pass


class CandidateCalls:
    """The part of :class:`~conformance.platform.core.Platform` that calls
    the candidate (a mixin: the state lives on the platform)."""

    def call(self, method: str, *args, vcpu: int | None = None,
             returns: type | tuple | None = type(None)) -> Any:
        """Call ``candidate.method(*args)`` as the harness would: with the vCPU
        context set, exceptions and hangs turned into candidate errors, the
        return type checked, and the per-call monitors run afterwards."""
        fn = getattr(self.candidate, method, None)
        if fn is None:
            raise CandidateError("bad-return", f"candidate has no method {method}()",
                                 step=self.step)
        outer_vcpu, self.current_vcpu = self.current_vcpu, vcpu
        if self.depth == 0:
            self.service_calls = 0
            self.cleaned = []
        self.depth += 1
        try:
            result = self._guarded(fn, method, args)
        finally:
            self.current_vcpu = outer_vcpu
            self.depth -= 1
        if self.swallowed is not None:
            raise self.swallowed
        if returns is not None and not isinstance(result, returns):
            want = returns.__name__ if isinstance(returns, type) else \
                " or ".join(t.__name__ for t in returns)
            raise CandidateError(
                "bad-return", f"{method}() returned {result!r} "
                f"({type(result).__name__}); expected {want}", step=self.step)
        if self.depth == 0:
            self.monitors.after_call(method)
            self.grace_period()
        return result

    def construct(self, candidate_cls):
        """``Candidate(services, config)``, guarded like any other call."""
        self.depth += 1
        try:
            return self._guarded(lambda: candidate_cls(self.services, self.config),
                                 f"{candidate_cls.__name__}()", ())
        finally:
            self.depth -= 1

    def _guarded(self, fn, method, args):
        use_alarm = self.depth == 1 and hasattr(signal, "setitimer") and \
            threading.current_thread() is threading.main_thread()
        if use_alarm:
            def on_alarm(signum, frame):
                raise _Timeout()
            previous = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, CALL_TIMEOUT)
        try:
            return fn(*args)
        except PropertyViolation:
            raise
        except CandidateError:
            raise
        except _Timeout:
            raise CandidateError(
                "timeout", f"{method}() did not return within {CALL_TIMEOUT:g}s",
                step=self.step) from None
        except RecursionError as exc:
            raise CandidateError("raised", f"{method}() raised {exc!r}",
                                 step=self.step) from exc
        except Exception as exc:
            raise CandidateError("raised", f"{method}() raised {type(exc).__name__}: {exc}",
                                 step=self.step) from exc
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)

    def count_service_call(self, name: str) -> None:
        self.service_calls += 1
        if self.service_calls > MAX_SERVICE_CALLS:
            raise CandidateError(
                "timeout", f"more than {MAX_SERVICE_CALLS} service calls in one "
                f"candidate call (last: {name}); it does not seem to return",
                step=self.step)

    def grace_period(self) -> None:
        """An RCU grace period: run ``call_rcu`` callbacks once no reader is
        inside a read-side critical section (as late as possible)."""
        while self.rcu_callbacks and self.rcu_readers == 0:
            callbacks, self.rcu_callbacks = self.rcu_callbacks, []
            for cb in callbacks:
                self._guarded(cb, "call_rcu callback", ())
            self.monitors.after_call("call_rcu callback")
