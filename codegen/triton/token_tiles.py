"""Token tiles of the launchers, chosen without turning a symbolic token count into a number.

Under torch.compile with a dynamic batch the launchers run once on a symbolic M (Inductor traces
into the triton_ops). `int(M)` there specializes the compiled graph to that one count, so every new
batch size would recompile; a comparison only guards a range (M <= 16), so the graph is reused
until M crosses into another tile.
"""


def pow2_tile(m, smallest: int = 1, largest: int | None = None) -> int:
    """The smallest power of two >= m, kept within [smallest, largest], by comparisons only."""
    tile = smallest
    while (largest is None or tile < largest) and m > tile:
        tile *= 2
    return tile
