"""analyze: annotate every constant with its SparsityInfo (nnz, density, pattern, tile counts)."""

from sparsec import ir
from sparsec.analysis import analyze
from sparsec.pass_manager import PassResult, register_pass


def annotate(gm) -> int:
    """Put a fresh SparsityInfo on every floating-point constant that lacks one; returns how many."""
    count = 0
    for node, value in ir.constants(gm):
        if value.is_floating_point() and "sparsity" not in node.meta:
            node.meta["sparsity"] = analyze(value)
            count += 1
    return count


@register_pass("analyze", "Annotate every constant with its sparsity pattern (density, N:M, blocks, channels)")
def analyze_pass(gm, ctx):
    annotated = annotate(gm)
    sparse = sum(1 for node, _ in ir.constants(gm) if node.meta.get("sparsity") and node.meta["sparsity"].pattern != "dense")
    # Annotating metadata does not change the graph's function or structure.
    return PassResult(changed=False, stats={"annotated": annotated, "sparse_constants": sparse})
