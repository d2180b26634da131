"""Small real architectures, defined here so the demo, tests and benchmarks need no downloads.

Each builder takes its sizes as arguments (tests use tiny ones, benchmarks real ones) and returns
an `nn.Module` in eval mode. `example_inputs(name, ...)` gives matching random inputs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


class LlamaAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, self.heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        # a branch, not is_causal=s > 1: with a symbolic length (torch.compile(dynamic=True)) that is a
        # SymBool, which SDPA does not take (a graph break); a branch makes it a guard on the length
        causal = True if s > 1 else False  # noqa: SIM210
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden)
        self.self_attn = LlamaAttention(hidden, heads)
        self.post_attention_layernorm = RMSNorm(hidden)
        self.mlp = SwiGLU(hidden, intermediate)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaStack(nn.Module):
    """LLaMA-style decoder: RMSNorm, q/k/v/o attention with SDPA, SwiGLU FFN, residuals."""

    def __init__(self, hidden: int = 256, heads: int = 4, intermediate: int = 688, layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(LlamaBlock(hidden, heads, intermediate) for _ in range(layers))
        self.norm = RMSNorm(hidden)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class GPT2Block(nn.Module):
    """GPT-2-style block: LayerNorm, fused qkv linear split into q, k, v, GELU MLP."""

    def __init__(self, hidden: int = 128, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(hidden)
        self.c_attn = nn.Linear(hidden, 3 * hidden)
        self.c_proj = nn.Linear(hidden, hidden)
        self.ln_2 = nn.LayerNorm(hidden)
        self.c_fc = nn.Linear(hidden, 4 * hidden)
        self.mlp_proj = nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(h, dim=2)
        q, k, v = (t.view(b, s, self.heads, h // self.heads).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h)
        x = x + self.c_proj(attn)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class BertLayer(nn.Module):
    """BERT-style encoder layer: attention written as matmul + softmax, post-LayerNorm, GELU FFN."""

    def __init__(self, hidden: int = 128, heads: int = 4, intermediate: int = 512):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden)
        self.intermediate = nn.Linear(hidden, intermediate)
        self.output = nn.Linear(intermediate, hidden)
        self.out_norm = nn.LayerNorm(hidden)

    def forward(self, x):
        b, s, h = x.shape
        d = h // self.heads
        q, k, v = (p(x).view(b, s, self.heads, d).transpose(1, 2) for p in (self.query, self.key, self.value))
        scores = torch.matmul(q, k.transpose(-1, -2)) / d**0.5
        ctx = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(b, s, h)
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.out_norm(x + self.output(F.gelu(self.intermediate(x))))


class Bottleneck(nn.Module):
    """ResNet-50-style bottleneck: 1x1 -> 3x3 -> 1x1 with BN, residual (with downsample)."""

    def __init__(self, in_ch: int, mid: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNetStyle(nn.Module):
    """Bottleneck stages after a stem: a 3x3 convolution at full resolution (small test images), or
    with `imagenet_stem` ResNet-50's own (7x7 stride-2 convolution and 3x3 stride-2 max-pool, so that
    224x224 images reach the first stage at 56x56)."""

    def __init__(self, width: int = 16, blocks: tuple[int, ...] = (1, 1), num_classes: int = 10,
                 imagenet_stem: bool = False):
        super().__init__()
        if imagenet_stem:
            self.stem = nn.Sequential(nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, in_ch = [], width
        for stage, count in enumerate(blocks):
            mid = width * 2**stage
            for i in range(count):
                layers.append(Bottleneck(in_ch, mid, mid * 4, stride=2 if (i == 0 and stage > 0) else 1))
                in_ch = mid * 4
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2-style block: 1x1 expand, 3x3 depthwise, 1x1 project, residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, expand: int = 4, stride: int = 1):
        super().__init__()
        mid = in_ch * expand
        self.use_residual = stride == 1 and in_ch == out_ch
        self.block = nn.Sequential(
            nn.Conv2d(in_ch, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch),
        )

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2Style(nn.Module):
    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(width, width), InvertedResidual(width, 2 * width, stride=2),
                                    InvertedResidual(2 * width, 2 * width))
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


class MLP(nn.Module):
    """A small MLP (Linear-GELU-Linear-GELU-Linear): the quickest built-in, for CLI tests and examples."""

    def __init__(self, hidden: int = 128, intermediate: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, intermediate)
        self.fc3 = nn.Linear(intermediate, hidden)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


def randomize_batchnorm(model: nn.Module, seed: int = 0, shift: float = 0.1) -> nn.Module:
    """Give BN layers non-trivial statistics so tests would notice a wrongly folded channel (means and
    biases ~ N(0, shift), variances and scales in [0.5, 1.5))."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * shift)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * shift)
    return model


BUILDERS = {
    "mlp": lambda: MLP(),
    "llama": lambda: LlamaStack(),
    "gpt2": lambda: GPT2Block(),
    "bert": lambda: BertLayer(),
    "resnet": lambda: randomize_batchnorm(ResNetStyle()),
    "mobilenet": lambda: randomize_batchnorm(MobileNetV2Style()),
}


def build(name: str, seed: int = 0) -> nn.Module:
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(BUILDERS)}")
    torch.manual_seed(seed)
    return BUILDERS[name]().eval()


def example_inputs(name: str, batch: int = 2, seq: int = 8, image: int = 16) -> tuple[torch.Tensor, ...]:
    """Random inputs matching `build(name)` with default sizes."""
    hidden = {"llama": 256, "gpt2": 128, "bert": 128}
    if name == "mlp":
        return (torch.randn(batch * seq, 128),)
    if name in hidden:
        return (torch.randn(batch, seq, hidden[name]),)
    if name in ("resnet", "mobilenet"):
        return (torch.randn(batch, 3, image, image),)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(BUILDERS)}")
