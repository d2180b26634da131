"""A deliberately wrong pass for the CLI tests (`sparsec bisect --load-passes tests/cli_wrong_pass.py`).

`test-wrong-bias` rewrites every bias constant, one rewrite each, asking `ctx.allow_rewrite` first:
the rewrites keep the values, except the third, which negates its bias. `sparsec bisect` must name
this pass and rewrite #3 (counted over the pipeline, so #3 when it runs first).
"""

from sparsec import ir
from sparsec.pass_manager import PassResult, register_pass


@register_pass("test-wrong-bias", "deliberately wrong: its third rewrite negates a bias")
def wrong_bias(gm, ctx):
    done = 0
    for node, value in list(ir.constants(gm)):
        if value.dim() != 1 or not ir.display_name(node).endswith("bias"):
            continue
        number = done + 1
        wrong = number == 3
        if not ctx.allow_rewrite(f"{'negate' if wrong else 'copy'} {ir.display_name(node)}"):
            continue
        ir.set_constant(gm, node, -value if wrong else value.clone())
        done += 1
    return PassResult(changed=done > 0, stats={"biases_rewritten": done})


@register_pass("test-harmless", "rewrites nothing, asks for two rewrites")
def harmless(gm, ctx):
    ctx.allow_rewrite("nothing 1")
    ctx.allow_rewrite("nothing 2")
    return PassResult(changed=False, stats={})
