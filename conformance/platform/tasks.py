"""Per-task context: what belongs to one running operation (DESIGN §6).

A parallel step runs several operations (a vCPU's faults, a notifier, a
harvest) as tasks under the deterministic scheduler; each has its own
:class:`TaskContext`. The sequential machine runs everything in the platform's
one default context, so it behaves exactly as before.

The platform keeps the running task's context in ``Platform.ctx``; whoever
switches tasks (the platform, around every scheduling point) sets it back for
the task that resumes. Fields are read on the hot path, so the class is a
plain slotted record.
"""

from __future__ import annotations

import attrs

from conformance.errors import PropertyViolation


@attrs.define(slots=True)
class TaskContext:
    """The state of one running operation on the platform."""

    #: Shown in reports (``"vCPU1 write"``, ``"notifier migrate"``; ``"main"``
    #: for the sequential machine).
    name: str = "main"
    #: The vCPU whose exit is being handled, ``None`` on a host thread.
    vcpu: int | None = None
    #: Nesting of candidate calls (a call from inside a call, e.g. GUP
    #: raising a notifier).
    depth: int = 0
    #: Service calls made by the outermost candidate call so far.
    service_calls: int = 0
    #: ``dcache_clean_inval_poc`` ranges of the outermost call, ``(lo, hi)``.
    cleaned: list[tuple[int, int]] = attrs.Factory(list)
    #: Inside an aging call: every store must only clear AF (rules §9.5 N4).
    aging: bool = False
    #: Descriptor stores made by this task (to tell whether others stored
    #: while it ran).
    stores: int = 0
    #: The memslot array this task's exit handler looked up under
    #: ``srcu_read_lock(&kvm->srcu)`` (``None`` outside one): a memslot change
    #: published meanwhile is not seen until the handler returns.
    memslots: tuple | None = None
    #: A violation raised inside the candidate, remembered so that a candidate
    #: catching exceptions around service calls cannot hide it.
    swallowed: PropertyViolation | None = None
