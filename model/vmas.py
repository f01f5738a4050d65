"""The oracle's view of the VMM's VMAs: a list of ``(start, end, writable)``
ranges, in the order they were created (``Oracle.vma_at`` takes the first
match). Pure functions returning new lists."""


def cut(vmas, start, end):
    out = []
    for s, e, w in vmas:
        if e <= start or end <= s:
            out.append((s, e, w))
            continue
        if s < start:
            out.append((s, start, w))
        if end < e:
            out.append((end, e, w))
    return out


def set_writable(vmas, start, end, writable):
    out = []
    for s, e, w in vmas:
        cuts = sorted({s, e} | {x for x in (start, end) if s < x < e})
        for a, b in zip(cuts, cuts[1:]):
            out.append((a, b, writable if start <= a and b <= end else w))
    return out
