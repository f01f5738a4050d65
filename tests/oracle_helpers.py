"""Shared by the oracle tests: a one-slot oracle and short spellings of the
accesses (each asserts what every call of it must hold)."""

from conformance.protocol import SCTLR_C, SCTLR_M, Memslot, VmConfig
from model.oracle import Oracle, Outcome

PAGE = 1 << 12
ON = SCTLR_M | SCTLR_C
HVA = 0x4000_0000
GFN = 0x40000  # slot 0: gfn GFN.. -> hva HVA.., 1024 pages (two 2 MiB windows)
RO_GFN, RO_HVA = 0x80000, 0x8000_0000


def oracle(**cfg):
    o = Oracle(VmConfig(**cfg))
    o.mmap(HVA, HVA + 1024 * PAGE)
    o.set_memslot(None, Memslot(0, GFN, 1024, HVA))
    return o


def hva(gfn):
    return HVA + (gfn - GFN) * PAGE


def read(o, gfn, vcpu=0, observed=None):
    """Allowed values of a guest read (all outcomes must be values)."""
    allowed = o.guest_access(vcpu, gfn, "read", None, observed=observed)
    assert all(a.exit is None for a in allowed), allowed
    return {a.value for a in allowed}


def fetch(o, gfn, vcpu=0, observed=None):
    allowed = o.guest_access(vcpu, gfn, "exec", None, observed=observed)
    return {a.value for a in allowed}


def write(o, gfn, value, vcpu=0):
    allowed = o.guest_access(vcpu, gfn, "write", value, observed=Outcome(value=value))
    assert allowed == {Outcome(value=value)}


def observe_read(o, gfn, value, vcpu=0):
    """The guest read ``value``: commit that observation."""
    allowed = read(o, gfn, vcpu, observed=Outcome(value=value))
    assert value in allowed
    return allowed


def caches_on(o, vcpu=0):
    o.write_sctlr(vcpu, ON)


def stale_after_nc_write(o):
    """Caches on, read (clean line of 0 allocated), caches off, NC write 5:
    the page holds PoC=5 below a possibly stale line of 0."""
    caches_on(o)
    observe_read(o, GFN, 0)
    o.write_sctlr(0, 0)
    observe_read(o, GFN, 0)
    write(o, GFN, 5)



def set_logging(o, on=True):
    old = o.memslots[0]
    new = Memslot(0, old.base_gfn, old.npages, old.userspace_addr, old.readonly, on)
    o.set_memslot(old, new)
    return new

