"""The launchers' token tiles on a symbolic token count: range guards, never a specialization.

The ops route symbolic counts away from the launchers (tests/test_select_kernels.py,
test_dynamic_batch_runs_traceable_kernels_with_real_token_counts); this checks the launchers' own
choice with a ShapeEnv, the machinery Dynamo and Inductor use, so that tracing one on a symbolic
count would add range guards only, where int(M) would pin the graph to one count.
"""
import pytest
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

pytest.importorskip("triton")

from sparsec.codegen.triton import bitmap, bsr_small_m, csr  # noqa: E402
from sparsec.codegen.triton.token_tiles import pow2_tile  # noqa: E402


def symbolic(env, name, value):
    symbol = env.create_symbol(value, ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
    return env.create_symintnode(symbol, hint=value), symbol


@pytest.mark.parametrize("smallest,largest", [(1, None), (16, None), (1, 64), (16, 64)])
def test_pow2_tile_is_the_next_power_of_two_within_bounds(smallest, largest):
    for m in range(1, 600):
        expected = max(smallest, 1 << (m - 1).bit_length())
        if largest is not None:
            expected = min(expected, largest)
        assert pow2_tile(m, smallest, largest) == expected, m


@pytest.mark.parametrize("tokens", [3, 17, 300])
def test_launcher_configs_leave_a_symbolic_token_count_symbolic(tokens):
    env = ShapeEnv()
    m, symbol = symbolic(env, "M", tokens)
    configs = [bsr_small_m.pick_config(m, 64, 64, 64, 32.0, False, 2), bitmap.pick_config(m, 16, 4096),
               csr.pick_config(m, 4096), {"bucket": pow2_tile(m)}]
    assert symbol not in env.replacements, "a launcher turned the token count into a constant"
    assert env.guards, "the configs should depend on the token count through range guards"
    # the same configs as for the plain number
    assert configs == [bsr_small_m.pick_config(tokens, 64, 64, 64, 32.0, False, 2), bitmap.pick_config(tokens, 16, 4096),
                       csr.pick_config(tokens, 4096), {"bucket": pow2_tile(tokens)}]


def test_int_of_a_symbolic_count_is_what_the_check_catches():
    """The check above can fail: converting the symbol to a number specializes it."""
    env = ShapeEnv()
    m, symbol = symbolic(env, "M", 300)
    int(m)
    assert symbol in env.replacements
