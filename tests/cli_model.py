"""A small MLP whose zeros are already in its weights (no pruning hooks), with structure for every
pass to find: dead output channels in fc1, scattered 16x16 blocks in fc2, 2:4 in fc3.
Used by the CLI tests as the MODEL_SPEC `tests/cli_model.py:structured_mlp`."""

import torch

from sparsec.models import MLP


def structured_mlp():
    torch.manual_seed(0)
    model = MLP(hidden=128, intermediate=256).eval()
    with torch.no_grad():
        fc1, fc2, fc3 = model.fc1.weight, model.fc2.weight, model.fc3.weight
        fc1[torch.randperm(256)[:128]] = 0  # half the output channels dead
        blocks = (torch.rand(16, 16) < 0.25).repeat_interleave(16, 0).repeat_interleave(16, 1)
        fc2.mul_(blocks)  # 25% of the 16x16 blocks kept, scattered
        keep = torch.rand(128, 64, 4).argsort(dim=-1) < 2  # 2 of every 4 inputs, at random places
        fc3.mul_(keep.reshape(128, 256))  # 2:4 along the input dimension
    return model, (torch.randn(16, 128),)
