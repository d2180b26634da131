"""Generate, compile and cache sparsec's C++ CPU kernels.

The kernel source is `kernels.cpp` (templates, no torch headers) plus a dispatch table that
`generate_source` writes for the requested block sizes. It is compiled with
`torch.utils.cpp_extension.load` (OpenMP, -O3, -march=native when the compiler accepts it)
into a plain shared library with extern "C" entry points, called through ctypes.

Cache: `$SPARSEC_CACHE_DIR` (default `~/.cache/sparsec`) / `cpp` / `<name>_<hash>`, the hash
over the generated source, the flags, the torch version and the host's CPU flags. A finished
build writes `build.json` (with its compile time); a later process that finds it loads the
library directly and never calls the compiler (nor ninja).

Compiling must never break a user's run: a missing compiler or a failed build logs a warning
and `load_kernels()` returns None, so callers keep the pure-torch reference path.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple

log = logging.getLogger("sparsec.codegen.cpp")

_HERE = Path(__file__).resolve().parent
# square block sizes get compile-time specializations; any other block runs the generic path
DEFAULT_BLOCKS: Tuple[Tuple[int, int], ...] = ((16, 16), (32, 32), (64, 64))
BASE_CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-std=c++17")
NATIVE_FLAG = "-march=native"

# process-wide counters (tests assert on them): compiles run, cache hits, failures
stats: Dict[str, int] = {"compiles": 0, "cache_hits": 0, "failures": 0}


@dataclass
class CppLibrary:
    """A loaded kernel library."""
    name: str
    path: str
    lib: ctypes.CDLL
    compile_seconds: float          # time of the compile that built it (0 if unknown)
    load_seconds: float             # time this process spent getting it (compile or load)
    cached: bool                    # True: loaded from the disk cache, nothing compiled
    flags: Tuple[str, ...]
    vector_width: int = 0
    meta: dict = field(default_factory=dict)


def cache_dir() -> Path:
    root = os.environ.get("SPARSEC_CACHE_DIR") or os.path.join("~", ".cache", "sparsec")
    return Path(root).expanduser() / "cpp"


def _cpu_fingerprint() -> str:
    """What -march=native depends on: the machine and its CPU feature flags."""
    parts = [platform.machine(), platform.system()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    parts.append(line.strip())
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        parts.append(platform.processor())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def generate_source(blocks: Iterable[Tuple[int, int]] = DEFAULT_BLOCKS) -> str:
    """kernels.cpp + a dispatch table with one specialization per (BH, BW) and dtype."""
    template = (_HERE / "kernels.cpp").read_text()
    lines = [
        "static int sparsec_bsr_dispatch(int dtype, const sparsec::BsrArgs& a,",
        "                                const sparsec::Epi& e) {",
        "  using namespace sparsec;",
    ]
    seen = set()
    for bh, bw in blocks:
        bh, bw = int(bh), int(bw)
        if (bh, bw) in seen or bh <= 0 or bw <= 0:
            continue
        seen.add((bh, bw))
        lines += [
            f"  if (a.BH == {bh} && a.BW == {bw}) {{",
            f"    if (dtype == 0) return bsr_run<{bh}, {bw}, float, float>(a, e);",
            f"    if (dtype == 1) return bsr_run<{bh}, {bw}, bf16, bf16>(a, e);",
            "    return 1;",
            "  }",
        ]
    lines += [
        "  if (dtype == 0) return bsr_generic<float, float>(a, e);",
        "  if (dtype == 1) return bsr_generic<bf16, bf16>(a, e);",
        "  return 1;",
        "}",
        "",
    ]
    return template + "\n".join(lines)


def _torch_tag() -> str:
    import torch
    return torch.__version__


def _key(source: str, flags: Sequence[str]) -> str:
    h = hashlib.sha256()
    for part in (source, "\0".join(flags), _torch_tag(), _cpu_fingerprint()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


_SIGNATURES = {
    "sparsec_vector_width": (ctypes.c_int, []),
    "sparsec_bsr_linear": (ctypes.c_int, [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]),
    "sparsec_bitmap_linear": (ctypes.c_int, [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
        ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int]),
    "sparsec_csr_linear": (ctypes.c_int, [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]),
}


def _open(path: str) -> ctypes.CDLL:
    import torch  # noqa: F401  (libgomp / libc10 are loaded by torch first)
    lib = ctypes.CDLL(path)
    for fname, (res, args) in _SIGNATURES.items():
        if hasattr(lib, fname):
            fn = getattr(lib, fname)
            fn.restype = res
            fn.argtypes = args
    return lib


def _try_load_cached(bdir: Path, name: str, flags) -> Optional[CppLibrary]:
    meta_path = bdir / "build.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        so = bdir / meta["library"]
        if not so.is_file():
            return None
        t0 = time.perf_counter()
        lib = _open(str(so))
        return CppLibrary(name, str(so), lib, float(meta.get("compile_seconds", 0.0)),
                          time.perf_counter() - t0, True, tuple(flags), meta=meta)
    except Exception as exc:  # a corrupt cache entry is rebuilt, never fatal
        log.warning("sparsec C++ cache entry %s unusable (%s); rebuilding", bdir, exc)
        return None


def _compile(source: str, name: str, bdir: Path, flags: Sequence[str]) -> CppLibrary:
    from torch.utils import cpp_extension
    bdir.mkdir(parents=True, exist_ok=True)
    src = bdir / f"{name}.cpp"
    if not src.is_file() or src.read_text() != source:
        tmp = bdir / f".{name}.cpp.tmp{os.getpid()}"
        tmp.write_text(source)
        os.replace(tmp, src)
    t0 = time.perf_counter()
    stats["compiles"] += 1
    res = cpp_extension.load(name=name, sources=[str(src)], extra_cflags=list(flags),
                             extra_ldflags=["-fopenmp"], build_directory=str(bdir),
                             is_python_module=False, verbose=False)
    seconds = time.perf_counter() - t0
    so = res if isinstance(res, str) else str(bdir / f"{name}.so")
    meta = {"library": os.path.basename(so), "compile_seconds": round(seconds, 3),
            "flags": list(flags), "torch": _torch_tag(), "built_at": time.time()}
    tmp = bdir / f".build.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, bdir / "build.json")
    lib = _open(so)
    return CppLibrary(name, so, lib, seconds, seconds, False, tuple(flags), meta=meta)


def build_library(source: str, name: str, flag_sets: Sequence[Sequence[str]]) -> Optional[CppLibrary]:
    """Load `source` from the cache or compile it, trying each flag set in turn.

    Returns None (after a warning) when nothing could be built."""
    last_exc = None
    for flags in flag_sets:
        flags = tuple(flags)
        full = f"{name}_{_key(source, flags)}"
        bdir = cache_dir() / full
        got = _try_load_cached(bdir, full, flags)
        if got is not None:
            stats["cache_hits"] += 1
            log.info("sparsec C++ kernel %s: cache hit (%s), loaded in %.3f s "
                     "(compiled once in %.1f s)", name, bdir, got.load_seconds, got.compile_seconds)
            return got
        try:
            # Seconds of silence inside torch.compile would look like a hang: say what happens.
            log.warning("sparsec: compiling its C++ CPU kernels (%s), once; cached in %s", name, bdir)
            got = _compile(source, full, bdir, flags)
            log.info("sparsec C++ kernel %s: compiled in %.1f s with %s", name,
                     got.compile_seconds, " ".join(flags))
            return got
        except Exception as exc:  # compiler missing, flag refused, build error
            stats["failures"] += 1
            last_exc = exc
            log.debug("sparsec C++ build of %s with %s failed: %s", name, flags, exc)
    log.warning("sparsec: C++ CPU kernels unavailable (build failed: %s); using the pure-torch "
                "reference path", str(last_exc).strip().splitlines()[-1] if last_exc else "?")
    return None


_LOCK = threading.Lock()
_LOADED: Dict[Tuple, Optional[CppLibrary]] = {}
_FAST: Dict[Tuple, Optional[CppLibrary]] = {}


def compiler_available() -> bool:
    import shutil
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx.split()[0]) is not None


def load_kernels(blocks: Iterable[Tuple[int, int]] = DEFAULT_BLOCKS) -> Optional[CppLibrary]:
    """The kernel library for `blocks` (compiled once per machine, then loaded from the cache).

    None when C++ kernels are disabled (`SPARSEC_DISABLE_CPP=1`) or cannot be built."""
    env = (os.environ.get("SPARSEC_CACHE_DIR"), os.environ.get("SPARSEC_DISABLE_CPP"))
    if blocks is DEFAULT_BLOCKS and env in _FAST:   # per-call fast path (op wrappers)
        return _FAST[env]
    if os.environ.get("SPARSEC_DISABLE_CPP", "") not in ("", "0"):
        return None
    default = blocks is DEFAULT_BLOCKS
    blocks = tuple(sorted({(int(a), int(b)) for a, b in blocks}))
    key = (blocks, str(cache_dir()))
    with _LOCK:
        if key in _LOADED:
            if default:
                _FAST[env] = _LOADED[key]
            return _LOADED[key]
        if not compiler_available() and not _any_cached(blocks):
            log.warning("sparsec: no C++ compiler found; CPU sparse ops use the reference path")
            _LOADED[key] = None
            if default:
                _FAST[env] = None
            return None
        source = generate_source(blocks)
        flag_sets = [BASE_CFLAGS + (NATIVE_FLAG,), BASE_CFLAGS]
        if platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
            flag_sets = [BASE_CFLAGS]
        lib = build_library(source, "sparsec_cpu_kernels", flag_sets)
        if lib is not None:
            lib.vector_width = int(lib.lib.sparsec_vector_width())
        _LOADED[key] = lib
        if default:
            _FAST[env] = lib
        return lib


def _any_cached(blocks) -> bool:
    source = generate_source(blocks)
    for flags in (BASE_CFLAGS + (NATIVE_FLAG,), BASE_CFLAGS):
        full = f"sparsec_cpu_kernels_{_key(source, flags)}"
        if (cache_dir() / full / "build.json").is_file():
            return True
    return False


def reset_loaded() -> None:
    """Forget libraries loaded in this process (tests)."""
    with _LOCK:
        _LOADED.clear()
        _FAST.clear()
