"""The float64 reference the kernel tests compare against: act(x @ W^T + bias) + residual.
"swiglu": silu(gate) * up over the two halves of x @ W^T + bias (W's rows are [gate; up])."""

import torch
import torch.nn.functional as F

ACTIVATIONS = {"none": lambda t: t, "relu": torch.relu, "gelu": F.gelu, "silu": F.silu,
               "swiglu": lambda t: F.silu(t.chunk(2, dim=-1)[0]) * t.chunk(2, dim=-1)[1]}


def linear64(x, weight, bias=None, activation="none", residual=None):
    y = x.double() @ weight.double().t()
    if bias is not None:
        y = y + bias.double()
    y = ACTIVATIONS[activation](y)
    if residual is not None:
        y = y + residual.double()
    return y
