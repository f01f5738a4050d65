"""The platform layer: the machine a candidate runs on.

``core``          :class:`~conformance.platform.core.Platform`, the world of one
                  program (memory, host mm, TLBs, caches, memslots)
``calls``         the guard around every call into the candidate
``mmu``           the hardware: TLB fills, walks, faults, the data access
``host_events``   the host mm: VMM accesses, MMU notifiers, aging, GUP
``services``      :class:`~conformance.platform.services.Services`, the
                  candidate's only door to the platform
``monitors``      the safety properties checked on every platform event

It uses the model and the public surface (``protocol``, ``errors``) and
nothing above it; the machines drive it (see ``docs/architecture.md``).
"""
