"""speedups' own CPU kernels: quantized.cpp and decoding.cpp, compiled on first use into one library, and the
same math in plain PyTorch.

quantized.cpp holds matrix-vector products for decoding (one input row, or the few rows of beam search), each
with a scalar loop and one variant per instruction set (its opening comment draws the layouts and the math):
    int8 weights (out, in) with one float32 scale per row, times x rounded to int8 per block of 32 inside the call;
    int4 weights in blocks of 32 with a float16 scale and low per block, 16 rows side by side (our layout:
    pack_int4), times x as above;
    bfloat16 weights, widened to float32 in registers (or multiplied by vdpbf16ps where x is bfloat16);
and dequantisation of int8 and int4 weights into a caller's float32 buffer (for prompt chunks). decoding.cpp
holds a decoding step's small operations as one call each: RMSNorm, and RoPE with the write into the KV cache.

The build. `library()` compiles both files once with torch.utils.cpp_extension (ninja and a C++ compiler:
$CXX, else c++), printing one progress line on stderr while it does, and keeps the library under the user's
cache folder ($XDG_CACHE_HOME if it is an absolute path, else ~/.cache), in CACHE_FOLDER/kernels-<key>, where the
key hashes the sources, the build flags, the compiler's version, torch's and Python's: later runs load it in a
fraction of a second. The build happens in a temporary folder beside the final one and is renamed into place
when complete, under a file lock, so processes starting together (torchrun) build it once and never see half a
build; a build killed half-way leaves a temporary folder that the next build removes. Where it cannot be built
(no compiler, no ninja, a compiler error, a cache folder it cannot write), `library()` returns None and
`why_unavailable()` says why in one line; nothing raises. On a CPU other than x86-64 only the scalar variants are
built (checked on Linux x86-64 only: AVX2, AVX-512 with VNNI and BF16).

API (x is (..., in) in float32, bfloat16 or float16; results are (..., out) in x's dtype; a variant is one of
`variants(kernel)`, "" for the fastest; all threaded by at::parallel_for over output rows, int4's by tiles):
    library()                                     the loaded extension or None (built or loaded once per process)
    why_unavailable()                             None, or why library() is None
    variants(kernel)                              "int8", "int4" or "bf16": what this CPU runs, fastest first,
                                                  from ["avx512vnni", "avxvnni", "avx2", "scalar"] (int8, int4)
                                                  or ["avx512bf16", "avx512", "avx2", "scalar"] (bf16)
    int8_matvec(x, codes, scales, variant="")     codes (out, in) int8 in -127 .. 127 (not -128: AVX2's sign
                                                  trick would overflow), scales (out,) float32
    int4_matvec(x, tiles, out, variant="")        tiles: pack_int4's (ceil(out / 16), blocks, 320) uint8 (or a
                                                  slice of whole tiles); out: the rows they hold
    bf16_matvec(x, weight, variant="")            weight (out, in) bfloat16
    set_read_ahead(bytes)                         how far ahead the three products' SIMD loops prefetch their
                                                  weight, non-temporally (0: not at all); returns the value it
                                                  replaces (for benchmarks/bench_kernels.py's on/off turns)
    dequantize_int8(codes, scales, out)           out: float32 (out, in), filled with codes * scales[:, None]
    dequantize_int4(tiles, out)                   out: float32 (rows, in), filled with the first rows of the
                                                  tiles' codes * scale + low
    quantize_activations(x, variant="")           the kernels' int8 rounding of x: (codes, scales, sums)
    rms_norm(x, weight, eps)                      llama-models' RMSNorm; x (..., dim) and weight (dim,) of one dtype
    rotate_into_cache(qkv, rotations, cache_k, cache_v, start, heads, kv_heads)
                                                  qkv (batch, seqlen, (heads + 2 kv_heads) head_dim): the queries
                                                  rotated, returned (batch, heads, seqlen, head_dim); the keys
                                                  rotated and the values written into the caches (max_batch,
                                                  kv_heads, max_seq, head_dim) at start .. start + seqlen - 1;
                                                  rotations: view_as_real of freqs_cis's rows, float32
These wrappers add one Python call; a hot loop can call library()'s functions of the same names directly.

The same math in PyTorch (the tests compare each variant with these):
    quantize_activations_reference(x)             (codes (rows, blocks * 32) int8, scales (rows, blocks) float32,
                                                  sums (rows, blocks) int32): the same rounding, bit for bit
    int8_matvec_reference(x, codes, scales)       float64 results from the integer dot products
    int4_matvec_reference(x, codes, scales, lows)  (quantize_int4's or unpack_int4's)
    bf16_matvec_reference(x, weight)              float64
    quantize_int4(weight)                         (codes (out, blocks * 32) uint8, scales, lows float32): the
                                                  codes of speedups' quantize_int4, any `in` (a short last block)
    pack_int4(codes, scales, lows)                the kernels' tiles (ceil(out / 16), blocks, 320) uint8: each
                                                  tile's blocks one after the other, each block its 16 rows'
                                                  float16 scales, lows, then codes (quantized.cpp draws it)
    unpack_int4(tiles, out)                       (codes (out, blocks * 32) uint8, scales, lows float16) back
    dequantize_int4_reference(codes, scales, lows, in_features)

This module imports nothing from the rest of speedups.
"""

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("quantized.cpp", "decoding.cpp")]  # one library
NAME = "llama_scripts_kernels"  # the Python module the build makes (quantized.cpp's TORCH_EXTENSION_NAME)
CACHE_FOLDER = "llama-scripts"  # under $XDG_CACHE_HOME or ~/.cache, as speedups' kernel timings
FLAGS = ["-O3", "-fopenmp"]  # -fopenmp: at::parallel_for runs threads only in code compiled with OpenMP
LINK_FLAGS = ["-fopenmp"]  # resolves to the libgomp that torch has loaded (the same soname)
LOCK_FILE = "kernels.lock"  # in the cache folder: held while building (empty; it stays)
BUILD_SECONDS = 30  # about what the first build takes on 2 cores (20 s of CPU time on an EPYC): shown meanwhile
BLOCK = 32  # inputs per block: one activation scale; one int4 scale and low
TILE = 16  # int4: weight rows per tile, side by side (one per 32-bit lane of a 512-bit register)
CHUNK = 4  # int4: a lane's bytes per 64-byte chunk of codes (the inputs 4i .. 4i + 3 and 16 + 4i .. of a block)
TILE_BLOCK_BYTES = TILE * (BLOCK // 2 + 4)  # int4: one block of a tile: 16 float16 scales, 16 lows, 256 code bytes
INT8_MAX = 127  # activation codes are in -127 .. 127
INT4_LEVELS = 15  # int4 codes are in 0 .. 15

_loaded = None  # (library or None, reason or None), once per process


# ---------------------------------------------------------------------------------------------------------
# The library: built once, then loaded from the cache.
# ---------------------------------------------------------------------------------------------------------
def library():
    """The compiled kernels (a Python module), or None where they cannot be built: see why_unavailable()."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded[0]


def why_unavailable():
    """None when library() works, else one line saying why it is None."""
    library()
    return _loaded[1]


def cache_folder():
    """$XDG_CACHE_HOME/llama-scripts, or ~/.cache/llama-scripts (the XDG rule: a relative path is ignored)."""
    root = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(root) if os.path.isabs(root) else Path.home() / ".cache") / CACHE_FOLDER


def _load():
    """(library, None) or (None, reason)."""
    try:
        compiler = _compiler_version()
        if compiler is None:
            cxx = os.environ.get("CXX", "c++")
            return None, f"no C++ compiler ({cxx} is not on PATH; set CXX to one)"
        sources = [path.read_bytes() for path in SOURCES]
        key = hashlib.sha256(b"\0".join([*sources, " ".join(FLAGS + LINK_FLAGS).encode(), compiler.encode(),
                                         torch.__version__.encode(), sys.version.encode(),
                                         platform.machine().encode()])).hexdigest()[:16]
        folder = cache_folder() / f"kernels-{key}"
        built = folder / f"{NAME}.so"
        if built.exists():
            return _import(built), None
        return _build(folder, built)
    except Exception as error:  # a library we cannot load must not stop the run: the stock kernels remain
        return None, _one_line(error)


def _compiler_version():
    """The first line of `$CXX --version`, or None where there is no such compiler."""
    command = shlex.split(os.environ.get("CXX", "c++"))
    if not command or shutil.which(command[0]) is None:
        return None
    try:
        result = subprocess.run(command + ["--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None


def _import(path):
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(folder, built):
    """Compile into a temporary folder beside `folder`, then rename it into place; (library, None) or
    (None, reason)."""
    ninja = _ninja_folder()
    if ninja is None:
        return None, "ninja is not installed (pip install ninja)"
    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        lock = open(parent / LOCK_FILE, "a")
    except OSError as error:
        return None, f"cannot write to {parent} ({error.strerror or error})"
    with lock, _progress() as progress:
        _lock(lock, progress)
        if built.exists():  # another process built it while this one waited
            return _import(built), None
        for stale in parent.glob(f".{folder.name}-*"):  # left by a build that was killed
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=parent))
        try:
            progress(f"compiling speedups' C++ kernels (once, ~{BUILD_SECONDS} s)...")
            module = _compile(staging, ninja)
            for path in staging.iterdir():  # keep the library only
                if path.name != built.name:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            os.rename(staging, folder)
            return module, None
        except Exception as error:
            return None, _build_error(error)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _compile(staging, ninja):
    from torch.utils import cpp_extension  # imported only to build: it takes a moment

    path = os.environ.get("PATH", "")
    os.environ["PATH"] = ninja + os.pathsep + path  # torch runs `ninja` from PATH
    try:
        with warnings.catch_warnings(), _quiet(logging.getLogger(cpp_extension.__name__)):
            warnings.simplefilter("ignore")  # torch warns about compiler versions; a failure says more
            return cpp_extension.load(name=NAME, sources=[str(path) for path in SOURCES],
                                      build_directory=str(staging), extra_cflags=FLAGS, extra_ldflags=LINK_FLAGS,
                                      verbose=False)
    finally:
        os.environ["PATH"] = path


@contextlib.contextmanager
def _quiet(logger):
    """logger's warnings silenced for a while."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _ninja_folder():
    """The folder holding the ninja program: on PATH, or from the ninja package (a venv run without
    activating it has the package but not its bin folder on PATH)."""
    found = shutil.which("ninja")
    if found:
        return str(Path(found).parent)
    try:
        import ninja
    except ImportError:
        return None
    return ninja.BIN_DIR if Path(ninja.BIN_DIR, "ninja").exists() else None


def _lock(file, progress):
    """Wait for the build lock (released by the system if its holder dies); says so if another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the rename still keeps half a build out of sight
        return
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        progress("waiting for another process compiling speedups' C++ kernels...")
        fcntl.flock(file, fcntl.LOCK_EX)


@contextlib.contextmanager
def _progress():
    """A progress line on stderr: show(text) replaces it; it is erased at the end on a terminal, else finished
    with the time it took."""
    start = time.perf_counter()
    shown = []

    def show(text):
        sys.stderr.write(("\r\033[K" if shown and sys.stderr.isatty() else "\n" if shown else "") + text)
        sys.stderr.flush()
        shown.append(text)

    try:
        yield show
    finally:
        if shown:
            done = f" done in {time.perf_counter() - start:.0f} s\n"
            sys.stderr.write("\r\033[K" if sys.stderr.isatty() else done)
            sys.stderr.flush()


def _build_error(error):
    """One line from a failed build: the compiler's first error where there is one."""
    text = str(error)
    for line in text.splitlines():
        if re.search(r"\berror\b", line) and not line.startswith("Error building extension"):
            return "the C++ build failed: " + line.strip()[:200]
    return "the C++ build failed: " + _one_line(error)


def _one_line(error):
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


# ---------------------------------------------------------------------------------------------------------
# Thin wrappers (see the module docstring).
# ---------------------------------------------------------------------------------------------------------
# Our variants from the fewest instructions to the most. Where PyTorch's own kernels are held to fewer than the
# CPU has (ATEN_CPU_CAPABILITY=avx2 or default; oneDNN's ONEDNN_MAX_CPU_ISA=AVX2, AVX2_VNNI, AVX512_CORE, ...),
# ours are held to the same: so all of them try an AVX2-only CPU on a larger one, as README's platform table does.
ISA_RANKS = {"scalar": 0, "avx2": 1, "avxvnni": 2, "avx512": 3, "avx512vnni": 4, "avx512bf16": 5}
TORCH_CAPS = {"DEFAULT": 0, "AVX2": 2}  # torch.backends.cpu.get_cpu_capability(); any other: no cap
ONEDNN_CAPS = {"SSE41": 0, "AVX": 0, "AVX2": 1, "AVX2_VNNI": 2, "AVX2_VNNI_2": 2, "AVX512_CORE": 3,
               "AVX512_CORE_VNNI": 4}  # any other (AVX512_CORE_BF16, AMX, ...): no cap


def isa_cap():
    """The highest ISA_RANKS rank that PyTorch's and oneDNN's settings allow (the largest with neither set)."""
    caps = [TORCH_CAPS.get(torch.backends.cpu.get_cpu_capability(), len(ISA_RANKS)),
            ONEDNN_CAPS.get(os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper(), len(ISA_RANKS))]
    return min(caps)


@functools.cache
def variants(kernel):
    """The variants of "int8", "int4" or "bf16" this CPU runs, fastest first, within isa_cap() ([] without the
    library)."""
    if not library():
        return []
    return [name for name in library().variants(kernel) if ISA_RANKS.get(name, 0) <= isa_cap()]


def int8_matvec(x, codes, scales, variant=""):
    return library().int8_matvec(x, codes, scales, variant or variants("int8")[0])


def int4_matvec(x, tiles, out, variant=""):
    return library().int4_matvec(x, tiles, out, variant or variants("int4")[0])


def bf16_matvec(x, weight, variant=""):
    return library().bf16_matvec(x, weight, variant or variants("bf16")[0])


def set_read_ahead(bytes):
    return library().set_read_ahead(bytes)


def dequantize_int8(codes, scales, out):
    library().dequantize_int8(codes, scales, out)
    return out


def dequantize_int4(tiles, out):
    library().dequantize_int4(tiles, out)
    return out


def quantize_activations(x, variant=""):
    return tuple(library().quantize_activations(x, variant))


def rms_norm(x, weight, eps):
    return library().rms_norm(x, weight, eps)


def rotate_into_cache(qkv, rotations, cache_k, cache_v, start, heads, kv_heads):
    return library().rotate_into_cache(qkv, rotations, cache_k, cache_v, start, heads, kv_heads)


# ---------------------------------------------------------------------------------------------------------
# The same math in plain PyTorch.
# ---------------------------------------------------------------------------------------------------------
def _blocks(in_features):
    return -(-in_features // BLOCK)


def _padded(x, in_features):
    """x (..., in) as float32 (rows, blocks, 32), zeros past in."""
    rows = x.reshape(-1, in_features).float()
    return _pad(rows, _blocks(in_features) * BLOCK - in_features).view(rows.shape[0], -1, BLOCK)


def _pad(x, extra):
    """x with `extra` zeros appended along its last dimension."""
    return torch.nn.functional.pad(x, (0, extra)) if extra else x


def quantize_activations_reference(x):
    """x (..., in) rounded to int8 per block of 32, exactly as the kernels do: d = max(max|x| / 127, FLT_MIN)
    (one float32 division), codes = round(x / d) (half to even). (codes, scales, sums) as quantize_activations."""
    blocks = _padded(x, x.shape[-1])
    scales = (blocks.abs().amax(dim=2) / INT8_MAX).clamp_(min=torch.finfo(torch.float32).tiny)
    codes = (blocks / scales[..., None]).round_()
    return codes.to(torch.int8).flatten(1), scales, codes.sum(dim=2).to(torch.int32)


def int8_matvec_reference(x, codes, scales):
    """The int8 kernel's math in float64 (its integer sums exact): (rows, out)."""
    q, d, _ = quantize_activations_reference(x)
    w = _pad(codes.double(), q.shape[1] - codes.shape[1]).view(codes.shape[0], -1, BLOCK)  # (out, blocks, 32)
    dots = torch.einsum("rbj,obj->rob", q.double().view(q.shape[0], -1, BLOCK), w)  # (rows, out, blocks)
    return (dots * d.double()[:, None, :]).sum(dim=2) * scales.double()


def int4_matvec_reference(x, codes, scales, lows):
    """The int4 kernel's math in float64: sum_b d[b] * (scale[b] * sum_j c[j] q[j] + low[b] * sum_j q[j]), from
    the codes (out, blocks * 32) and the blocks' scales and lows (out, blocks)."""
    q, d, sums = quantize_activations_reference(x)
    c = codes.double().view(codes.shape[0], -1, BLOCK)  # (out, blocks, 32)
    dots = torch.einsum("rbj,obj->rob", q.double().view(q.shape[0], -1, BLOCK), c)
    d = d.double()[:, None, :]
    return (dots * scales.double() * d + lows.double() * (d * sums.double()[:, None, :])).sum(dim=2)


def bf16_matvec_reference(x, weight):
    """x times the bfloat16 weight, in float64."""
    return x.reshape(-1, weight.shape[1]).double() @ weight.double().t()


def quantize_int4(weight):
    """(codes (out, blocks * 32) uint8 in 0 .. 15, zero past in; scales, lows (out, blocks) float32) with
    weight ~= codes * scale + low per block of 32: speedups' quantize_int4 rounding, float op for float op, with
    a shorter last block where in is not a multiple of 32."""
    out_features, in_features = weight.shape
    groups = weight.float().view(out_features, in_features)
    full = in_features // BLOCK * BLOCK
    parts = [groups[:, :full].reshape(out_features, -1, BLOCK)]
    if full < in_features:
        parts.append(groups[:, full:].reshape(out_features, 1, -1))
    codes, scales, lows = [], [], []
    for part in parts:
        low, high = torch.aminmax(part, dim=2)
        scale = ((high - low) / INT4_LEVELS).clamp_(min=torch.finfo(torch.float32).tiny)
        codes.append(_pad((part - low[..., None]).div_(scale[..., None]).round_().clamp_(0, INT4_LEVELS),
                           BLOCK - part.shape[2]))
        scales.append(scale)
        lows.append(low)
    return torch.cat(codes, dim=1).to(torch.uint8).flatten(1), torch.cat(scales, dim=1), torch.cat(lows, dim=1)


def pack_int4(codes, scales, lows):
    """quantize_int4's codes, scales and lows -> the kernels' tiles (ceil(out / 16), blocks, 320) uint8. Rows
    past `out` that fill the last tile get codes, scales and lows 0. Block b of tile t: the 16 rows' scales
    (float16), their lows, then 4 chunks of 64 bytes; in chunk i, row j's 4 bytes hold its codes of inputs
    32b + 4i + k (low nibbles) and 32b + 16 + 4i + k (high nibbles), k = 0 .. 3."""
    out, blocks = scales.shape
    tiles = -(-out // TILE)
    fill = tiles * TILE - out
    codes = torch.nn.functional.pad(codes.to(torch.uint8), (0, 0, 0, fill))
    by_lane = codes.view(tiles, TILE, blocks, 2, BLOCK // 2 // CHUNK, CHUNK)  # (t, j, b, half, i, k)
    bytes_ = (by_lane[:, :, :, 0] | (by_lane[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)  # (t, b, i, j, k)

    def lanes(values):  # (out, blocks) -> (t, b, 32 bytes): each block's 16 rows side by side, float16
        values = torch.nn.functional.pad(values.to(torch.float16), (0, 0, 0, fill))
        return values.view(tiles, TILE, blocks).transpose(1, 2).contiguous().view(torch.uint8)

    return torch.cat([lanes(scales), lanes(lows), bytes_.reshape(tiles, blocks, -1)], dim=2).contiguous()


def unpack_int4(tiles, out):
    """pack_int4's tiles -> (codes (out, blocks * 32) uint8, scales (out, blocks) float16, lows float16)."""
    count, blocks = tiles.shape[:2]
    codes = tiles[:, :, 4 * TILE :].reshape(count, blocks, BLOCK // 2 // CHUNK, TILE, CHUNK).permute(0, 3, 1, 2, 4)
    codes = torch.stack([codes & 0x0F, codes >> 4], dim=3).reshape(count * TILE, blocks * BLOCK)  # (t j, b half i k)

    def rows(start):  # 16 float16 per tile and block -> (out, blocks)
        values = tiles[:, :, start : start + 2 * TILE].contiguous().view(torch.float16)  # (t, b, j)
        return values.transpose(1, 2).reshape(count * TILE, blocks)[:out]

    return codes[:out], rows(0), rows(2 * TILE)


def dequantize_int4_reference(codes, scales, lows, in_features):
    """codes * scale + low per block, float32 (out, in_features)."""
    blocks = codes.float().view(codes.shape[0], -1, BLOCK)
    return (blocks * scales.float()[..., None] + lows.float()[..., None]).flatten(1)[:, :in_features]
