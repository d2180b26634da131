"""conv-epilogue: BatchNorm folded into convolutions, conv+bias(+residual)+ReLU as one fused op.

The fused kernel is cuDNN's (CUDA only); on the CPU the pass is off by default, so these tests turn
it on for the CPU (`FUSE_ON`), where sparsec::conv2d_relu runs its reference: the graph rewrite and
its exactness are checked here, the cuDNN kernel in the GPU tests at the end.
"""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

import sparsec
from sparsec import ir, models
from sparsec.capture import capture_module
from sparsec.pass_manager import PassContext, output_close, run_pipeline
from sparsec.passes import conv_epilogue
from sparsec.runtime import reference
from compiled_check import assert_compiled_equals_eager

FUSED = torch.ops.sparsec.conv2d_relu.default
HAS_CUDNN = torch.cuda.is_available() and torch.backends.cudnn.is_available()


@pytest.fixture
def fuse_on_cpu(monkeypatch):
    monkeypatch.setattr(conv_epilogue, "FUSE_ON", ("cpu",))


def targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def run_with_context(model, x, passes="conv-epilogue", cuda_graphs=True, graph_changed=False):
    """(graph after, IR before, pass records, the pass context with its layer notes)."""
    captured = capture_module(model, (x,))
    before = ir.dump(captured.gm)
    ctx = PassContext(options=sparsec.Options(passes=passes, verify_each=True), example_inputs=captured.example_inputs,
                      cuda_graphs=cuda_graphs, graph_changed=graph_changed)
    records = run_pipeline(captured.gm, ctx)
    return captured.gm, before, records, ctx


def run(model, x, passes="conv-epilogue", cuda_graphs=True, graph_changed=False):
    return run_with_context(model, x, passes, cuda_graphs, graph_changed)[:3]


def test_bottleneck_ir_before_and_after(fuse_on_cpu, seeded):
    """conv1/conv2 -> BN -> ReLU become fused convolutions; conv3 -> BN -> add -> ReLU takes the
    downsample branch (its BN folded, no ReLU: a plain convolution) as its addend, and that
    convolution's folded bias joins conv3's."""
    block = models.randomize_batchnorm(models.Bottleneck(16, 8, 32, stride=2)).eval()
    x = torch.randn(2, 16, 9, 9)
    gm, before, records = run(block, x)
    after = ir.dump(gm)
    print(before, after, sep="\n")
    assert before.count("aten.batch_norm") == 4 and before.count("aten.relu") == 3
    assert "batch_norm" not in after and "aten.relu" not in after and "aten.add" not in after
    assert targets(gm).count(FUSED) == 3 and targets(gm).count(torch.ops.aten.conv2d.default) == 1
    assert records[0].stats == {"batch_norms_folded": 4, "fused": 3, "addend_biases_moved": 1}
    downsample = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    assert len(downsample.args) < 3 or downsample.args[2] is None
    fused = [n for n in gm.graph.nodes if n.target is FUSED]
    assert [n.args[3] is not None for n in fused] == [False, False, True]  # only conv3 adds a residual
    assert fused[1].args[4] == [2, 2] and fused[1].args[5] == [1, 1]  # conv2's stride and padding kept
    fresh = torch.randn_like(x)
    with torch.no_grad():
        ok, why = output_close(gm(fresh), block(fresh))
    assert ok, why


def test_without_cuda_graphs_batch_norm_is_folded_but_nothing_fused(fuse_on_cpu, seeded):
    """(graph_changed: as if an earlier pass, channel-slice say, had changed the graph)"""
    block = models.randomize_batchnorm(models.Bottleneck(16, 8, 16)).eval()
    x = torch.randn(2, 16, 8, 8)
    gm, _, records = run(block, x, cuda_graphs=False, graph_changed=True)
    assert records[0].stats["batch_norms_folded"] == 3 and records[0].stats["fused"] == 0
    assert "off without CUDA graphs" in records[0].stats["fusion"]
    assert FUSED not in targets(gm) and "batch_norm" not in ir.dump(gm)
    with torch.no_grad():
        assert output_close(gm(x), block(x))[0]


def test_a_dense_cnn_without_cuda_graphs_is_left_to_inductor(fuse_on_cpu, seeded):
    """Nothing sparse, no CUDA graphs: no pass changes the graph, so the backend hands Dynamo's graph
    to Inductor unchanged (folding alone is not worth leaving that path); under CUDA graphs the
    fused epilogues are worth it, dense or not."""
    model = models.randomize_batchnorm(models.ResNetStyle(8, (1,), 10)).eval()
    x = torch.randn(2, 3, 16, 16)
    _, _, records = run(model, x, passes=None, cuda_graphs=False)
    assert not any(r.changed for r in records), [(r.name, r.stats) for r in records]
    assert records[-1].stats["batch_norms_folded"] == 0
    assert "no other pass changed the graph" in records[-1].stats["folding"]
    _, _, records = run(model, x, passes=None, cuda_graphs=True)
    assert records[-1].changed and records[-1].stats["fused"] == 4  # the stem, conv1, conv2, conv3 (+ residual)


def test_off_on_devices_without_the_fused_kernel(seeded):
    block = models.randomize_batchnorm(models.Bottleneck(16, 8, 16)).eval()
    gm, before, records = run(block, torch.randn(2, 16, 8, 8))
    assert "aten.batch_norm" in before and ir.dump(gm).count("aten.batch_norm") == before.count("aten.batch_norm")
    assert FUSED not in targets(gm)
    assert records[0].stats == {"skipped": "no fused convolution kernel on ['cpu']"}


def test_only_an_eval_batch_norm_that_alone_reads_the_convolution_is_folded(fuse_on_cpu, seeded):
    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(self.bn(y)) + y  # the raw convolution output is needed too

    model = models.randomize_batchnorm(TwoReaders()).eval()
    x = torch.randn(2, 4, 6, 6)
    gm, _, records = run(model, x)
    assert records[0].stats == {"batch_norms_folded": 0, "fused": 0}
    with torch.no_grad():
        assert output_close(gm(x), model(x))[0]


def test_grouped_convolution_is_folded_but_not_fused(fuse_on_cpu, seeded):
    model = models.randomize_batchnorm(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16),
                                                     nn.ReLU())).eval()
    x = torch.randn(2, 8, 6, 6)
    gm, _, records = run(model, x)
    assert records[0].stats == {"batch_norms_folded": 1, "fused": 0}
    assert FUSED not in targets(gm) and torch.ops.aten.relu.default in targets(gm)
    with torch.no_grad():
        assert output_close(gm(x), model(x))[0]


def test_a_shape_cudnn_refuses_falls_back_and_is_not_tried_again(monkeypatch):
    """cuDNN finding no fused engine must not fail the model: the kernel declines (the op then runs its
    reference) and remembers the shape. Simulated with a fused call that raises."""
    from sparsec.codegen import cudnn

    calls = []

    def refuse(*args):
        calls.append(args)
        raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED")

    monkeypatch.setattr(torch.ops.aten, "cudnn_convolution_relu", refuse, raising=False)
    monkeypatch.setattr(cudnn, "_refused", set())
    args = (torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3), torch.randn(6), None, [1, 1], [1, 1], [1, 1], 1)
    assert cudnn.conv2d_relu_cudnn(*args) is NotImplemented
    assert cudnn.conv2d_relu_cudnn(*args) is NotImplemented
    assert len(calls) == 1  # the refused shape is remembered


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_real_cnns_through_the_full_pipeline_equal_eager(fuse_on_cpu, seeded, name):
    """A ResNet-style model with the ImageNet stem (7x7 conv, max-pool) and half of every bottleneck's
    inner channels dead, and a MobileNetV2-style one (ReLU6, depthwise convolutions: BatchNorm folded,
    no ReLU to fuse), through every pass, on fresh inputs."""
    if name == "resnet":
        model = models.randomize_batchnorm(models.ResNetStyle(32, (1, 1), 10, imagenet_stem=True))
        for block in model.modules():
            if isinstance(block, models.Bottleneck):
                for conv in (block.conv1, block.conv2):
                    prune.ln_structured(conv, "weight", amount=0.5, n=2, dim=0)
                    prune.remove(conv, "weight")
    else:
        model = models.randomize_batchnorm(models.MobileNetV2Style(8))
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    gm, _, records = run(model, x, passes=None)
    stats = records[-1].stats
    assert records[-1].name == "conv-epilogue" and stats["batch_norms_folded"] > 0
    assert "batch_norm" not in ir.dump(gm)
    if name == "resnet":
        # the stem, and conv1, conv2 (channel-slice's constant map as its addend) and conv3 (with the
        # downsample branch as its addend) of both bottlenecks; left: the two downsample convolutions
        assert stats["fused"] == 7 and stats["constant_map_bytes"] > 0
        assert targets(gm).count(torch.ops.aten.conv2d.default) == 2
        assert torch.ops.aten.add.Tensor not in targets(gm)
    else:
        assert stats["fused"] == 0
    with torch.no_grad():
        for _ in range(2):
            fresh = torch.randn_like(x)
            ok, why = output_close(gm(fresh), model(fresh))
            assert ok, why


def padded_conv_after_dead_constant_channels():
    """conv1 -> BN -> ReLU -> conv2 (3x3, padding 1) -> BN -> ReLU with half of conv1's rows zero: the
    dead channels are relu(bn(0)) constants, most non-zero, whose terms through conv2's zero padding
    differ at the borders (channel-slice folds them into a constant map after conv2)."""
    model = nn.Sequential(nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    model = models.randomize_batchnorm(model).eval()
    prune.ln_structured(model[0], "weight", amount=0.5, n=2, dim=0)
    prune.remove(model[0], "weight")
    return model.to(memory_format=torch.channels_last)


def test_a_constant_map_becomes_the_fused_calls_addend(fuse_on_cpu, seeded):
    """The map after the padded conv2, scaled by its BatchNorm's fold, is stored broadcast over the
    batch in the output's layout and added inside the fused call: no add is left."""
    model = padded_conv_after_dead_constant_channels()
    x = torch.randn(3, 8, 10, 10).to(memory_format=torch.channels_last)
    gm, before, records = run(model, x, passes="channel-slice,conv-epilogue")
    after = ir.dump(gm)
    print(before, after, sep="\n")
    assert records[0].stats["folded_channels"] > 0
    stats = records[1].stats
    assert stats["fused"] == 2 and stats["constant_map_bytes"] == 3 * 16 * 10 * 10 * 4
    assert "aten.add" not in after and "aten.relu" not in after
    fused = [n for n in gm.graph.nodes if n.target is FUSED]
    addend = ir.get_constant(gm, fused[1].args[3])
    assert addend.shape == (3, 16, 10, 10) and addend.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(addend[0, :, 0, 0], addend[0, :, 5, 5])  # borders differ from the interior
    with torch.no_grad():
        for _ in range(2):
            fresh = torch.randn_like(x)
            ok, why = output_close(gm(fresh), model(fresh))
            assert ok, why


def test_constant_maps_past_the_cap_stay_with_inductor(fuse_on_cpu, seeded, monkeypatch):
    """A cap on stored maps one byte short of conv2's map: conv2's add and ReLU stay unfused (conv1
    still fuses), the report says why, and the graph still equals eager."""
    from sparsec.passes import conv_epilogue
    monkeypatch.setattr(conv_epilogue, "MAX_CONSTANT_MAP_BYTES", 3 * 16 * 10 * 10 * 4 - 1)
    model = padded_conv_after_dead_constant_channels()
    x = torch.randn(3, 8, 10, 10).to(memory_format=torch.channels_last)
    gm, _, records, ctx = run_with_context(model, x, passes="channel-slice,conv-epilogue")
    stats = records[1].stats
    assert stats["fused"] == 1 and "constant_map_bytes" not in stats
    assert "aten.add" in ir.dump(gm)
    reasons = [notes.get("epilogue_reason", "") for notes in ctx.layer_notes.values()]
    assert any("stored maps past" in reason for reason in reasons), ctx.layer_notes
    with torch.no_grad():
        fresh = torch.randn_like(x)
        ok, why = output_close(gm(fresh), model(fresh))
        assert ok, why


def test_a_constant_map_with_a_dynamic_batch_stays_with_inductor(fuse_on_cpu, seeded, fresh_dynamo):
    """A symbolic batch size has no stored map to match it: the add and ReLU after conv2 stay
    unfused, and the compiled model still equals eager at every batch size. (Dynamo first passes
    the BatchNorms' eps as symbolic scalars; the backend leaves that graph to Inductor, which has
    Dynamo trace again with them specialized: one graph reaches sparsec's passes.)"""
    model = padded_conv_after_dead_constant_channels()
    compiled = torch.compile(model, backend="sparsec", mode="reduce-overhead", dynamic=True)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        for batch in (2, 5):
            x = torch.randn(batch, 8, 10, 10).to(memory_format=torch.channels_last)
            ok, why = output_close(compiled(x), model(x))
            assert ok, why
    assert not [w for w in caught if "sparsec could not compile" in str(w.message)]
    graphs = sparsec.backend.compiled_graphs()
    assert [type(g).__name__ for g in graphs] == ["CompiledVariants"]
    report = graphs[-1].report
    notes = " ".join(str(row) for row in report.layers)
    assert "constant map after it with a symbolic batch size" in notes, report


def test_torch_compile_with_the_fused_op_equals_eager(fuse_on_cpu, seeded, fresh_dynamo):
    model = models.randomize_batchnorm(models.ResNetStyle(8, (1,), 10)).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    assert_compiled_equals_eager(model, x, "reduce-overhead", calls=2)  # (no CUDA graphs on the CPU)
    report = sparsec.backend.compiled_graphs()[-1].report
    assert any(str(row.get("kernel", "")).startswith("cudnn") for row in report.layers), report


@pytest.mark.parametrize("channels_last", [False, True])
def test_fake_output_has_the_reference_layout(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 4, 7, 7).contiguous(memory_format=fmt)
    w = torch.randn(6, 4, 3, 3).contiguous(memory_format=fmt)
    args = (x, w, None, None, [2, 2], [1, 1], [1, 1], 1)
    real = torch.ops.sparsec.conv2d_relu(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.ops.sparsec.conv2d_relu(*args)
    assert fake.shape == real.shape == (2, 6, 4, 4)
    assert fake.stride() == real.stride()
    assert torch.equal(real, torch.relu(torch.nn.functional.conv2d(x, w, None, 2, 1)))


gpu = pytest.mark.skipif(not HAS_CUDNN, reason="needs CUDA with cuDNN (run with the device tool)")


@gpu
@pytest.mark.parametrize("addend", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cudnn_kernel_matches_the_reference_on_the_gpu(addend, dtype):
    from sparsec.codegen import cudnn

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 14, 14, generator=g).to("cuda", dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(128, 64, 3, 3, generator=g) / 24).to("cuda", dtype).contiguous(memory_format=torch.channels_last)
    b = torch.randn(128, generator=g).to("cuda", dtype)
    z = torch.randn(4, 128, 7, 7, generator=g).to("cuda", dtype).contiguous(memory_format=torch.channels_last) \
        if addend else None
    args = (x, w, b, z, [2, 2], [1, 1], [1, 1], 1)
    out = cudnn.conv2d_relu_cudnn(*args)
    assert out is not NotImplemented, "cuDNN refused the fused convolution"
    expected = reference.conv2d_relu_ref(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
    assert out.stride() == expected.contiguous(memory_format=torch.channels_last).stride()
    err = (out.double() - expected).norm() / expected.norm()
    assert err < (1e-2 if dtype != torch.float32 else 1e-3), err


@gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_resnet_on_the_gpu_equals_eager(mode, fresh_dynamo):
    """Half of every bottleneck's inner channels dead, bf16, channels_last: the default pipeline on
    CUDA folds every BatchNorm, and under CUDA graphs fuses the ReLU epilogues."""
    torch.manual_seed(0)
    model = models.randomize_batchnorm(models.ResNetStyle(16, (1, 1), 10, imagenet_stem=True))
    for block in model.modules():
        if isinstance(block, models.Bottleneck):
            prune.ln_structured(block.conv1, "weight", amount=0.5, n=2, dim=0)
            prune.remove(block.conv1, "weight")
    model = model.eval().to("cuda", torch.bfloat16).to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 64, 64, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    assert_compiled_equals_eager(model, x, mode)
    report = sparsec.backend.compiled_graphs()[-1].report
    kernels = [str(row.get("kernel", "")) for row in report.layers]
    fused = sum(kernel.startswith("cudnn") for kernel in kernels)
    assert fused >= 5 if mode else fused == 0, report
    # conv2 after conv1's dead constant channels: channel-slice's map is the fused call's addend
    assert any("constant map" in kernel for kernel in kernels) == bool(mode), report
