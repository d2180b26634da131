"""channel-slice: remove dead channels across whole dimension groups, exactly.

For every sliceable group of `sparsec.dimgroups` (plain channel groups, attention heads, the
within-head dim...), a channel is dead when its contribution vanishes at every site that consumes
it: its value is identically zero there (all producer rows zero with zero bias, through ops that
keep zeros), or every consumer weight's column for it is zero, or (for q.k) either side is zero.

A channel whose value is a non-zero constant (a zero producer row with a non-zero bias, or a dead
conv channel after batch norm) is folded first: its contribution `W[:, c] * value` goes into the
consumer's bias (a bias is added where there was none; for a padded conv the contribution is a
constant map added after it), and the consumer column is zeroed. Then the channel is dead.

Per-channel facts ("this slice of the tensor is the constant v") are computed by forward
propagation through a table of transfer functions keyed by op (`TRANSFER`); an op with no entry
says nothing (the safe default: the channel is live).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from sparsec import ir
from sparsec.dimgroups import POINTWISE, _RESHAPES, _SPLIT_OPS, build_dim_groups, refine
from sparsec.pass_manager import PassResult, register_pass

aten = torch.ops.aten

# Status of one (node, dim): (const mask [n] bool, value [n]) - x.select(dim, i) == value[i]
# everywhere when mask[i].


def _shape(node):
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _dtype(node):
    return node.meta["val"].dtype


def _marginals(t: torch.Tensor) -> dict:
    out = {}
    if t.dim() == 0 or t.numel() == 0:
        return out
    for d in range(t.dim()):
        rows = t.detach().movedim(d, 0).reshape(t.shape[d], -1)
        first = rows[:, 0]
        out[d] = ((rows == first[:, None]).all(dim=1).cpu(), first.cpu().clone())
    return out


class Status:
    """Per-(node, dim) constant-channel facts for one graph."""

    def __init__(self, gm):
        self.gm = gm
        self.s: dict = {}

    def get(self, node, dim):
        if not isinstance(node, fx.Node):
            return None
        shape = _shape(node)
        if shape is None:
            return None
        return self.s.get((node, dim % len(shape)) if shape else None)

    def set(self, node, dim, mask, val):
        shape = _shape(node)
        dim %= len(shape)
        if mask is None or not bool(mask.any()):
            return
        self.s[(node, dim)] = (mask, val.to(_dtype(node)) if val.is_floating_point() or _dtype(node).is_floating_point else val)

    def zero(self, node, dim, n=None):
        st = self.get(node, dim)
        if st is None:
            n = n if n is not None else _shape(node)[dim]
            return torch.zeros(n, dtype=torch.bool)
        return st[0] & (st[1] == 0)

    def const(self, node, dim):
        st = self.get(node, dim)
        if st is None:
            n = _shape(node)[dim]
            return torch.zeros(n, dtype=torch.bool), torch.zeros(n)
        return st


TRANSFER: dict = {}


def _cpu_constant(S, node) -> torch.Tensor:
    """A constant's value on the CPU (status vectors live on the CPU whatever the device)."""
    return ir.get_constant(S.gm, node).detach().cpu()


def transfer(*ops):
    def deco(fn):
        for op in ops:
            TRANSFER[op] = fn
        return fn
    return deco


def _transfer_for(target):
    fn = TRANSFER.get(target)
    if fn is None and isinstance(target, torch._ops.OpOverload):
        fn = TRANSFER.get(target.overloadpacket)
    return fn


@transfer(aten.linear)
def _t_linear(S: Status, node):
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    rowzero = S.zero(w, 0)
    val = _cpu_constant(S, bias) if isinstance(bias, fx.Node) and bias.op == "get_attr" else torch.zeros(len(rowzero))
    if isinstance(bias, fx.Node) and bias.op != "get_attr":
        return
    S.set(node, -1, rowzero, val)


def _conv_groups(node):
    return node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)


@transfer(aten.conv1d, aten.conv2d, aten.conv3d)
def _t_conv(S: Status, node):
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    if isinstance(bias, fx.Node) and bias.op != "get_attr":
        return
    cout = _shape(node)[1]
    val = _cpu_constant(S, bias) if isinstance(bias, fx.Node) else torch.zeros(cout)
    mask = S.zero(w, 0).clone()
    g = _conv_groups(node)
    if g > 1:  # every input channel of a group is zero -> the group's outputs are the bias
        xz = S.zero(x, 1).reshape(g, -1).all(dim=1)
        mask |= xz.repeat_interleave(cout // g)
    S.set(node, 1, mask, val)


@transfer(aten.batch_norm)
def _t_bn(S: Status, node):
    x, w, b, mean, var, training, _, eps = node.args[:8]
    if training or not all(isinstance(t, fx.Node) and t.op == "get_attr" for t in (mean, var)):
        return
    st = S.get(x, 1)
    if st is None:
        return
    mask, v = st
    c = lambda t: _cpu_constant(S, t).double()
    out = (v.double() - c(mean)) / torch.sqrt(c(var) + eps)
    if isinstance(w, fx.Node):
        out = out * c(w)
    if isinstance(b, fx.Node):
        out = out + c(b)
    S.set(node, 1, mask, out)


def _tensor_args(node):
    return [a for a in node.args if isinstance(a, fx.Node)] + [a for a in node.kwargs.values() if isinstance(a, fx.Node)]


def _uniform(S, node) -> bool:
    value = _cpu_constant(S, node)
    return value.numel() > 0 and bool((value == value.reshape(-1)[0]).all())


def _t_pointwise(S: Status, node):
    out_shape = _shape(node)
    on = len(out_shape)
    tensors = _tensor_args(node)
    zero_kills = node.target.overloadpacket in (aten.mul, aten.mul_) or (
        node.target.overloadpacket is aten.div and tensors and node.args[0] is tensors[0])
    for od in range(on):
        n = out_shape[od]
        masks, vals = {}, {}
        for t in tensors:
            ts = _shape(t)
            d = od - (on - len(ts))
            if d >= 0 and ts[d] == n:
                mask, val = S.const(t, d)
                masks[t], vals[t] = mask, val
            elif t.op == "get_attr" and _uniform(S, t):
                v = _cpu_constant(S, t).reshape(-1)[0]
                masks[t], vals[t] = torch.ones(n, dtype=torch.bool), v.expand(n)
            else:
                masks[t], vals[t] = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=_dtype(t))
        allconst = torch.ones(n, dtype=torch.bool)
        for m in masks.values():
            allconst &= m
        newval = None
        if bool(allconst.any()):
            try:
                args = [vals[a] if isinstance(a, fx.Node) else a for a in node.args]
                kwargs = {k: (vals[v] if isinstance(v, fx.Node) else v) for k, v in node.kwargs.items()}
                newval = node.target(*args, **kwargs).reshape(-1).expand(n)
            except Exception:
                newval = None
        mask = allconst if newval is not None else torch.zeros(n, dtype=torch.bool)
        val = newval if newval is not None else torch.zeros(n)
        if zero_kills:
            first = node.args[0]
            cands = tensors if node.target.overloadpacket is not aten.div else [first]
            zk = torch.zeros(n, dtype=torch.bool)
            for t in cands:
                if t in masks:
                    zk |= masks[t] & (vals[t] == 0)
            if bool(zk.any()):
                val = torch.where(zk, torch.zeros((), dtype=val.dtype), val.to(val.dtype))
                mask = mask | zk
        S.set(node, od, mask, val)


for _op in POINTWISE:
    TRANSFER[_op] = _t_pointwise


def _t_view(S: Status, node):
    x = node.args[0]
    ins, outs = _shape(x), _shape(node)
    if math.prod(ins) != math.prod(outs):
        return
    atoms, in_map, out_map, tangled = refine(ins, outs)
    tangled_in = {d for side, d in tangled if side == "in"}
    atom_st = {}
    for d, ids in enumerate(in_map):
        if not ids or d in tangled_in:
            continue
        st = S.get(x, d)
        if st is None:
            continue
        mask, val = st
        sizes = [atoms[k] for k in ids]
        m, v = mask.reshape(sizes), val.reshape(sizes)
        for j, k in enumerate(ids):
            mm = m.movedim(j, 0).reshape(sizes[j], -1)
            vv = v.movedim(j, 0).reshape(sizes[j], -1)
            same = mm.all(dim=1) & (vv == vv[:, :1]).all(dim=1)
            atom_st[k] = (same, vv[:, 0])
    tangled_out = {d for side, d in tangled if side == "out"}
    for d, ids in enumerate(out_map):
        if not ids or d in tangled_out or not any(k in atom_st for k in ids):
            continue
        sizes = [atoms[k] for k in ids]
        mask = torch.zeros(sizes, dtype=torch.bool)
        val = torch.zeros(sizes, dtype=_dtype(node))
        for j, k in enumerate(ids):
            if k not in atom_st:
                continue
            am, av = atom_st[k]
            shape = [1] * len(sizes)
            shape[j] = sizes[j]
            am, av = am.reshape(shape).expand(sizes), av.reshape(shape).expand(sizes).to(val.dtype)
            val = torch.where(am & ~mask, av, val)
            mask = mask | am
        S.set(node, d, mask.reshape(-1), val.reshape(-1))


for _op in _RESHAPES:
    TRANSFER[_op] = _t_view


@transfer(aten.transpose.int, aten.permute, aten.t)
def _t_transpose(S: Status, node):
    x = node.args[0]
    n = len(_shape(x))
    if node.target is aten.permute.default:
        perm = [p % n for p in node.args[1]]
    elif node.target is aten.transpose.int:
        d0, d1 = node.args[1] % n, node.args[2] % n
        perm = list(range(n))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    else:
        perm = list(reversed(range(n)))
    for od, d in enumerate(perm):
        st = S.get(x, d)
        if st is not None:
            S.set(node, od, *st)


@transfer(aten.cat)
def _t_cat(S: Status, node):
    tensors = [t for t in node.args[0] if isinstance(t, fx.Node) and len(_shape(t)) == len(_shape(node))]
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(_shape(node))
    for d in range(len(_shape(node))):
        sts = [S.const(t, d) for t in tensors]
        if d == dim:
            S.set(node, d, torch.cat([m for m, _ in sts]), torch.cat([v.to(_dtype(node)) for _, v in sts]))
        else:
            m0, v0 = sts[0]
            mask = m0.clone()
            for m, v in sts[1:]:
                mask &= m & (v.to(v0.dtype) == v0)
            S.set(node, d, mask, v0)


@transfer(aten.stack)
def _t_stack(S: Status, node):
    tensors = list(node.args[0])
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(_shape(node))
    for d in range(len(_shape(tensors[0]))):
        m0, v0 = S.const(tensors[0], d)
        mask = m0.clone()
        for t in tensors[1:]:
            m, v = S.const(t, d)
            mask &= m & (v.to(v0.dtype) == v0)
        S.set(node, d if d < dim else d + 1, mask, v0)


@transfer(operator.getitem)
def _t_getitem(S: Status, node):
    src, i = node.args
    if not (isinstance(src, fx.Node) and src.target in _SPLIT_OPS):
        return
    x = src.args[0]
    dim = (src.args[2] if len(src.args) > 2 else 0) % len(_shape(x))
    sizes = [int(p.shape[dim]) for p in src.meta["val"]]
    off = sum(sizes[:i])
    for d in range(len(_shape(x))):
        st = S.get(x, d)
        if st is None:
            continue
        if d == dim:
            S.set(node, d, st[0][off:off + sizes[i]], st[1][off:off + sizes[i]])
        else:
            S.set(node, d, *st)


@transfer(aten.slice.Tensor)
def _t_slice(S: Status, node):
    from sparsec.dimgroups import _slice_range
    x = node.args[0]
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(_shape(x))
    step = node.args[4] if len(node.args) > 4 else 1
    start, end = _slice_range(node)
    for d in range(len(_shape(x))):
        st = S.get(x, d)
        if st is None:
            continue
        if d == dim:
            S.set(node, d, st[0][start:end:step], st[1][start:end:step])
        else:
            S.set(node, d, *st)


@transfer(aten.scaled_dot_product_attention)
def _t_sdpa(S: Status, node):
    v = node.args[2]
    n = len(_shape(node))
    for d in list(range(n - 2)) + [n - 1]:
        if _shape(v)[d] == _shape(node)[d]:
            z = S.zero(v, d)
            S.set(node, d, z, torch.zeros(len(z)))


@transfer(aten.matmul, aten.bmm, aten.mm)
def _t_matmul(S: Status, node):
    a, b = node.args[:2]
    na, nb, no = len(_shape(a)), len(_shape(b)), len(_shape(node))
    if na < 2 or nb < 2:
        return
    S.set(node, -1, S.zero(b, -1), torch.zeros(_shape(node)[-1]))
    S.set(node, -2, S.zero(a, -2), torch.zeros(_shape(node)[-2]))
    for od in range(no - 2):
        z = torch.zeros(_shape(node)[od], dtype=torch.bool)
        for t, nt in ((a, na), (b, nb)):
            d = od - (no - nt)
            if 0 <= d < nt - 2 and _shape(t)[d] == _shape(node)[od]:
                z |= S.zero(t, d)
        S.set(node, od, z, torch.zeros(len(z)))


@transfer(aten.mean, aten.amax, aten.amin, aten.sum)
def _t_reduce(S: Status, node):
    x = node.args[0]
    n = len(_shape(x))
    dims = node.args[1] if len(node.args) > 1 else None
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = {d % n for d in dims}
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    count = math.prod(_shape(x)[d] for d in dims)
    od = 0
    for d in range(n):
        if d in dims:
            od += 1 if keep else 0
            continue
        st = S.get(x, d)
        if st is not None:
            mask, val = st
            if node.target.overloadpacket is aten.sum:
                val = val * count
            S.set(node, od, mask, val)
        od += 1


@transfer(aten.adaptive_avg_pool2d, aten.adaptive_avg_pool1d, aten.max_pool2d, aten.max_pool1d,
          aten.avg_pool2d, aten.avg_pool1d)
def _t_pool(S: Status, node):
    x = node.args[0]
    lead = len(_shape(x)) - (1 if "1d" in ir._op_name(node.target) else 2)
    zero_only = node.target.overloadpacket in (aten.avg_pool2d, aten.avg_pool1d)
    for d in range(lead):
        st = S.get(x, d)
        if st is not None:
            mask, val = st
            if zero_only:
                mask = mask & (val == 0)
            S.set(node, d, mask, val)


@transfer(aten.embedding)
def _t_embedding(S: Status, node):
    w = node.args[0]
    st = S.get(w, 1)
    if st is not None:
        S.set(node, -1, *st)


@transfer(aten.expand.default)
def _t_expand(S: Status, node):
    x = node.args[0]
    xs, os = _shape(x), _shape(node)
    for od in range(len(os)):
        d = od - (len(os) - len(xs))
        if d >= 0 and xs[d] == os[od]:
            st = S.get(x, d)
            if st is not None:
                S.set(node, od, *st)


def compute_status(gm) -> Status:
    S = Status(gm)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = ir.get_constant(gm, node)
            if isinstance(value, torch.Tensor) and _shape(node) is not None:
                for d, (m, v) in _marginals(value).items():
                    S.set(node, d, m, v)
        elif node.op == "call_function":
            fn = _transfer_for(node.target)
            if fn is not None and _shape(node) is not None or node.target is operator.getitem:
                try:
                    fn(S, node) if fn is not None else None
                except Exception:  # a transfer that cannot say anything says nothing
                    pass
    return S


# ---------------------------------------------------------------------------------------------
# Deciding what is dead
# ---------------------------------------------------------------------------------------------

def _coord(composite, group):
    """For each channel of `composite`, the coordinate of `group` in it (None if not a factor)."""
    if composite is group:
        return torch.arange(group.size)
    if not composite.factors:
        return None
    sizes = [f.size for f in composite.factors]
    for j, f in enumerate(composite.factors):
        sub = _coord(f, group)
        if sub is None:
            continue
        # coordinate along factor j of every flat position (row-major), then inside that factor
        stride = math.prod(sizes[j + 1:])
        along = (torch.arange(composite.size) // stride) % sizes[j]
        return sub[along]
    return None


def _conv_foldable(node):
    return node.target in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default) and _conv_groups(node) == 1


def _foldable(site) -> bool:
    """A constant input channel can be folded into this consumer's bias (or a constant map)."""
    if site.kind not in ("linear", "conv") or site.b is None:
        return False
    if site.kind == "conv" and not _conv_foldable(site.node):
        return False
    w = site.b[0]
    bias = site.node.args[2] if len(site.node.args) > 2 else None
    if w.op != "get_attr" or len(w.users) != 1:
        return False  # a shared weight: zeroing its column would change the other user
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr" and len(bias.users) == 1):
        return False
    return True


def decide(dg, S: Status, group):
    """(removable mask over the group's channels, folds [(site, positions, values)])."""
    removable = torch.ones(group.size, dtype=torch.bool)
    folds = []
    any_site = False
    for site in group.all_sites():
        x, d = site.a
        for s, e, c in dg.segments_of(x, d):
            coord = _coord(c, group)
            if coord is None:
                continue
            any_site = True
            za = S.zero(x, d)[s:e]
            vanish = za.clone()
            if site.b is not None:
                vanish |= S.zero(site.b[0], site.b[1])[s:e]
            ok = vanish.clone()
            fold = torch.zeros_like(ok)
            if _foldable(site):
                mask, val = S.const(x, d)
                fold = mask[s:e] & ~vanish
                ok |= fold
            per = torch.ones(group.size, dtype=torch.long)
            per.scatter_reduce_(0, coord, ok.long(), reduce="amin")
            removable &= per.bool()
            if bool(fold.any()):
                folds.append((site, s, e, coord, fold, S.const(x, d)[1][s:e]))
    if not any_site:
        removable[:] = False
    return removable, folds


def _bias_of(gm, node, index, length, dtype, device):
    bias = node.args[index] if len(node.args) > index else None
    if isinstance(bias, fx.Node):
        return bias, ir.get_constant(gm, bias).detach().clone()
    return None, torch.zeros(length, dtype=dtype, device=device)


def apply_folds(gm, folds_by_site) -> int:
    """Fold constant channels into their consumers' biases; zero the consumer columns."""
    count = 0
    for site, positions in folds_by_site.items():
        node = site.node
        x, d = site.a
        w_node = site.b[0]
        w = ir.get_constant(gm, w_node).detach().clone()
        pos = torch.tensor(sorted(positions), dtype=torch.long)
        vals = torch.stack([positions[p] for p in sorted(positions)]).to(torch.float64)
        if site.kind == "linear":
            pos_d = pos.to(w.device)
            delta = (w[:, pos_d].double() * vals.to(w.device)).sum(dim=1)
            w[:, pos_d] = 0
            bias_node, bias = _bias_of(gm, node, 2, w.shape[0], w.dtype, w.device)
            bias = (bias.double() + delta.to(bias.device)).to(w.dtype)
            _set_bias(gm, node, 2, bias_node, bias, w_node)
        else:  # conv, groups == 1
            xs = _shape(x)
            const_in = torch.zeros((1,) + tuple(xs[1:]), dtype=torch.float64)
            const_in[0, pos] = vals.reshape(-1, *([1] * (len(xs) - 2)))
            args = list(node.args) + [None] * (7 - len(node.args))
            nsp = len(xs) - 2
            stride = args[3] if args[3] is not None else [1] * nsp
            padding = args[4] if args[4] is not None else [0] * nsp
            dilation = args[5] if args[5] is not None else [1] * nsp
            contrib = node.target(const_in, w.double().cpu(), None, stride, padding, dilation, 1)
            w[:, pos.to(w.device)] = 0
            flat = contrib[0].reshape(contrib.shape[1], -1)
            bias_node, bias = _bias_of(gm, node, 2, w.shape[0], w.dtype, w.device)
            if bool((flat == flat[:, :1]).all()):
                bias = (bias.double() + flat[:, 0].to(bias.device)).to(w.dtype)
                _set_bias(gm, node, 2, bias_node, bias, w_node)
            else:  # padding makes the contribution vary near the borders: add it as a constant map
                cmap = contrib.to(w.dtype).to(w.device)
                const = ir.add_constant(gm, cmap, ir.display_name(w_node) + ".folded_map")
                with gm.graph.inserting_after(node):
                    add = gm.graph.call_function(aten.add.Tensor, (node, const))
                node.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
        ir.set_constant(gm, w_node, w)
        count += len(pos)
    return count


def _set_bias(gm, node, index, bias_node, bias, w_node):
    if bias_node is not None:
        ir.set_constant(gm, bias_node, bias)
        return
    name = ir.display_name(w_node).rsplit(".", 1)[0] + ".bias"
    new = ir.add_constant(gm, bias, name)
    args = list(node.args)
    while len(args) <= index:
        args.append(None)
    args[index] = new
    node.args = tuple(args)


MAX_FOLD_ROUNDS = 8  # each round folds one more layer of constant channels; real models need 1-2


def _keep_one(removable: torch.Tensor) -> torch.Tensor:
    """A group keeps at least one channel (zero-size tensors are not worth the risk in every op)."""
    if removable.all():
        removable = removable.clone()
        removable[0] = False
    return removable


def _pending_folds(decisions) -> dict:
    """{site: {input position: constant value}} for every removable channel that needs a fold."""
    folds_by_site: dict = {}
    for g, (removable, folds) in decisions.items():
        removable = _keep_one(removable)
        for site, s, e, coord, fold, vals in folds:
            take = fold & removable[coord]
            for j in torch.nonzero(take).flatten().tolist():
                folds_by_site.setdefault(site, {})[s + j] = vals[j]
    return folds_by_site


def _fold_positions(group, folds) -> torch.Tensor:
    """The channels of `group` that are removable only through one of `folds`."""
    needs = torch.zeros(group.size, dtype=torch.bool)
    for _site, _s, _e, coord, fold, _vals in folds:
        needs[coord[fold]] = True
    return needs


def plan(gm):
    dg = build_dim_groups(gm)
    S = compute_status(gm)
    return dg, {g: decide(dg, S, g) for g in dg.sliceable_groups()}


@register_pass("channel-slice", "Remove dead channels (and whole attention heads) across dimension groups, exactly")
def channel_slice(gm, ctx):
    try:
        dg, decisions = plan(gm)
    except Exception as exc:  # never fail a model: an analysis that cannot follow the graph slices nothing
        ctx.note("__notes__", notes=ctx.layer_notes.get("__notes__", {}).get("notes", []) + [
            f"channel-slice: dimension analysis failed ({type(exc).__name__}: {exc}); nothing sliced"])
        return PassResult(changed=False, stats={"error": f"{type(exc).__name__}: {exc}"})
    # 1. fold constant channels of removable indices into their consumers. A fold can make more
    # channels constant (a consumer whose remaining columns are all zero now outputs its new bias),
    # so fold until nothing is left to fold: the plan that slices must have no fold pending.
    folded = 0
    for _ in range(MAX_FOLD_ROUNDS):
        folds_by_site = _pending_folds(decisions)
        if not folds_by_site:
            break
        folded += apply_folds(gm, folds_by_site)
        gm.graph.lint()
        gm.recompile()
        ir.refresh_shapes(gm, ctx.example_inputs)
        dg, decisions = plan(gm)
    else:  # still folding: slice only what is dead without a fold
        decisions = {g: (removable & ~_fold_positions(g, folds), []) for g, (removable, folds) in decisions.items()}
    # 2. slice
    selections = {}
    group_rows = []
    removed_total = 0
    for g in dg.channel_groups():
        held = g.constants or [c for a in g.ancestors() for c in a.constants]  # a factor: its composites' constants
        row = {"group": g.id, "size": g.size, "constants": sorted({ir.display_name(n) for n, _, _, _ in held})[:6],
               "factor_of": [a.id for a in g.parents],
               "sliceable": g.sliceable, "permutable": g.permutable, "blocked_by": list(g.blocked_by)}
        after = g.size
        if g in decisions:
            removable = _keep_one(decisions[g][0])
            if removable.any():
                keep = torch.nonzero(~removable).flatten()
                selections[g] = keep
                after = len(keep)
                removed_total += g.size - after
        row["after"] = after
        group_rows.append(row)
    changed_consts = []
    if selections:
        changed_consts = dg.apply(gm, selections)
    ctx.note("__groups__", groups=group_rows)
    notes = list(ctx.layer_notes.get("__notes__", {}).get("notes", []))
    for row in group_rows:
        names = ", ".join(row["constants"][:3]) + (", ..." if len(row["constants"]) > 3 else "")
        if row["after"] != row["size"]:
            unit = "heads/blocks" if row["factor_of"] else "channels"
            notes.append(f"channel-slice: G{row['group']} {row['size']} -> {row['after']} {unit} ({names})")
        elif not row["sliceable"] and row["constants"]:
            notes.append(f"channel-slice: G{row['group']} ({names}) not sliceable: {'; '.join(row['blocked_by'][:2])}")
    ctx.note("__notes__", notes=notes)
    for name in changed_consts:
        ctx.note(name, channel_slice="sliced")
    # whole units of a reshaped dim (attention heads, conv groups): leading factors of a composite
    heads = sum(g.size - len(k) for g, k in selections.items() if any(p.factors[0] is g for p in g.parents))
    stats = {
        "groups": len(group_rows),
        "sliceable": sum(1 for r in group_rows if r["sliceable"]),
        "sliced_groups": len(selections),
        "channels_removed": removed_total,
        "folded_channels": folded,
        "heads_removed": heads,
        "constants_sliced": len(changed_consts),
    }
    return PassResult(changed=bool(selections) or bool(folded), stats=stats)
