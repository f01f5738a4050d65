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
from model import descriptors as d

#: Service calls one candidate call may make before it is declared stuck.
MAX_SERVICE_CALLS = 200_000
#: Wall-clock safety net for a candidate call that never returns (seconds).
CALL_TIMEOUT = 10.0


#: Services that store a descriptor (one scheduling-point kind, "pte store").
_STORES = frozenset({"write_pte", "cmpxchg_pte", "xchg_pte"})


def _short(pte: int, level: int) -> str:
    if pte == d.INVALID_PTE_LOCKED:
        return "LOCKED"
    if not d.is_valid(pte):
        return "invalid"
    return "table" if d.is_table(pte, level) else f"L{level} leaf PA {d.pte_pa(pte):#x}"


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
        ctx = self.ctx
        outer_vcpu, ctx.vcpu = ctx.vcpu, vcpu
        if ctx.depth == 0:
            ctx.service_calls = 0
            ctx.cleaned = []
        ctx.depth += 1
        # The fault-path monitors (T4, no downgrade) and what may excuse them.
        watch = self.monitors.call_begins(method, args)
        returned = False
        try:
            result = self._guarded(fn, method, args)
            returned = True
        finally:
            ctx.vcpu = outer_vcpu
            ctx.depth -= 1
            if watch is not None:
                self.monitors.call_ends(watch, result if returned else None, returned)
        if ctx.swallowed is not None:
            raise ctx.swallowed
        if returns is not None and not isinstance(result, returns):
            want = returns.__name__ if isinstance(returns, type) else \
                " or ".join(t.__name__ for t in returns)
            raise CandidateError(
                "bad-return", f"{method}() returned {result!r} "
                f"({type(result).__name__}); expected {want}", step=self.step)
        if ctx.depth == 0 and self.scheduler is None:
            # In a parallel step these wait for quiescence (Platform.quiesce):
            # another task may be half-way through its own change.
            self.monitors.after_call(method)
            self.grace_period()
        return result

    def construct(self, candidate_cls):
        """``Candidate(services, config)``, guarded like any other call."""
        ctx = self.ctx
        ctx.depth += 1
        try:
            return self._guarded(lambda: candidate_cls(self.services, self.config),
                                 f"{candidate_cls.__name__}()", ())
        finally:
            ctx.depth -= 1

    def _guarded(self, fn, method, args):
        # A parallel step has one watchdog for the whole step instead.
        use_alarm = self.ctx.depth == 1 and self.scheduler is None and \
            hasattr(signal, "setitimer") and \
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

    def count_service_call(self, name: str, ptep: int | None = None,
                           new: int | None = None) -> None:
        if self.scheduler is not None and self.scheduler.current is not None:
            # The three PTE stores share one point kind, so that a schedule
            # says "before its first store" whichever one a design uses.
            if name in _STORES:
                self.yield_point("pte store", self._store_detail(name, ptep, new))
            else:
                self.yield_point(name)
        ctx = self.ctx
        ctx.service_calls += 1
        if ctx.service_calls > MAX_SERVICE_CALLS:
            raise CandidateError(
                "timeout", f"more than {MAX_SERVICE_CALLS} service calls in one "
                f"candidate call (last: {name}); it does not seem to return",
                step=self.step)



    def _store_detail(self, name: str, ptep: int | None, new: int | None) -> str:
        """``write_pte IPA 0x40000000 L2: invalid -> table`` for the interleaving."""
        if ptep is None:
            return name
        loc = self.entry_ipa(ptep >> 12, (ptep & 0xFFF) >> 3)
        if loc is None:
            return f"{name} {ptep:#x} (unlinked table)"
        ipa, level = loc
        old = self.mem.tables.get(ptep >> 12, [0] * 512)[(ptep & 0xFFF) >> 3]
        return f"{name} IPA {ipa:#x} L{level}: {_short(old, level)} -> {_short(new, level)}"
