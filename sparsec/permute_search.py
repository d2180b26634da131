"""Permutation search: gather the non-zeros of matrices that share a channel dimension into few tiles.

The problem. Several boolean non-zero masks share one channel dimension (a hidden dimension of the
graph: the rows of the producer linears and of their biases, the columns of the consumer linears).
Each mask is given channel-major, `[C, K_i]` (a producer weight as it is; a consumer weight
transposed). One permutation `perm` of the C channels is applied to all of them: mask `m` becomes
`m[perm]`. Cutting channels into consecutive groups of `tile` and the other dimension into tiles of
`tile` too, the cost is the number of tiles holding a non-zero, summed over the masks.

Only which *column tile* a channel touches matters, so every channel is reduced to its *signature*:
one bit per (mask, column tile), `[C, B]`. A group of `tile` channels costs the popcount of the OR
of its signatures, and the whole problem is a balanced partition of the signatures into groups of
`tile` minimizing the summed OR-popcounts (then the groups are laid out one after another).

Algorithms (all vectorized over channels and bits; the Python loops run over groups or steps):
- `identity`: the current order (the baseline every search must beat).
- `lexsort`: channels sorted by signature (identical signatures become neighbours), cheap.
- `greedy`: SMaT-style greedy clustering: a group is seeded with the channel with the most tiles
  and filled with the channels adding the fewest new tiles (Hamming distance to the group's OR),
  ties broken by overlap (Jaccard-like); identical signatures are taken in bulk.
- `spectral`: recursive balanced bisection along the principal direction of the (normalized,
  centred) signatures, cut at multiples of `tile`.
- `local`: local search from a start order: for every pair of groups the best channel to swap is
  found from vectorized gain matrices (tiles freed by removing, tiles opened by inserting), a
  matching of non-overlapping improving swaps is applied with their exact gains, until no swap
  improves. `greedy+local` and `spectral+local` start from those orders.

`search_permutation` runs the requested candidates, evaluates each exactly and returns the best
(never worse than identity). `search_biperm` alternates rows and columns for one matrix whose rows
and columns may both be permuted inside the kernel (block-reorder).

Convention (as `runtime.formats`): the permuted matrix is `W[perm]` (row i of the result is row
`perm[i]` of the original).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

DEFAULT_ALGORITHMS = ("identity", "lexsort", "greedy", "greedy+local", "spectral+local")


# ---------------------------------------------------------------------------------------------
# Signatures and objective
# ---------------------------------------------------------------------------------------------

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def as_matrix(mask: torch.Tensor) -> torch.Tensor:
    """A channel-major mask as a bool [C, K] matrix on the CPU (searches run there whatever the
    weights' device; a convolution's kernel dimensions are flattened into K)."""
    return mask.reshape(mask.shape[0], -1).bool().cpu()


def signature(mask: torch.Tensor, tile: int) -> torch.Tensor:
    """bool [C, K] channel-major mask -> bool [C, ceil(K/tile)]: does channel c touch column tile j."""
    mask = as_matrix(mask)
    c, k = mask.shape
    pad = (-k) % tile
    if pad:
        mask = torch.nn.functional.pad(mask, (0, pad))
    return mask.reshape(c, -1, tile).any(dim=2)


def signatures(masks: Sequence[torch.Tensor], tile: int) -> torch.Tensor:
    """Concatenated signatures of channel-major masks sharing their first dimension: bool [C, B]."""
    sigs = [signature(m, tile) for m in masks]
    channels = {s.shape[0] for s in sigs}
    if len(channels) != 1:
        raise ValueError(f"masks do not share their channel dimension: {sorted(channels)}")
    return torch.cat(sigs, dim=1)


def objective(sig: torch.Tensor, perm: torch.Tensor | None, tile: int) -> int:
    """Non-zero tiles when channels are laid out in `perm` order (groups of `tile`, last one partial)."""
    c, b = sig.shape
    s = sig if perm is None else sig[perm]
    pad = (-c) % tile
    if pad:
        s = torch.cat([s, s.new_zeros(pad, b)])
    return int(s.reshape(-1, tile, b).any(dim=1).sum())


def count_tiles(mask: torch.Tensor, tile: int, row_perm=None, col_perm=None) -> int:
    """Exact non-zero `tile` x `tile` tiles of a 2-D mask after optional row/column permutations."""
    m = as_matrix(mask)
    if row_perm is not None:
        m = m[row_perm]
    if col_perm is not None:
        m = m[:, col_perm]
    return objective(signature(m, tile), None, tile)


def tile_lower_bound(mask: torch.Tensor, tile: int) -> int:
    """The fewest non-zero `tile` x `tile` tiles any row and column permutation can leave. A block of
    `tile` rows covers at least as many columns as its densest row, so it spans at least
    ceil(that / tile) tiles; grouping the rows densest first minimizes the sum of those maxima. The
    same holds for columns; the bound is the larger of the two. (It is never below the non-zeros over
    a tile's capacity: each block's densest line is at least its average.)"""
    m = as_matrix(mask)

    def along(counts: torch.Tensor) -> int:
        block_maxima = counts.sort(descending=True).values[::tile]  # the densest line of each block
        return int(torch.div(block_maxima + tile - 1, tile, rounding_mode="floor").sum())

    return max(along(m.sum(dim=1)), along(m.sum(dim=0)))


# Searches are many small tensor ops in sequence: a single thread avoids OpenMP spin-waits that
# make them 10-100x slower when the machine is shared (measured: greedy 38 s -> 3.7 s on 2 busy cores).
SEARCH_THREADS = 1


@contextlib.contextmanager
def _search_threads():
    previous = torch.get_num_threads()
    if SEARCH_THREADS and SEARCH_THREADS < previous:
        torch.set_num_threads(SEARCH_THREADS)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Progress bar (shown only once a search has run for more than a second)
# ---------------------------------------------------------------------------------------------

class _Progress:
    """A rich progress bar that appears only when the work takes longer than `delay` seconds."""

    def __init__(self, description: str, total: float, enabled: bool = True, delay: float = 1.0):
        self.description, self.total, self.enabled, self.delay = description, total, enabled, delay
        self.start = time.perf_counter()
        self.done = 0.0
        self._bar = None
        self._task = None

    def advance(self, amount: float = 1.0, description: str | None = None) -> None:
        self.done += amount
        if description:
            self.description = description
        if not self.enabled:
            return
        if self._bar is None and time.perf_counter() - self.start > self.delay:
            try:
                from rich.console import Console
                from rich.progress import Progress

                self._bar = Progress(console=Console(file=sys.stderr), transient=True)
                self._bar.start()
                self._task = self._bar.add_task(self.description, total=self.total)
            except Exception:  # no rich / no terminal: silently no bar
                self.enabled = False
                return
        if self._bar is not None:
            self._bar.update(self._task, completed=min(self.done, self.total), description=self.description)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# ---------------------------------------------------------------------------------------------
# Algorithms: sig bool [C, B], tile -> perm long [C]
# ---------------------------------------------------------------------------------------------

def _group_sizes(c: int, tile: int) -> list[int]:
    g = _cdiv(c, tile)
    return [tile] * (g - 1) + [c - (g - 1) * tile] if g else []


def identity_order(sig: torch.Tensor, tile: int, **_) -> torch.Tensor:
    return torch.arange(sig.shape[0])


def lexsort_order(sig: torch.Tensor, tile: int, **_) -> torch.Tensor:
    """Channels sorted by signature (as a big binary number, most-populated first)."""
    c, b = sig.shape
    order = torch.arange(c)
    # Stable sorts from the least significant key to the most significant one (vectorized per key).
    for j in reversed(range(b)):
        order = order[torch.sort((~sig[order, j]).to(torch.uint8), stable=True).indices]
    key = sig.sum(1)
    return order[torch.sort(-key[order], stable=True).indices]


def greedy_order(sig: torch.Tensor, tile: int, progress: _Progress | None = None, **_) -> torch.Tensor:
    """SMaT-style greedy clustering by signature similarity (see the module doc)."""
    c, b = sig.shape
    if c == 0 or b == 0:
        return torch.arange(c)
    uniq, inverse, counts = torch.unique(sig, dim=0, return_inverse=True, return_counts=True)
    u = uniq.shape[0]
    members = torch.argsort(inverse, stable=True)  # channels grouped by unique signature
    starts = torch.cumsum(counts, 0) - counts
    taken = torch.zeros(u, dtype=torch.long)
    remaining = counts.clone()
    uf = uniq.float()
    size = uf.sum(1)
    big = float(b + 1)
    # Score: new tiles the candidate adds to the group (times b+1), minus the tiles it shares.
    seed_key = size * (c + 1) + counts.float()  # most tiles first, then the most common
    takes: list[tuple[int, int]] = []  # (unique index, how many)
    alive = remaining > 0

    def take(index: int, cap: int) -> int:
        """Put up to `cap` channels of unique signature `index` in the group; the room left."""
        k = min(int(remaining[index]), cap)
        takes.append((index, k))
        remaining[index] -= k
        if remaining[index] == 0:
            alive[index] = False
        return cap - k

    for cap in _group_sizes(c, tile):
        seed = int(torch.where(alive, seed_key, torch.tensor(-1.0)).argmax())
        cap = take(seed, cap)
        cur = uniq[seed].clone()
        overlap = uf[:, cur].sum(1)
        while cap > 0:
            score = (size - overlap) * big - overlap
            score = torch.where(alive, score, torch.tensor(math.inf))
            best = int(score.argmin())
            cap = take(best, cap)
            new_bits = uniq[best] & ~cur
            if bool(new_bits.any()):
                cur |= new_bits
                overlap += uf[:, new_bits].sum(1)
        if progress is not None:
            progress.advance(1)
    # Expand (unique, count) takes into channel indices, in order.
    uidx = torch.tensor([t[0] for t in takes], dtype=torch.long)
    kcnt = torch.tensor([t[1] for t in takes], dtype=torch.long)
    # offset of each take inside its unique signature's member list
    offs = torch.zeros_like(kcnt)
    for i, (ui, k) in enumerate(takes):  # loop over takes (steps), not elements
        offs[i] = taken[ui]
        taken[ui] += k
    rep_u = torch.repeat_interleave(uidx, kcnt)
    rep_off = torch.repeat_interleave(offs, kcnt)
    within = torch.arange(int(kcnt.sum())) - torch.repeat_interleave(torch.cumsum(kcnt, 0) - kcnt, kcnt)
    return members[starts[rep_u] + rep_off + within]


def spectral_order(sig: torch.Tensor, tile: int, progress: _Progress | None = None, **_) -> torch.Tensor:
    """Recursive balanced bisection along the principal direction of the signatures."""
    c, b = sig.shape
    if b == 0:
        return torch.arange(c)
    x = sig.float()
    norms = x.norm(dim=1, keepdim=True).clamp_min(1e-6)
    x = x / norms
    out: list[torch.Tensor] = []

    def split(idx: torch.Tensor, groups: int) -> None:
        if groups <= 1 or idx.numel() <= tile:
            out.append(idx)
            if progress is not None:
                progress.advance(1)
            return
        xs = x[idx]
        xs = xs - xs.mean(0, keepdim=True)
        gram = xs.T @ xs
        _, vecs = torch.linalg.eigh(gram.double())
        proj = xs.double() @ vecs[:, -1]
        # tie-break identical projections by the signature itself, so equal channels stay together
        proj = proj + 1e-9 * (xs.double() @ vecs[:, -2] if vecs.shape[1] > 1 else 0)
        order = idx[torch.argsort(proj, stable=True)]
        left = (groups // 2) * tile
        split(order[:left], groups // 2)
        split(order[left:], groups - groups // 2)

    split(torch.arange(c), _cdiv(c, tile))
    return torch.cat(out) if out else torch.arange(0)


def local_search(sig: torch.Tensor, tile: int, start: torch.Tensor | None = None, *, max_iters: int = 1000,
                 time_budget: float = 20.0, progress: _Progress | None = None, **_) -> torch.Tensor:
    """Swap channels between groups while it lowers the exact tile count (see the module doc)."""
    c, b = sig.shape
    g = _cdiv(c, tile)
    if g <= 1 or b == 0:
        return torch.arange(c) if start is None else start.clone()
    pad = g * tile - c
    s = torch.cat([sig.float(), torch.zeros(pad, b)])  # dummy channels pad the last group
    order = torch.cat([torch.arange(c) if start is None else start.clone(), torch.arange(c, c + pad)])
    fixed = torch.zeros(g * tile, dtype=torch.bool)
    fixed[c:] = True  # slots of dummies never move (they mark the partial last group)
    eye = torch.eye(g, dtype=torch.bool)
    deadline = time.perf_counter() + time_budget
    for _ in range(max_iters):
        sg = s[order].view(g, tile, b)
        cnt = sg.sum(1)  # [G, B]: channels of group g touching column tile j
        occ1 = (cnt == 1).float()
        empty = (cnt == 0).float()
        freed = (sg * occ1[:, None, :]).sum(2)  # [G, T] tiles that empty when the channel leaves
        opened = (sg.reshape(-1, b) @ empty.T).view(g, tile, g)  # [G, T, G'] tiles it opens in g'
        gain = opened - freed[..., None]
        gain.masked_fill_(eye[:, None, :], math.inf)
        gain.view(-1, g).masked_fill_(fixed[:, None], math.inf)
        best, arg = gain.min(dim=1)  # [G, G']: best channel of g to send to g'
        pair = best + best.T  # optimistic (exact when the swapped channels share no bits)
        pair = torch.where(torch.triu(torch.ones(g, g, dtype=torch.bool), 1), pair, torch.tensor(math.inf))
        cand = (pair < -0.5).nonzero()
        if cand.numel() == 0:
            break
        vals = pair[cand[:, 0], cand[:, 1]]
        cand = cand[torch.argsort(vals, stable=True)].tolist()
        used = set()
        chosen = []
        for gi, hi in cand:  # a greedy matching of group pairs (loop over group pairs)
            if gi in used or hi in used:
                continue
            used.update((gi, hi))
            chosen.append((gi, hi))
        gi = torch.tensor([p[0] for p in chosen])
        hi = torch.tensor([p[1] for p in chosen])
        slot_c = gi * tile + arg[gi, hi]
        slot_d = hi * tile + arg[hi, gi]
        sc, sd = s[order[slot_c]], s[order[slot_d]]
        cg, ch = cnt[gi], cnt[hi]
        delta = ((cg - sc + sd > 0).sum(1) - (cg > 0).sum(1)) + ((ch - sd + sc > 0).sum(1) - (ch > 0).sum(1))
        ok = delta < 0
        if not bool(ok.any()):
            break
        a, d = slot_c[ok], slot_d[ok]
        tmp = order[a].clone()
        order[a] = order[d]
        order[d] = tmp
        if progress is not None:
            progress.advance(0)
        if time.perf_counter() > deadline:
            break
    return order[:c] if pad == 0 else order[order < c]


def _chain(first: str, second: str) -> Callable:
    def run(sig, tile, progress=None, time_budget=20.0, start=None, **kw):
        if start is None:
            start = ALGORITHMS[first](sig, tile, progress=progress, time_budget=time_budget, **kw)
        return ALGORITHMS[second](sig, tile, start=start, progress=progress, time_budget=time_budget, **kw)

    run.chain = (first, second)
    return run


ALGORITHMS: dict[str, Callable] = {
    "identity": identity_order,
    "lexsort": lexsort_order,
    "greedy": greedy_order,
    "spectral": spectral_order,
    "local": local_search,
    "greedy+local": _chain("greedy", "local"),
    "spectral+local": _chain("spectral", "local"),
    "lexsort+local": _chain("lexsort", "local"),
}


def register_algorithm(name: str, fn: Callable) -> None:
    """Add a search algorithm: `fn(sig bool[C, B], tile, progress=None, **kw) -> perm long[C]`."""
    ALGORITHMS[name] = fn


# ---------------------------------------------------------------------------------------------
# Front ends
# ---------------------------------------------------------------------------------------------

@dataclass
class SearchResult:
    perm: torch.Tensor  # long [C]; apply as tensor.index_select(channel_dim, perm)
    tile: int
    tiles_before: int
    tiles_after: int
    algorithm: str
    seconds: float
    candidates: dict[str, int] = field(default_factory=dict)  # algorithm -> tiles
    candidate_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def improvement(self) -> float:
        """Fraction of tiles saved (0.2 = 20% fewer tiles)."""
        return 1.0 - self.tiles_after / self.tiles_before if self.tiles_before else 0.0


def _validate_perm(perm: torch.Tensor, c: int) -> torch.Tensor:
    perm = torch.as_tensor(perm, dtype=torch.long)
    if perm.shape != (c,) or not torch.equal(torch.sort(perm).values, torch.arange(c)):
        raise RuntimeError(f"search produced an invalid permutation of {c} channels")
    return perm


def search_signatures(sig: torch.Tensor, tile: int, algorithms: Sequence[str] = DEFAULT_ALGORITHMS, *,
                      time_budget: float = 20.0, show_progress: bool = True, description: str = "permute",
                      ) -> SearchResult:
    """Best order of the rows of a signature matrix among `algorithms` (identity always included)."""
    with _search_threads():
        return _search_signatures(sig, tile, algorithms, time_budget=time_budget, show_progress=show_progress,
                                  description=description)


def _check_algorithms(algorithms: Sequence[str]) -> None:
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        raise ValueError(f"unknown permutation algorithm(s) {unknown}; known: {', '.join(ALGORITHMS)}")


def _search_signatures(sig, tile, algorithms, *, time_budget, show_progress, description) -> SearchResult:
    _check_algorithms(algorithms)
    start = time.perf_counter()
    c = sig.shape[0]
    sig = sig.bool()
    names = ["identity"] + [a for a in algorithms if a != "identity"]
    before = objective(sig, None, tile)
    progress = _Progress(description, total=len(names) * max(_cdiv(c, tile), 1), enabled=show_progress)
    best_name, best_perm, best_tiles = "identity", torch.arange(c), before
    cands, cand_s = {"identity": before}, {"identity": 0.0}
    perms = {"identity": best_perm}
    try:
        # Nothing to gain when every group already costs the minimum (all bits of the OR needed).
        lower = int(sig.any(0).sum()) if c else 0
        for name in names[1:]:
            if best_tiles <= lower:
                break
            t0 = time.perf_counter()
            remaining = max(time_budget - (t0 - start), 0.5)
            progress.advance(0, f"{description}: {name}")
            fn = ALGORITHMS[name]
            chain = getattr(fn, "chain", None)
            if chain is not None and chain[0] in perms:  # reuse the start order computed already
                perm = fn(sig, tile, progress=progress, time_budget=remaining, start=perms[chain[0]])
            else:
                perm = fn(sig, tile, progress=progress, time_budget=remaining)
            perm = _validate_perm(perm, c)
            tiles = objective(sig, perm, tile)
            cands[name], cand_s[name] = tiles, time.perf_counter() - t0
            perms[name] = perm
            if tiles < best_tiles:
                best_name, best_perm, best_tiles = name, perm, tiles
    finally:
        progress.close()
    return SearchResult(best_perm, tile, before, best_tiles, best_name, time.perf_counter() - start, cands, cand_s)


def search_permutation(masks: Sequence[torch.Tensor], tile: int = 64, algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
                       *, time_budget: float = 20.0, show_progress: bool = True,
                       description: str = "co-permute") -> SearchResult:
    """One permutation of the shared channel dimension of channel-major masks `[C, K_i]` minimizing
    their total non-zero `tile` x `tile` tiles. Returns the best of `algorithms` (never worse than
    the current order)."""
    if not masks:
        raise ValueError("search_permutation needs at least one mask")
    _check_algorithms(algorithms)
    sig = signatures(masks, tile)
    tiles = objective(sig, None, tile)
    if tiles <= sum(tile_lower_bound(m, tile) for m in masks):
        # Every non-zero tile is already full: no order can do better (e.g. block-pruned weights).
        return SearchResult(torch.arange(sig.shape[0]), tile, tiles, tiles, "identity", 0.0)
    return search_signatures(sig, tile, algorithms, time_budget=time_budget, show_progress=show_progress,
                             description=description)


@dataclass
class BiPermResult:
    row_perm: torch.Tensor
    col_perm: torch.Tensor
    tile: int
    tiles_before: int
    tiles_after: int
    algorithms: list[str]
    seconds: float

    @property
    def improvement(self) -> float:
        return 1.0 - self.tiles_after / self.tiles_before if self.tiles_before else 0.0


FINE_BITS = 1024  # width of the fine row signature that starts block-reorder's alternation


def search_biperm(mask: torch.Tensor, tile: int = 64, algorithms: Sequence[str] = DEFAULT_ALGORITHMS, *,
                  rows: bool = True, cols: bool = True, rounds: int = 4, time_budget: float = 20.0,
                  show_progress: bool = True, description: str = "block-reorder") -> BiPermResult:
    """Row and column permutations of one 2-D mask minimizing its non-zero tiles.

    Rows are clustered by their column-tile signatures and columns by their row-tile ones,
    alternately, each step kept only when the exact count drops. When both dimensions are
    scrambled the tile-level signatures carry no information (every row touches every column
    tile), so a second start first clusters the rows by a *fine* signature (columns in groups of
    `ceil(K / FINE_BITS)`, nearly the raw pattern) and then alternates; the better start wins."""
    with _search_threads():
        return _search_biperm(mask, tile, algorithms, rows=rows, cols=cols, rounds=rounds, time_budget=time_budget,
                              show_progress=show_progress, description=description)


def _search_biperm(mask, tile, algorithms, *, rows, cols, rounds, time_budget, show_progress,
                   description) -> BiPermResult:
    start = time.perf_counter()
    _check_algorithms(algorithms)
    m = as_matrix(mask)
    n, k = m.shape
    before = count_tiles(m, tile)
    best = (before, torch.arange(n), torch.arange(k), [])
    if before <= tile_lower_bound(m, tile):  # already as few tiles as the non-zeros allow
        return BiPermResult(best[1], best[2], tile, before, before, [], time.perf_counter() - start)
    starts = ["tile"] + (["fine"] if rows and cols else [])
    for which in starts:
        row_perm, col_perm, current, used = torch.arange(n), torch.arange(k), before, []
        budget = time_budget / len(starts)
        t_start = time.perf_counter()
        if which == "fine":
            fine = max(1, _cdiv(k, FINE_BITS))
            res = search_signatures(signature(m, fine), tile, ("greedy", "lexsort"), time_budget=budget / 3,
                                    show_progress=show_progress, description=f"{description} rows (fine)")
            row_perm = res.perm
            current = count_tiles(m, tile, row_perm, col_perm)
            used.append(f"rows-fine:{res.algorithm}")
        steps = (["rows", "cols"] if rows else []) if cols else ["rows"]
        if not rows:
            steps = ["cols"]
        if which == "fine":
            steps = steps[1:] + steps[:1]  # rows were just ordered: columns next
        stale = 0
        for step in (steps * rounds):
            left = budget - (time.perf_counter() - t_start)
            if left <= 0 or stale >= len(steps):
                break
            if step == "rows":
                res = search_signatures(signature(m[row_perm][:, col_perm], tile), tile, algorithms, time_budget=left / 2,
                                        show_progress=show_progress, description=f"{description} rows")
                cand = (row_perm[res.perm], col_perm)
            else:
                res = search_signatures(signature(m[row_perm][:, col_perm].T, tile), tile, algorithms,
                                        time_budget=left / 2,
                                        show_progress=show_progress, description=f"{description} cols")
                cand = (row_perm, col_perm[res.perm])
            if res.tiles_after < res.tiles_before:
                row_perm, col_perm = cand
                current = res.tiles_after
                used.append(f"{step}:{res.algorithm}")
                stale = 0
            else:
                stale += 1
        current = count_tiles(m, tile, row_perm, col_perm)
        if current < best[0]:
            best = (current, row_perm, col_perm, used)
    after, row_perm, col_perm, used = best
    return BiPermResult(row_perm, col_perm, tile, before, after, used, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Planted structure (tests and benchmarks)
# ---------------------------------------------------------------------------------------------

def planted_pair(channels: int, other: int, tile: int = 64, density: float = 0.1, generator=None):
    """A producer mask [channels, other] and a consumer mask [other, channels] whose non-zeros fill
    `density` of their `tile` x `tile` tiles, completely. Returns (producer, consumer) bool masks
    in the planted order (channel tiles aligned)."""
    g = generator
    gc, go = _cdiv(channels, tile), _cdiv(other, tile)

    def tiles(rows, cols):
        t = torch.rand(rows, cols, generator=g) < density
        # at least one tile in every channel tile-row so no channel is dead
        t[torch.arange(rows), torch.randint(cols, (rows,), generator=g)] = True
        return t

    prod_t, cons_t = tiles(gc, go), tiles(gc, go)
    expand = lambda t: t.repeat_interleave(tile, 0).repeat_interleave(tile, 1)
    producer = expand(prod_t)[:channels, :other]
    consumer = expand(cons_t)[:channels, :other].T.contiguous()
    return producer, consumer


def move_nonzeros(mask: torch.Tensor, fraction: float, generator=None) -> torch.Tensor:
    """A copy of `mask` with `fraction` of its non-zeros moved to random zero positions."""
    flat = mask.flatten().clone()
    nz = flat.nonzero().squeeze(1)
    z = (~flat).nonzero().squeeze(1)
    k = min(int(round(fraction * nz.numel())), z.numel())
    off = nz[torch.randperm(nz.numel(), generator=generator)[:k]]
    on = z[torch.randperm(z.numel(), generator=generator)[:k]]
    flat[off] = False
    flat[on] = True
    return flat.view_as(mask)


def move_segments(mask: torch.Tensor, fraction: float, tile: int = 64, generator=None) -> torch.Tensor:
    """Noise at the granularity the search sees: `fraction` of the non-zero row segments (one row
    of one `tile`-wide column tile, fully dense) moved to random empty segments. Unlike moving
    single elements (which at 90% sparsity and 64x64 tiles touches nearly every tile, whatever the
    order), this leaves structure to recover and makes the planted order a meaningful reference."""
    rows, cols = mask.shape
    seg = signature(mask, tile)
    seg = move_nonzeros(seg, fraction, generator)
    return seg.repeat_interleave(tile, 1)[:, :cols].contiguous()
