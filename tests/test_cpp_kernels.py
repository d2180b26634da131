"""C++ CPU kernels (issue 6): BSR / CSR sparse linear against a float64 reference.

The library is compiled once into a fresh cache dir for this session (a few seconds), then a
second process must load it from the cache without invoking the compiler.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from sparsec.codegen.cpp import build
from sparsec.runtime.formats import csr_to_dense, pack_bsr, pack_csr
from float64_reference import linear64

HAVE_CXX = build.compiler_available()
pytestmark = pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler (c++ / $CXX) on PATH")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cache = tmp_path_factory.mktemp("sparsec_cache")
    old = os.environ.get("SPARSEC_CACHE_DIR")
    os.environ["SPARSEC_CACHE_DIR"] = str(cache)
    build.reset_loaded()
    try:
        lib = build.load_kernels()
        if lib is None:
            pytest.fail("a C++ compiler is here but the kernels failed to build (see the sparsec.codegen.cpp warning)")
        yield lib
    finally:
        build.reset_loaded()  # the next use loads the library of the default cache
        if old is None:
            os.environ.pop("SPARSEC_CACHE_DIR", None)
        else:
            os.environ["SPARSEC_CACHE_DIR"] = old


def _block_sparse(n, k, bh, bw, density, gen, empty_rows=False):
    nb, kb = -(-n // bh), -(-k // bw)
    bm = torch.rand(nb, kb, generator=gen) < density
    if empty_rows and nb > 1:
        bm[nb // 2] = False
        bm[0] = False
    mask = bm.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k]
    return torch.randn(n, k, generator=gen, dtype=torch.float64) * mask


def _close(y, ref, dtype):
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    scale = ref.abs().max().item() + 1.0
    err = (y.double() - ref).abs().max().item()
    assert err <= tol * scale, f"max err {err:.3g} vs scale {scale:.3g}"


def _bsr(x, w, bias=None, act="none", residual=None):
    from sparsec.codegen.cpp import bsr_linear_cpu
    n, k = w.shape
    out = bsr_linear_cpu(x, w.values, w.col_indices, w.row_offsets, n, k, bias, act, residual,
                         w.row_perm, w.col_perm)
    assert out is not NotImplemented
    return out


# ------------------------------------------------------------------------------ BSR
@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 64), (8, 16), (4, 4), (1, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bsr_shapes_blocks_dtypes(lib, block, dtype):
    gen = torch.Generator().manual_seed(hash(block) % 1000)
    n, k = 2 * block[0] + 5, 3 * block[1] + 7           # not block multiples
    wd = _block_sparse(n, k, *block, 0.5, gen, empty_rows=True).to(dtype)
    w = pack_bsr(wd, block)
    for m in (1, 3, 33):
        x = torch.randn(m, k, generator=gen).to(dtype)
        _close(_bsr(x, w), linear64(x, wd, None, "none", None), dtype)


@pytest.mark.parametrize("act", ["none", "relu", "gelu", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bsr_epilogue_perm(lib, act, dtype):
    gen = torch.Generator().manual_seed(7)
    n, k, blk = 100, 90, (32, 32)
    wd = _block_sparse(n, k, *blk, 0.4, gen).to(dtype)
    rp, cp = torch.randperm(n, generator=gen), torch.randperm(k, generator=gen)
    w = pack_bsr(wd, blk, row_perm=rp, col_perm=cp)
    bias = torch.randn(n, generator=gen).to(dtype)
    for m in (1, 3, 33):
        x = torch.randn(m, k, generator=gen).to(dtype)
        res = torch.randn(m, n, generator=gen).to(dtype)
        _close(_bsr(x, w, bias, act, res), linear64(x, wd, bias, act, res), dtype)
        _close(_bsr(x, w, None, act, None), linear64(x, wd, None, act, None), dtype)


@pytest.mark.parametrize("perm", ["row", "col", "both"])
def test_bsr_single_perms(lib, perm):
    gen = torch.Generator().manual_seed(11)
    n, k = 70, 50
    wd = _block_sparse(n, k, 16, 16, 0.5, gen).float()
    rp = torch.randperm(n, generator=gen) if perm in ("row", "both") else None
    cp = torch.randperm(k, generator=gen) if perm in ("col", "both") else None
    w = pack_bsr(wd, (16, 16), row_perm=rp, col_perm=cp)
    bias = torch.randn(n, generator=gen)
    for m in (1, 6, 40):
        x = torch.randn(m, k, generator=gen)
        _close(_bsr(x, w, bias, "relu"), linear64(x, wd, bias, "relu", None), torch.float32)


@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 1.0])
def test_bsr_densities(lib, density):
    gen = torch.Generator().manual_seed(3)
    n, k = 96, 160
    wd = _block_sparse(n, k, 32, 32, density, gen, empty_rows=density < 1).float()
    w = pack_bsr(wd, (32, 32))
    if density == 0.0:
        assert w.values.shape[0] == 0
    bias = torch.randn(n, generator=gen)
    for m in (1, 3, 33, 100):
        x = torch.randn(m, k, generator=gen)
        _close(_bsr(x, w, bias, "silu"), linear64(x, wd, bias, "silu", None), torch.float32)


def test_bsr_3d_input_and_residual_broadcast(lib):
    gen = torch.Generator().manual_seed(5)
    n, k = 64, 96
    wd = _block_sparse(n, k, 16, 16, 0.5, gen).float()
    w = pack_bsr(wd, (16, 16))
    x = torch.randn(2, 17, k, generator=gen)
    res = torch.randn(2, 17, n, generator=gen)
    y = _bsr(x, w, None, "gelu", res)
    assert y.shape == (2, 17, n)
    _close(y, linear64(x, wd, None, "gelu", res), torch.float32)
    xt = torch.randn(k, 5, generator=gen).t()                    # non-contiguous input
    _close(_bsr(xt, w), linear64(xt, wd, None, "none", None), torch.float32)


def test_bsr_bf16_fp32_residual(lib):
    gen = torch.Generator().manual_seed(9)
    wd = _block_sparse(64, 64, 32, 32, 0.5, gen).bfloat16()
    w = pack_bsr(wd, (32, 32))
    x = torch.randn(4, 64, generator=gen).bfloat16()
    res = torch.randn(4, 64, generator=gen)                      # fp32 residual
    y = _bsr(x, w, None, "none", res)
    assert y.dtype == torch.bfloat16
    _close(y, linear64(x, wd, None, "none", res), torch.bfloat16)


def test_bsr_through_custom_op(lib):
    """register_all() makes sparsec::bsr_linear use the C++ kernel on CPU."""
    from sparsec.codegen.cpp import bsr_linear_cpu, register_all
    from sparsec.runtime import ops
    register_all()
    assert bsr_linear_cpu in ops.get_kernels("bsr_linear", "cpu")
    gen = torch.Generator().manual_seed(1)
    wd = _block_sparse(80, 48, 16, 16, 0.5, gen).float()
    w = pack_bsr(wd, (16, 16), row_perm=torch.randperm(80, generator=gen))
    x = torch.randn(7, 48, generator=gen)
    bias = torch.randn(80, generator=gen)
    _close(ops.bsr_linear(x, w, bias, "relu"), linear64(x, wd, bias, "relu", None), torch.float32)
    compiled = torch.compile(lambda t: ops.bsr_linear(t, w, bias, "relu"), backend="eager",
                             fullgraph=True)
    _close(compiled(x), linear64(x, wd, bias, "relu", None), torch.float32)


# ------------------------------------------------------------------------------ CSR
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
def test_csr(lib, dtype, density, index_dtype):
    from sparsec.runtime.ops import csr_linear
    gen = torch.Generator().manual_seed(13)
    n, k = 75, 130
    wd = (torch.randn(n, k, generator=gen, dtype=torch.float64)
          * (torch.rand(n, k, generator=gen) < density))
    wd[5] = 0                                                     # empty row
    wd = wd.to(dtype)
    w = pack_csr(wd, index_dtype)
    assert torch.equal(w.to_dense(), wd)
    bias = torch.randn(n, generator=gen).to(dtype)
    for m in (1, 3, 33):
        x = torch.randn(m, k, generator=gen).to(dtype)
        res = torch.randn(m, n, generator=gen).to(dtype)
        for act in ("none", "gelu"):
            _close(csr_linear(x, w, bias, act, res), linear64(x, wd, bias, act, res), dtype)
    x3 = torch.randn(2, 3, k, generator=gen).to(dtype)
    _close(csr_linear(x3, w), linear64(x3, wd, None, "none", None), dtype)


def test_csr_uint16_indices_wide(lib):
    """K > 32768: int16 storage is read as unsigned."""
    from sparsec.runtime.ops import csr_linear
    gen = torch.Generator().manual_seed(17)
    n, k = 8, 40000
    wd = torch.randn(n, k, generator=gen) * (torch.rand(n, k, generator=gen) < 0.01)
    wd[:, -1] = 1.0
    w = pack_csr(wd)
    assert w.col_indices.dtype == torch.int16
    assert torch.equal(csr_to_dense(w.values, w.col_indices, w.row_offsets, n, k), wd)
    x = torch.randn(5, k, generator=gen)
    _close(csr_linear(x, w), linear64(x, wd, None, "none", None), torch.float32)


def test_csr_fake_and_compile(lib):
    from sparsec.runtime.ops import csr_linear
    gen = torch.Generator().manual_seed(19)
    wd = torch.randn(32, 40, generator=gen) * (torch.rand(32, 40, generator=gen) < 0.3)
    w = pack_csr(wd)
    x = torch.randn(6, 40, generator=gen)
    fn = torch.compile(lambda t: csr_linear(t, w, None, "relu"), backend="eager", fullgraph=True)
    _close(fn(x), linear64(x, wd, None, "relu", None), torch.float32)


# ------------------------------------------------------------------------------ bitmap
@pytest.mark.parametrize("tile_rows", [16, 8, 32, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitmap(lib, tile_rows, dtype):
    """sparsec::bitmap_linear's CPU kernel (runtime.formats.BitmapWeight)."""
    from sparsec.codegen.cpp import bitmap_linear_cpu
    from sparsec.runtime.formats import pack_bitmap
    gen = torch.Generator().manual_seed(29 + tile_rows)
    n, k = 45, 150                                               # not tile multiples
    for density in (0.0, 0.1, 0.6, 1.0):
        wd = (torch.randn(n, k, generator=gen, dtype=torch.float64)
              * (torch.rand(n, k, generator=gen) < density)).to(dtype)
        wd[3] = 0
        rp, cp = torch.randperm(n, generator=gen), torch.randperm(k, generator=gen)
        w = pack_bitmap(wd, tile_rows, row_perm=rp, col_perm=cp)
        bias = torch.randn(n, generator=gen).to(dtype)
        for m in (1, 3, 33):
            x = torch.randn(m, k, generator=gen).to(dtype)
            res = torch.randn(m, n, generator=gen).to(dtype)
            for act in ("none", "silu"):
                y = bitmap_linear_cpu(x, w.values, w.bitmap, w.tile_offsets, n, k, tile_rows,
                                      bias, act, res, w.row_perm, w.col_perm)
                _close(y, linear64(x, wd, bias, act, res), dtype)


def test_bitmap_through_custom_op(lib):
    from sparsec.codegen.cpp import bitmap_linear_cpu, register_all
    from sparsec.runtime import ops
    from sparsec.runtime.formats import pack_bitmap
    register_all()
    assert bitmap_linear_cpu in ops.get_kernels("bitmap_linear", "cpu")
    gen = torch.Generator().manual_seed(31)
    wd = torch.randn(64, 128, generator=gen) * (torch.rand(64, 128, generator=gen) < 0.2)
    w = pack_bitmap(wd)
    x = torch.randn(2, 5, 128, generator=gen)
    _close(ops.bitmap_linear(x, w, None, "gelu"), linear64(x, wd, None, "gelu", None), torch.float32)


# ------------------------------------------------------------------------------ baked
def test_specialized_small_layer(lib):
    """A small layer's pattern baked into its own kernel; over the size limit: None."""
    from sparsec.codegen.cpp import specialize_bsr
    gen = torch.Generator().manual_seed(37)
    n, k = 72, 100
    wd = _block_sparse(n, k, 16, 16, 0.4, gen, empty_rows=True).float()
    w = pack_bsr(wd, (16, 16), row_perm=torch.randperm(n, generator=gen),
                 col_perm=torch.randperm(k, generator=gen))
    assert specialize_bsr(w, max_blocks=w.values.shape[0] - 1) is None
    sp = specialize_bsr(w)
    assert sp is not None and sp.compile_seconds > 0
    bias = torch.randn(n, generator=gen)
    for m in (1, 3, 33):
        x = torch.randn(m, k, generator=gen)
        _close(sp(x, bias, "gelu"), linear64(x, wd, bias, "gelu", None), torch.float32)
    w2 = torch.randn(w.values.shape, generator=gen)               # same pattern, new values
    x = torch.randn(4, k, generator=gen)
    wd2 = type(w)(w2, w.col_indices, w.row_offsets, w.shape, w.block, w.row_perm,
                  w.col_perm).to_dense()
    _close(sp(x, values=w2), linear64(x, wd2, None, "none", None), torch.float32)
    assert specialize_bsr(w).lib.cached                          # second time: from the cache


# ------------------------------------------------------------------------------ build/cache
def test_cache_hit_in_second_process(lib):
    """A second process loads the library from the disk cache: no compiler, no ninja."""
    so_mtime = os.path.getmtime(lib.path)
    assert not lib.cached and lib.compile_seconds > 0
    code = textwrap.dedent("""
        import json, time
        t0 = time.perf_counter()
        import torch
        import torch.utils.cpp_extension as ce
        def _no(*a, **k):
            raise AssertionError("compiler invoked on a cache hit")
        ce.load = ce.load_inline = ce._jit_compile = ce._write_ninja_file_and_build_library = _no
        import subprocess
        subprocess.Popen = _no   # nothing may spawn a compiler (or ninja)
        from sparsec.codegen.cpp import build
        t1 = time.perf_counter()
        lib = build.load_kernels()
        t2 = time.perf_counter()
        print(json.dumps({"cached": lib.cached, "path": lib.path, "stats": build.stats,
                          "load_s": t2 - t1, "compile_s": lib.compile_seconds}))
    """)
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["cached"] is True
    assert info["path"] == lib.path
    assert info["stats"]["compiles"] == 0 and info["stats"]["cache_hits"] == 1
    assert info["load_s"] < 1.0
    assert info["compile_s"] == pytest.approx(lib.compile_seconds, abs=1e-2)
    assert os.path.getmtime(lib.path) == so_mtime


def test_build_failure_falls_back(tmp_path, monkeypatch, caplog):
    """A broken compiler never breaks a run: warning + reference path."""
    from sparsec.codegen.cpp import bsr_linear_cpu
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    build.reset_loaded()
    try:
        with caplog.at_level("WARNING", logger="sparsec.codegen.cpp"):
            assert build.load_kernels() is None
            wd = torch.randn(16, 16)
            w = pack_bsr(wd, (16, 16))
            assert bsr_linear_cpu(torch.randn(2, 16), w.values, w.col_indices, w.row_offsets,
                                  16, 16) is NotImplemented
        assert any("reference" in r.message for r in caplog.records)
        from sparsec.runtime import ops
        x = torch.randn(2, 16)
        _close(ops.bsr_linear(x, w), linear64(x, wd, None, "none", None), torch.float32)
    finally:
        build.reset_loaded()


def test_compile_error_falls_back(tmp_path, monkeypatch, caplog):
    """The compiler exists but the build fails: warning, None, no exception."""
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "generate_source", lambda blocks=(): "#error broken kernel\n")
    build.reset_loaded()
    try:
        with caplog.at_level("WARNING", logger="sparsec.codegen.cpp"):
            assert build.load_kernels() is None
        assert any("unavailable" in r.message for r in caplog.records)
    finally:
        build.reset_loaded()


def test_generated_source_has_specializations():
    src = build.generate_source([(32, 32), (16, 64)])
    assert "bsr_run<32, 32, float, float>" in src and "bsr_run<16, 64, bf16, bf16>" in src
