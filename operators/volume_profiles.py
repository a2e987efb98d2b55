"""Volume profiles of bars: the dense ``Profile``, coarser bins for wide bars, exact addition of two
profiles (roll-ups) and the value area (POC / VAH / VAL). Pure logic, no bytewax.

Volume profiles have bounded cost. A profile is a dense numpy array over at most
``PROFILE_MAX_BINS`` bins. When a bar's price range would need more bins than that (a crash,
a spike, or a bad symbol mix putting prices 150 and 60,061 in one instrument), the bar's profile
uses a bin 10, 100, ... times the instrument's (the smallest such factor that fits), and says so:
``profile_bin`` is the bin actually used and ``profile_coarse`` is true. A coarse bin is a whole
number of instrument bins (fine bin i lies in coarse bin i // factor), so a roll-up re-bins the
finer profiles onto the coarsest grid among its sub-bars, and coarsens further if the merged
range needs it; the result equals the bar computed directly from the period's trades, which
picks the same (smallest fitting) factor. The value area is computed with numpy, so neither the
profile nor POC/VAH/VAL costs more for a wide bar than for an ordinary one.
"""

from __future__ import annotations

import math

import numpy as np

PROFILE_MAX_BINS = 2_000  # a bar's profile never has more bins; wider bars use a coarser bin


class Profile:
    """A volume profile: ``vols[i]`` is the volume traded in price bin ``lo + i`` (bin index =
    floor(price / bin)). Dense over at most PROFILE_MAX_BINS bins, so adding two profiles is two
    slice additions. The array is never modified after construction: bars share profiles
    instead of copying them."""

    __slots__ = ("lo", "hi", "vols")

    def __init__(self, lo: int, vols: np.ndarray):
        self.lo = lo = int(lo)
        self.hi = lo + len(vols) - 1  # last bin
        self.vols = vols

    @classmethod
    def from_dict(cls, bins: dict) -> "Profile":
        lo = min(bins)
        vols = np.zeros(max(bins) - lo + 1)
        for k, v in bins.items():
            vols[k - lo] = v
        return cls(lo, vols)

    def to_dict(self) -> dict:
        """bin index -> volume of the non-empty bins."""
        nz = np.flatnonzero(self.vols)
        return dict(zip((nz + self.lo).tolist(), self.vols[nz].tolist()))

    def coarsen(self, factor: int) -> "Profile":
        """The same volume on bins ``factor`` times wider: bin i falls in bin i // factor."""
        if factor == 1:
            return self
        idx = np.arange(self.lo, self.hi + 1) // factor
        return Profile(idx[0], np.bincount(idx - idx[0], weights=self.vols))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Profile) and self.to_dict() == other.to_dict()

    __hash__ = None  # mutable contents: not hashable

    def __repr__(self) -> str:
        return f"Profile({self.to_dict()})"


def coarsening(lo: int, hi: int) -> int:
    """The smallest power of ten f such that bins lo..hi, made f times wider, are at most
    PROFILE_MAX_BINS (1 when they already are). A few iterations at most: O(1) per bar."""
    f = 1
    while hi // f - lo // f >= PROFILE_MAX_BINS:
        f *= 10
    return f


def scaled_bin(bin_size: float, scale: int) -> float:
    """``bin_size * scale`` without the binary noise (0.01 * 1000 -> 10.0)."""
    return bin_size if scale == 1 else round(bin_size * scale, bin_decimals(bin_size))


def bin_decimals(bin_size: float) -> int:
    return max(0, -math.floor(math.log10(bin_size)) + 1)


def add_profiles(a: Profile, a_scale: int, b: Profile, b_scale: int) -> tuple[Profile, int]:
    """``a + b`` and its scale. Profiles on different grids (scales 10^i, 10^j of the same
    instrument bin) are re-binned onto the coarser grid, exactly: each finer bin lies in one
    coarser bin. If the sum then spans more than PROFILE_MAX_BINS it is coarsened further."""
    scale = max(a_scale, b_scale)
    lo = min(a.lo // (scale // a_scale), b.lo // (scale // b_scale))
    hi = max(a.hi // (scale // a_scale), b.hi // (scale // b_scale))
    if hi - lo >= PROFILE_MAX_BINS:
        scale *= coarsening(lo, hi)
    if scale != a_scale or scale != b_scale:
        a, b = a.coarsen(scale // a_scale), b.coarsen(scale // b_scale)
        lo, hi = min(a.lo, b.lo), max(a.hi, b.hi)
    vols = np.zeros(hi - lo + 1)
    vols[a.lo - lo:a.hi - lo + 1] = a.vols
    vols[b.lo - lo:b.hi - lo + 1] += b.vols
    return Profile(lo, vols), scale


def default_bin(price: float, bps: float) -> float:
    """A power of ten near ``price * bps``: stable for an instrument, so profiles merge."""
    return 10.0 ** round(math.log10(price * bps * 1e-4))


def value_area(profile: Profile, fraction: float) -> tuple[int, int, int]:
    """(poc, vah, val) bin indices. POC = bin with most volume (lowest on ties); the value area
    grows from the POC one bin at a time towards the side with more volume (up on ties) until
    it holds ``fraction`` of the volume.

    Vectorised: that expansion compares the next bin above with the next bin below, i.e. it
    merges the sequences "bins above, going up" and "bins below, going down" by their heads.
    Such a merge of unsorted sequences takes each bin in the order of its side's running
    minimum up to it (a big bin waits behind a smaller one nearer the POC), so a stable sort
    by running minimum, descending, gives the same order (bins above come first in the sorted
    array, so they win ties as in the loop), and a cumulative sum the stopping point. The sums
    are the loop's own additions in the loop's order (from the POC's volume on), so the result
    is identical to the loop's (tests keep the loop as the reference).
    """
    vols = profile.vols
    poc = int(vols.argmax())
    target = fraction * vols.sum()
    up, down = vols[poc + 1:], vols[:poc][::-1]
    seq = np.concatenate((vols[poc:poc + 1], up, down))  # the POC, then the bins above, then below
    key = np.concatenate(((np.inf,), np.minimum.accumulate(up), np.minimum.accumulate(down)))
    order = np.argsort(-key, kind="stable")
    inside = seq[order].cumsum()
    reached = inside >= target
    steps = int(reached.argmax()) if reached[-1] else len(order) - 1  # bins added to the POC
    n_down = int(np.count_nonzero(order[1:steps + 1] > len(up)))
    return profile.lo + poc, profile.lo + poc + steps - n_down, profile.lo + poc - n_down
