"""Token tiles of the launchers: the next power of two, chosen by comparisons only.

The ops never hand a launcher a symbolic token count (runtime.ops routes a graph compiled for a
dynamic batch to the opaque op, which launches with the real count). Should a launcher be traced on
one anyway, a comparison only adds a range guard (M <= 16), where int(M) would pin the compiled
graph to that one count.
"""


def pow2_tile(m, smallest: int = 1, largest: int | None = None) -> int:
    """The smallest power of two >= m, kept within [smallest, largest], by comparisons only."""
    tile = smallest
    while (largest is None or tile < largest) and m > tile:
        tile *= 2
    return tile
