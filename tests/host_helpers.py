"""Shared by the host-model tests: a VMM address space and its values."""

from model import cache
from model.host import THP_SIZE, HostMm
from model.memory import PhysicalMemory

BASE = 0x4000_0000  # 2 MiB aligned


def mm(*, thp=False, size=2 * THP_SIZE, writable=True, start=BASE):
    host = HostMm(PhysicalMemory())
    host.mmap(start, start + size, writable=writable, thp=thp)
    return host


def value(host, hva):
    """What a cacheable (host) reader sees at ``hva``."""
    return cache.cacheable_read(host.mem.line(host.pte(hva).pfn))[0]


def write(host, hva, v):
    pfn = host.pte(hva).pfn
    host.mem.set_line(pfn, cache.cacheable_write(host.mem.line(pfn), v))

