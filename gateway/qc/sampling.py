"""Which slices of a series get pixel measures (R-QC-1; docs/qc.md "Sampling the slices of a series").

Header checks run on every instance. Pixel measures cost 20–25 ms a CT slice: on every slice of a
300-slice CT they are most of what QC costs, and the slices of one acquisition share detector,
dose, reconstruction and positioning, so their pixel measures say nearly the same thing. For the
modalities of ``sampled_modalities`` in ``config/qc.toml`` (CT, MR, PT, NM by default) a slice is
first graded by its header only (``pixels = "skipped"`` in its result); once the series has been
received and every header graded, :func:`sample` picks the positions that get the full pixel
measures: the first, the last and evenly spaced ones between them (an odd count includes the
middle), at most ``series_sample`` (0: every slice), and every position that holds a reject or
its replacement. The choice depends only on the series' instance numbers, so the same series
always gets the same sample, whatever the order and timing of its arrival.
"""

from __future__ import annotations

from collections.abc import Iterable

SERIES_SAMPLE = 9  # default of series_sample in config/qc.toml
SAMPLED_MODALITIES = ("CT", "MR", "PT", "NM")  # default of sampled_modalities


def sample(positions: Iterable[int], size: int) -> set[int]:
    """Of the instance numbers ``positions``, the ones measured: first, last and evenly spaced
    between, ``size`` at most (``size`` 0, or fewer positions than ``size``: all of them)."""
    ordered = sorted(set(positions))
    if size <= 0 or len(ordered) <= size:
        return set(ordered)
    if size == 1:
        return {ordered[(len(ordered) - 1) // 2]}
    last = len(ordered) - 1
    # index i·last/(size-1), rounded down: both ends included, the middle for an odd size
    return {ordered[(i * last) // (size - 1)] for i in range(size)}
