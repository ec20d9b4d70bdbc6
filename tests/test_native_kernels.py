"""speedups' own C++ kernels (speedups/quantized.cpp, built by speedups/native.py) against plain PyTorch, and
decoding.cpp's one-call RMSNorm and RoPE against llama-models' own code.

Integer dot products are exact, so every variant this CPU runs is compared with native.py's PyTorch computation
of the same quantised math: the activation codes and scales must match bit for bit, and the products may differ
only by float32 summation order. The bound used: a float32 sum of terms t_i, in any order, with n roundings on
the way from a term to the result, is within n * 2^-24 * sum_i |t_i| of the exact sum (to first order). Here
n <= blocks + 32 for the quantised kernels (blocks summed one after another per lane, at most 16 lanes reduced,
a few products) and in + 32 for bfloat16, and sum_i |t_i| is taken over the elementary products (every
|q_j * w_j| times its scales), which bounds any grouping of them. A result in bfloat16 or float16 adds half a
unit in the last place of its dtype.

The first run compiles the kernels (about a minute on 2 cores); later runs load them from the user's cache.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from llama_models.llama3 import model as llama_model

from speedups import layouts
from speedups import native

REPO = Path(__file__).resolve().parent.parent
LIBRARY = native.library()  # built (or loaded) once, while the tests are collected
SUM_ROUNDING = 2.0**-24  # float32's unit roundoff
OUTPUT_ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # half an ulp
EXTRA_ROUNDINGS = 32  # lanes reduced, block and weight scales applied, on top of one per block (or input)
OUT = 4097  # odd, and enough rows that every weight below spans at least two threads' tasks
IN = [2048, 100, 33]  # whole blocks of 32, and a shorter last block (33: one input in it)
ROWS = [1, 3, 8, 11, 14, 17]  # one row; beam search's few (each weight block read once for all); more than 8, in
# groups of 8, then (AVX2 int8) tiles of 4 rows: 11, 14 and 17 leave 3, 2 and 1 in the last tile
THREADS = [1, 2]


@pytest.fixture(scope="module")
def kernels():
    """The library; a skip where no compiler or ninja is installed, a failure where the build itself fails."""
    if LIBRARY is None:
        reason = native.why_unavailable()
        if reason.startswith(("no C++ compiler", "ninja is not installed")):
            pytest.skip(f"our kernels: not available ({reason})")
        pytest.fail(f"our kernels did not build: {reason}")
    return LIBRARY


def every_variant(kernel):
    """pytest parameters: each variant the kernels have, skipped (with the reason) where this CPU lacks it."""
    names = ["avx512vnni", "avxvnni", "avx2", "scalar"] if kernel != "bf16" else ["avx512bf16", "avx512", "avx2",
                                                                                  "scalar"]
    runs = native.variants(kernel)
    reason = lambda name: f"{name}: not on this CPU, or capped by ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA"
    return [pytest.param(name, marks=pytest.mark.skipif(name not in runs, reason=reason(name))) for name in names]


@pytest.mark.parametrize("settings, widest", [
    ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, "avx2"),  # README's AVX2-only CPU (Zen 2, 3)
    ({"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI"}, "avxvnni"),  # an Intel client CPU with AVX-VNNI
    ({"ATEN_CPU_CAPABILITY": "default"}, "scalar")])
def test_pytorchs_instruction_caps_hold_ours_too(kernels, settings, widest):
    """Where PyTorch's own kernels are held to fewer instructions than the CPU has, ours are held to the same,
    so that one CPU can try how the scripts run on a smaller one; the fastest variant left is the one used."""
    code = "from speedups import native; print([native.variants(k) for k in ('int8', 'int4', 'bf16')])"
    environment = {**os.environ, **settings}
    shown = subprocess.run([sys.executable, "-c", code], env=environment, cwd=REPO, capture_output=True, text=True,
                           check=True).stdout
    rank = native.ISA_RANKS[widest]
    assert shown.strip() == str([[name for name in kernels.variants(kind) if native.ISA_RANKS[name] <= rank]
                                  for kind in ("int8", "int4", "bf16")])  # the library's own list: uncapped


@pytest.fixture(params=THREADS, ids=lambda t: f"{t}-threads")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


_CASES = {}


def case(kernel, rows, in_features, dtype=torch.float32):
    """(x (rows, in), the weight's tensors for `kernel`, the float64 reference product, its error bound): random,
    made once per module and shared by the variants and thread counts."""
    key = (kernel, rows, in_features, dtype)
    if key not in _CASES:
        generator = torch.Generator().manual_seed(rows * 1000 + in_features)
        x = torch.randn(rows, in_features, generator=generator).to(dtype)
        weight = torch.randn(OUT, in_features, generator=generator) * 0.02
        _CASES[key] = (x, *{"int8": int8_case, "int4": int4_case, "bf16": bf16_case}[kernel](x, weight))
    return _CASES[key]


def int8_case(x, weight):
    codes = (weight / weight.abs().amax(dim=1, keepdim=True) * native.INT8_MAX).round().to(torch.int8)
    scales = torch.rand(weight.shape[0], generator=torch.Generator().manual_seed(1)) + 0.5
    q, d, _ = native.quantize_activations_reference(x)
    magnitudes = torch.einsum("rbj,obj->rob", blocks_of(q.abs()), blocks_of(padded(codes, q.shape[1]).abs()))
    total = (magnitudes * d.double()[:, None, :]).sum(dim=2) * scales.double()
    return (codes, scales), native.int8_matvec_reference(x, codes, scales), bound(total, d.shape[1])


def int4_case(x, weight):
    codes, scales, lows = native.quantize_int4(weight)
    scales, lows = scales.to(torch.float16), lows.to(torch.float16)  # as the kernels read them
    q, d, sums = native.quantize_activations_reference(x)
    magnitudes = torch.einsum("rbj,obj->rob", blocks_of(q.abs()), blocks_of(codes))
    d = d.double()[:, None, :]
    total = (magnitudes * scales.double().abs() * d + lows.double().abs() * d * sums.double().abs()[:, None, :])
    reference = native.int4_matvec_reference(x, codes, scales, lows)
    return (native.pack_int4(codes, scales, lows), weight.shape[0]), reference, bound(total.sum(dim=2), d.shape[2])


def bf16_case(x, weight):
    weight = weight.bfloat16()
    reference = native.bf16_matvec_reference(x, weight)
    total = x.double().abs() @ weight.double().abs().t()
    return (weight,), reference, bound(total, x.shape[1])


def blocks_of(codes):
    return codes.double().view(codes.shape[0], -1, native.BLOCK)


def padded(codes, width):
    return torch.nn.functional.pad(codes, (0, width - codes.shape[1]))


def bound(total, roundings):
    """The largest difference float32 summation order allows, per output (see the module docstring)."""
    return (roundings + EXTRA_ROUNDINGS) * SUM_ROUNDING * total


def assert_within(y, reference, allowed):
    """y (in x's dtype) against the float64 reference, within `allowed` plus y's own rounding."""
    allowed = allowed + reference.abs() * OUTPUT_ROUNDING[y.dtype]
    error = (y.double() - reference).abs()
    worst = (error - allowed).argmax()
    assert (error <= allowed).all(), (f"{int((error > allowed).sum())} outputs off; the worst: "
                                      f"{y.flatten()[worst].item()} against {reference.flatten()[worst].item()}, "
                                      f"allowed {allowed.flatten()[worst].item():.3g}")


# ---------------------------------------------------------------------------------------------------------
# The activation row's codes, bit for bit.
# ---------------------------------------------------------------------------------------------------------
def awkward_rows():
    """Rows that test the rounding: a block whose scale is exactly 1 with halves (round half to even), an
    all-zero block, a tail of one input, and ordinary random values."""
    halves = torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -126.5] * 4)
    generator = torch.Generator().manual_seed(0)
    return torch.stack([torch.cat([halves, torch.zeros(32), torch.randn(33, generator=generator)]),
                        torch.randn(97, generator=generator) * 1e-3])


@pytest.mark.parametrize("variant", every_variant("int8"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_activation_codes_match_pytorch_bit_for_bit(kernels, variant, dtype):
    for x in [awkward_rows(), torch.randn(3, 2048), torch.randn(1, 33)]:
        x = x.to(dtype)
        expected = native.quantize_activations_reference(x)
        for name, got, want in zip(["codes", "scales", "sums"], native.quantize_activations(x, variant), expected):
            assert torch.equal(got, want), f"{name} differ for x of shape {tuple(x.shape)}"
    codes = native.quantize_activations(awkward_rows(), variant)[0]
    assert codes[0, :8].tolist() == [127, 2, -4, 0, 0, 2, 126, -126]  # halves to even
    assert codes[0, 32:64].eq(0).all()


# ---------------------------------------------------------------------------------------------------------
# The products.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", every_variant("int8"))
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("in_features", IN)
def test_int8_product_is_the_integer_math(kernels, variant, rows, in_features, threads):
    x, weights, reference, allowed = case("int8", rows, in_features)
    assert_within(native.int8_matvec(x, *weights, variant), reference, allowed)


@pytest.mark.parametrize("variant", every_variant("int4"))
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("in_features", IN)
def test_int4_product_is_the_integer_math(kernels, variant, rows, in_features, threads):
    x, weights, reference, allowed = case("int4", rows, in_features)
    assert_within(native.int4_matvec(x, *weights, variant), reference, allowed)


@pytest.mark.parametrize("variant", every_variant("bf16"))
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("in_features", IN)
def test_bf16_product_is_a_float32_product_of_the_same_weights(kernels, variant, rows, in_features, threads):
    x, weights, reference, allowed = case("bf16", rows, in_features)
    assert_within(native.bf16_matvec(x, *weights, variant), reference, allowed)


@pytest.mark.parametrize("kernel", ["int8", "int4", "bf16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [1, 11])
@pytest.mark.parametrize("in_features", IN)
def test_16_bit_inputs_give_16_bit_outputs_of_the_same_math(kernels, kernel, dtype, rows, in_features):
    x, weights, reference, allowed = case(kernel, rows, in_features, dtype)
    product = getattr(native, f"{kernel}_matvec")
    for variant in native.variants(kernel):
        y = product(x, *weights, variant)
        assert y.dtype == dtype and y.shape == (rows, OUT)
        assert_within(y, reference, allowed)


def test_leading_dimensions_are_kept(kernels):
    _, weights, _, _ = case("int8", 1, 100)
    x = torch.randn(2, 3, 100)
    y = native.int8_matvec(x, *weights)
    assert y.shape == (2, 3, OUT)
    assert torch.equal(y[1, 2], native.int8_matvec(x[1, 2:3], *weights)[0])


@pytest.mark.parametrize("kernel", ["int8", "int4", "bf16"])
def test_read_ahead_changes_no_result_and_can_be_turned_off(kernels, kernel):
    """The non-temporal read-ahead only asks for lines early: every variant gives the same bits without it, and with
    it reaching far past the weight's end (prefetches never fault)."""
    x, weights, _, _ = case(kernel, 3, 100)
    product = getattr(native, f"{kernel}_matvec")
    default = native.set_read_ahead(0)
    try:
        assert default > 0  # on unless a caller turns it off
        for variant in native.variants(kernel):
            off = product(x, *weights, variant)
            assert native.set_read_ahead(default) == 0
            assert torch.equal(product(x, *weights, variant), off)
            native.set_read_ahead(1 << 30)
            assert torch.equal(product(x, *weights, variant), off)
            native.set_read_ahead(0)
        with pytest.raises(RuntimeError, match="read_ahead must be 0 \\(off\\) or a number of bytes, not -1"):
            native.set_read_ahead(-1)
    finally:
        native.set_read_ahead(default)


def test_an_unknown_variant_is_one_clear_error(kernels):
    _, weights, _, _ = case("int8", 1, 33)
    with pytest.raises(RuntimeError, match="the int8 kernel has no variant avx9"):
        native.int8_matvec(torch.randn(1, 33), *weights, "avx9")


# ---------------------------------------------------------------------------------------------------------
# int4's layout and dequantising.
# ---------------------------------------------------------------------------------------------------------
def test_int4_codes_are_speedups_quantize_int4s(kernels):
    """pack_int4(quantize_int4(w)) holds the codes PyTorch's int4 layout gets from layouts.quantize_int4."""
    weight = torch.randn(64, 128) * 0.02
    stock, scales_and_zeros, _ = layouts.quantize_int4(weight.clone())  # it lets go of (zeroes) its input's pages
    dense = torch._weight_int4pack_mm_for_cpu(torch.eye(128), stock, native.BLOCK, scales_and_zeros).t()  # (out, in)
    codes, scales, lows = native.quantize_int4(weight)
    stock_codes = ((dense.view(64, -1, native.BLOCK) - lows[..., None]) / scales[..., None]).round().flatten(1)
    assert torch.equal(stock_codes, codes.float())


@pytest.mark.parametrize("in_features", IN)
def test_int4_tiles_hold_every_row_and_slice_by_whole_tiles(kernels, in_features):
    """pack_int4's tiles give back each row's codes, scales and lows exactly (unpack_int4), the rows that fill
    the last tile are zeros, and a slice of whole tiles (a torchrun process's rows, or wq of wqkv) multiplies as
    those rows of the whole weight."""
    weight = torch.randn(OUT, in_features, generator=torch.Generator().manual_seed(2)) * 0.02
    codes, scales, lows = native.quantize_int4(weight)
    scales, lows = scales.to(torch.float16), lows.to(torch.float16)
    tiles = native.pack_int4(codes, scales, lows)
    blocks = -(-in_features // native.BLOCK)
    assert tiles.shape == (-(-OUT // native.TILE), blocks, native.TILE_BLOCK_BYTES)
    for got, original in zip(native.unpack_int4(tiles, OUT), (codes, scales, lows)):
        assert torch.equal(got, original)
    filler = native.unpack_int4(tiles, tiles.shape[0] * native.TILE)
    assert all(part[OUT:].eq(0).all() for part in filler) and len(filler[0]) > OUT
    x = torch.randn(3, in_features, generator=torch.Generator().manual_seed(3))
    first, last = 62, 125  # tiles: rows 992 .. 1999
    for variant in native.variants("int4"):
        whole = native.int4_matvec(x, tiles, OUT, variant)
        part = native.int4_matvec(x, tiles[first:last], (last - first) * native.TILE, variant)
        assert torch.equal(part, whole[:, first * native.TILE : last * native.TILE])
        assert torch.equal(native.int4_matvec(x, tiles[first:], OUT - first * native.TILE, variant),
                           whole[:, first * native.TILE :])
    count = tiles.shape[0]
    with pytest.raises(RuntimeError, match=f"{OUT + 16} rows need {count + 1} int4 tiles of 16, not {count}"):
        native.int4_matvec(x, tiles, OUT + 16)


def test_float16_block_values_keep_int4s_error(kernels):
    """Storing each block's scale and low in float16 instead of float32 changes the weight's quantisation
    error by far less than 1%."""
    weight = torch.randn(256, 2048) * 0.02
    codes, scales, lows = native.quantize_int4(weight)
    error32 = (native.dequantize_int4_reference(codes, scales, lows, 2048) - weight).norm()
    error16 = (native.dequantize_int4_reference(codes, scales.half(), lows.half(), 2048) - weight).norm()
    assert abs(error16 / error32 - 1) < 0.01


@pytest.mark.parametrize("in_features", IN)
def test_dequantising_fills_the_buffer_with_the_weight(kernels, in_features, threads):
    _, (codes, scales), _, _ = case("int8", 1, in_features)
    buffer = torch.full((OUT, in_features), float("nan"))
    assert torch.equal(native.dequantize_int8(codes, scales, buffer), codes.float() * scales[:, None])
    _, (tiles, out), _, _ = case("int4", 1, in_features)
    codes, scales, lows = native.unpack_int4(tiles, out)
    expected = native.dequantize_int4_reference(codes, scales, lows, in_features)
    got = native.dequantize_int4(tiles, buffer)
    allowed = 2.0**-22 * (expected.abs() + lows.float().abs().repeat_interleave(native.BLOCK, 1)[:, :in_features])
    assert ((got - expected).abs() <= allowed).all()  # a fused multiply-add may round once instead of twice


# ---------------------------------------------------------------------------------------------------------
# The build: cached, and never a crash.
# ---------------------------------------------------------------------------------------------------------
PROBE = textwrap.dedent("""
    import json, sys
    from speedups import native
    library = native.library()
    print(json.dumps({"built": library is not None, "reason": native.why_unavailable(),
                      "compiled": "torch.utils.cpp_extension" in sys.modules}))
""")


def probe(**environment):
    """A fresh Python loading the kernels with `environment`: (its report, its stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **environment}
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


# ---------------------------------------------------------------------------------------------------------
# decoding.cpp: RMSNorm, and RoPE with the write into the KV cache, against llama-models' own code.
# ---------------------------------------------------------------------------------------------------------
ROUNDING_FLIPS = 1e-3  # 16 bits: where a float32 result lands near a rounding boundary, a different summation
# order may round it the other way (one unit in the last place), rarely


def assert_same_up_to_rounding(ours, theirs):
    """float32: within a few units in the last place; 16 bits: equal but for rare one-unit rounding flips."""
    spacing = torch.finfo(theirs.dtype).eps  # relative spacing of neighbouring numbers: one unit in the last place
    ulps = (ours.double() - theirs.double()).abs() / (theirs.double().abs() * spacing).clamp(min=1e-30)
    if theirs.dtype == torch.float32:
        assert ulps.max() <= 8
    else:
        assert ulps.max() <= 1 and (ours != theirs).double().mean() <= ROUNDING_FLIPS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 2048), (2, 7, 100), (300, 33)])
def test_rms_norm_is_llama_models(kernels, dtype, shape, threads):
    """Rows whose mean square is near epsilon (so that a lost epsilon shows), every dtype, one row to a prompt
    chunk's many (threaded), dims that are and are not multiples of the 16 partial sums."""
    generator = torch.Generator().manual_seed(shape[-1])
    norm = llama_model.RMSNorm(shape[-1], eps=1e-5)
    norm.weight.data = torch.randn(shape[-1], generator=generator)
    norm = norm.to(dtype)
    x = (torch.randn(shape, generator=generator) * torch.rand(shape[:-1] + (1,), generator=generator) * 0.01).to(dtype)
    with torch.no_grad():
        assert_same_up_to_rounding(native.rms_norm(x, norm.weight, norm.eps), norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch, seqlen, start", [(1, 1, 0), (1, 1, 37), (3, 5, 11), (2, 64, 0)])
def test_rotate_into_cache_is_llama_models_rope_and_cache_writes(kernels, dtype, batch, seqlen, start, threads):
    """The queries llama-models' apply_rotary_emb returns, and the caches as GroupedQueryAttention's own writes
    leave them: rotated keys and the values at positions start .. start + seqlen - 1 of the first `batch` rows,
    every other entry untouched (max_batch 4 > batch)."""
    heads, kv_heads, head_dim, max_seq = 8, 2, 16, 80
    generator = torch.Generator().manual_seed(batch * 100 + seqlen)
    qkv = torch.randn(batch, seqlen, (heads + 2 * kv_heads) * head_dim, generator=generator).to(dtype)
    angles = torch.rand(seqlen, head_dim // 2, generator=generator) * 100
    rotations = torch.polar(torch.ones_like(angles), angles)  # (seqlen, head_dim / 2) complex, as freqs_cis
    cache_k, cache_v = (torch.randn(4, kv_heads, max_seq, head_dim, generator=generator).to(dtype) for _ in range(2))
    expected_k, expected_v = cache_k.clone(), cache_v.clone()
    xq, xk, xv = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    xq, xk = llama_model.apply_rotary_emb(xq.reshape(batch, seqlen, heads, head_dim),
                                         xk.reshape(batch, seqlen, kv_heads, head_dim), freqs_cis=rotations)
    expected_k[:batch, :, start : start + seqlen] = xk.transpose(1, 2)
    expected_v[:batch, :, start : start + seqlen] = xv.reshape(batch, seqlen, kv_heads, head_dim).transpose(1, 2)
    queries = native.rotate_into_cache(qkv, torch.view_as_real(rotations), cache_k, cache_v, start, heads, kv_heads)
    assert queries.shape == (batch, heads, seqlen, head_dim)
    assert_same_up_to_rounding(queries, xq.transpose(1, 2))
    assert_same_up_to_rounding(cache_k, expected_k)
    assert torch.equal(cache_v, expected_v)


def test_rotate_into_cache_past_the_cache_is_one_clear_error(kernels):
    cache = torch.zeros(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match=r"positions 7 \.\. 8 are past the cache's 8"):
        native.rotate_into_cache(torch.zeros(1, 2, 12 * 16), torch.zeros(2, 8, 2), cache, cache.clone(), 7, 8, 2)


def test_a_second_process_loads_the_cached_build(kernels):
    report, stderr = probe()
    assert report == {"built": True, "reason": None, "compiled": False}
    assert "compiling" not in stderr


@pytest.mark.parametrize("compiler", ["no-such-compiler", "/nonexistent/c++"])
def test_without_a_compiler_the_kernels_are_unavailable_in_one_line(compiler, tmp_path):
    report, stderr = probe(CXX=compiler, XDG_CACHE_HOME=str(tmp_path))
    assert report == {"built": False, "reason": f"no C++ compiler ({compiler} is not on PATH; set CXX to one)",
                      "compiled": False}
    assert stderr == "" and list(tmp_path.iterdir()) == []


def fake_compiler(folder, seconds=0):
    """A 'compiler' that reports a version, then fails every compile (after `seconds`), noting when it ran and
    in which build folder (ninja runs it there)."""
    script = folder / "fake-c++"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$1" = "--version" ]; then echo "fake-c++ 1.0"; exit 0; fi
        case "$*" in *" -c "*)
            echo "start $(date +%s.%N) $PWD" >> {folder}/compiles; sleep {seconds}
            echo "end $(date +%s.%N) $PWD" >> {folder}/compiles;;
        esac
        echo "quantized.cpp:1:1: error: this compiler compiles nothing" >&2
        exit 1
        """))
    script.chmod(0o755)
    return script


def test_a_failing_build_is_one_line_and_leaves_no_build_behind(tmp_path):
    cache = tmp_path / "cache"
    report, stderr = probe(CXX=str(fake_compiler(tmp_path)), XDG_CACHE_HOME=str(cache))
    assert not report["built"]
    assert report["reason"].startswith("the C++ build failed: ") and "\n" not in report["reason"]
    assert [path.name for path in (cache / native.CACHE_FOLDER).iterdir()] == [native.LOCK_FILE]
    assert "compiling speedups' C++ kernels" in stderr


def test_an_unwritable_cache_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    report, _ = probe(CXX=str(fake_compiler(tmp_path)), XDG_CACHE_HOME=str(tmp_path / "file"))
    assert not report["built"] and report["reason"].startswith(f"cannot write to {tmp_path / 'file'}")


def test_processes_starting_together_build_one_at_a_time(tmp_path):
    """torchrun starts its processes together: the build lock lets one compile at a time (the other waits, then
    finds the build done; here the fake compiler fails, so each tries in turn)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CXX": str(fake_compiler(tmp_path, seconds=2)),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    processes = [subprocess.Popen([sys.executable, "-c", PROBE], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    stderrs = [process.communicate(timeout=600)[1] for process in processes]
    builds = {}  # build folder: the times its compiles started and ended (its sources compile side by side)
    for line in (tmp_path / "compiles").read_text().splitlines():
        _, time, folder = line.split()
        builds.setdefault(folder, []).append(float(time))
    assert len(builds) == 2 and all(len(times) == 2 * len(native.SOURCES) for times in builds.values())
    first, second = sorted(builds.values(), key=min)
    assert max(first) < min(second)  # one build ended before the other began: never two at once
    assert any("waiting for another process" in stderr for stderr in stderrs)
