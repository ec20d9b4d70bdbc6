"""The kernels: every product a linear layer can run, which weight layout each reads, and for which rows.

A kernel computes x @ weight.T for x (rows, in) on one layout of layouts.py. Which is fastest depends on
the CPU, the number format and the rows per product, so calibration.py times them where they run; KERNELS
is the table it chooses from, and what KERNELS=name,... (the setting) can name.

Why the candidates differ. A one-row product reads each weight once for one multiply-add, so it is as
fast as the kernel streams weights. oneDNN's kernels are built for many rows: they read the weight in a
blocked layout of their own (tiles of output channels x inputs, neighbouring inputs side by side, as the
CPU's bfloat16 dot-product instructions (AVX-512 bfloat16, AMX) consume them). Given the plain (out, in)
weight, oneDNN rearranges it inside every call, which on a few rows costs more than the multiplying;
PackedLinear rearranges it once at load time. PyTorch's own matrix-vector code widens each bfloat16
weight to float32 and multiplies, so on a CPU with few cores arithmetic, not memory, can be its limit.
Which wins depends on the CPU: measure, never assume.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from speedups import native
from speedups.layouts import (INT4_GROUP, INT8_MAX, ROW_CLASSES, BlockInt4Linear, Int4Linear, Int8Linear,
                              PackedInt8Linear, PackedLinear, PlainLinear)


@dataclass(frozen=True)
class Kernel:
    name: str
    layout: type  # the FastLinear subclass whose weight it reads
    rows: tuple  # the row classes it serves
    devices: tuple  # device types it runs on
    run: object  # (module, x (rows, in)) -> (rows, out)
    timed_rows: tuple = ()  # the row classes it is timed for, where fewer than it serves (default: all it serves)
    input_rounding: object = None  # x -> x as the kernel rounds it before multiplying (None: not rounded)
    dtypes: tuple = ()  # the dtypes of x it takes (default: any)
    candidate: bool = True  # timed by the calibration; else only run when KERNELS names it
    ours: bool = False  # one of the project's own kernels (native.py): only where they were built

    @property
    def candidate_rows(self):
        return self.timed_rows or self.rows


@contextmanager
def onednn_disabled():
    """Within: PyTorch's own CPU kernels instead of oneDNN's (a process-wide switch, restored on exit)."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def mv_product(module, x):
    return torch.mv(module.weight, x[0]).unsqueeze(0)


def native_product(module, x):
    with onednn_disabled():
        return F.linear(x, module.weight)


def int8_matmul(x, weight, scales):
    """x @ (weight * scales[:, None]).T for an int8 weight (out, in) and x (rows, in): PyTorch's int8-weight
    kernel where it has one (CPU, mps), else a temporary 16-bit copy of the weight."""
    if x.device.type in ("cpu", "mps"):
        return torch._weight_int8pack_mm(x, weight, scales)  # reads 1 byte per weight
    return int8_copy_matmul(x, weight, scales)


def int8_copy_matmul(x, weight, scales):
    return F.linear(x, weight.to(x.dtype)) * scales  # a prompt chunk, or a device without the kernel


def per_token_int8(x):
    """x (rows, in) as int8 codes and one float32 scale per row (token): x ~= codes * scale."""
    scales = x.abs().amax(dim=1, keepdim=True).float().clamp_(min=torch.finfo(torch.float32).tiny) / INT8_MAX
    return (x / scales).round_().to(torch.int8), scales  # (rows, in), (rows, 1)


def int8_int8_matmul(x, weight, scales):
    """x @ (weight * scales[:, None]).T with x rounded to 8 bits per token: PyTorch's int8 x int8 product
    (int32 sums: 127 * 127 * in fits for in < 133,000) on the weight as stored, (out, in)."""
    codes, x_scales = per_token_int8(x)
    return (torch._int_mm(codes, weight.t()) * x_scales * scales).to(x.dtype)


def per_token_rounding(x):
    """x as int8_int8_matmul multiplies it: rounded to 8 bits per token."""
    codes, scales = per_token_int8(x)
    return codes.float() * scales


def round_activations(kernel, x):
    """The input x (rows, in) as the kernel rounds it before multiplying, in float32."""
    return kernel.input_rounding(x) if kernel.input_rounding else x.float()


WIDEN_ELEMENTS = 2**21  # weights widened at a time (8 MiB of float32: a block that stays in the CPU's caches)


class WideningBuffer:
    """Where a block of a weight is widened (prompt chunks): one buffer of WIDEN_ELEMENTS numbers per dtype,
    reused by every layer."""

    def __init__(self):
        self.buffers = {}

    def view(self, rows, columns, dtype=torch.float32):
        if dtype not in self.buffers:
            with torch.inference_mode(False):  # a normal tensor, which any later call may write into
                self.buffers[dtype] = torch.empty(WIDEN_ELEMENTS, dtype=dtype)
        return self.buffers[dtype][: rows * columns].view(rows, columns)


WIDENED = WideningBuffer()


@torch.no_grad()  # the buffer is shared: a weight that requires grad must not tie it into a graph
def widened_product(x, module, widen, rows_multiple=1, dtype=torch.float32):
    """x @ weight.T in `dtype`, the weight widened a block of rows at a time by widen(start, end, buffer), which
    fills the buffer with rows start .. end - 1 in dtype (start a multiple of rows_multiple: int4's whole tiles);
    a prompt chunk's rows share the widening. float32's
    matrix product is several times faster than bfloat16's on CPUs without bfloat16 instructions; with them
    (AVX512-BF16, AMX), bfloat16's is the faster, which the 8- and 4-bit weights reach by widening to it."""
    wide = x.to(dtype)
    out = torch.empty(x.shape[0], module.out_features, dtype=dtype)
    step = max(1, WIDEN_ELEMENTS // module.in_features // rows_multiple) * rows_multiple
    for start in range(0, module.out_features, step):
        end = min(start + step, module.out_features)
        out[:, start:end] = F.linear(wide, widen(start, end, WIDENED.view(end - start, module.in_features, dtype)))
    return out.to(x.dtype)


def float32_product(module, x):
    return widened_product(x, module, lambda start, end, buffer: buffer.copy_(module.weight[start:end]))


def int8_float32_product(module, x):
    """A prompt chunk on an int8 weight: each block of rows dequantized into float32, then float32's product.
    Our C++ loop dequantizes in one pass where it was built; PyTorch's multiply, the fallback, is slower."""
    if native.library() is not None:
        scales = float32_scales(module)
        return widened_product(x, module, lambda start, end, buffer: native.dequantize_int8(
            module.weight[start:end], scales[start:end], buffer))
    scales = module.scales.float()[:, None]
    return widened_product(x, module, lambda start, end, buffer: torch.mul(module.weight[start:end],
                                                                           scales[start:end], out=buffer))


ONEDNN_ZERO_POINT = 128  # oneDNN's int8 x int8 kernels take unsigned activations: codes + 128, zero point 128


def onednn_int8_matmul(module, x):
    """The same product through oneDNN's quantized linear on PackedInt8Linear's weight: its activation scale
    is one number, so each row is first divided by its own scale (the product is linear in each row). The
    codes go in as unsigned bytes with a zero point: oneDNN's fast kernels take those (signed activations
    took a slow path, a thousand times slower, on an AVX-512 CPU here)."""
    codes, x_scales = per_token_int8(x)
    unsigned = (codes.to(torch.int16) + ONEDNN_ZERO_POINT).to(torch.uint8)
    out = torch.ops.onednn.qlinear_pointwise(unsigned, 1.0, ONEDNN_ZERO_POINT, module.weight, module.weight_scales,
                                             module.zero_points, None, 1.0, 0, torch.float32, "none", [], "")
    return (out * x_scales).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# The project's own kernels (native.py builds quantized.cpp): x rounded to 8 bits per block of 32 inside the
# call, then integer dot products with 8- or 4-bit weights; bfloat16 weights widened in registers. Each comes
# in one variant per instruction set; the kernel without a suffix is the fastest this CPU runs.
# ---------------------------------------------------------------------------------------------------------
def float32_scales(module):
    """An Int8Linear's scales in float32, as the int8 kernel reads them (kept while the buffer is the same)."""
    kept = module.__dict__.get("float32_scales")
    if kept is None or kept[0] is not module.scales:
        kept = module.__dict__["float32_scales"] = (module.scales, module.scales.float().contiguous())
    return kept[1]


def block_rounding(x):
    """x as the project's kernels multiply it: rounded to 8 bits per block of 32 inputs."""
    codes, scales, _ = native.quantize_activations_reference(x)
    blocks = codes.float().view(codes.shape[0], -1, native.BLOCK) * scales[..., None]
    return blocks.flatten(1)[:, : x.shape[-1]]


def our_bf16_product(module, x, variant):
    return native.bf16_matvec(x, module.weight, variant)


def our_int8_product(module, x, variant):
    return native.int8_matvec(x, module.weight, float32_scales(module), variant)


def our_int4_product(module, x, variant):
    return native.int4_matvec(x, module.weight, module.out_features, variant)


def int4_float32_product(module, x):
    """A prompt chunk on our 4-bit layout: each block of rows dequantized into float32, then float32's product."""
    return widened_product(x, module, lambda start, end, buffer: native.dequantize_int4(
        int4_tiles(module, start, end), buffer), native.TILE)


def int4_bfloat16_product(module, x):
    """The same, each block dequantized into float32 and rounded to bfloat16, then bfloat16's product."""
    def widen(start, end, buffer):
        block = WIDENED.view(end - start, module.in_features)  # float32
        native.dequantize_int4(int4_tiles(module, start, end), block)
        return buffer.copy_(block)

    return widened_product(x, module, widen, native.TILE, torch.bfloat16)


def int4_tiles(module, start, end):
    """The tiles that hold rows start .. end - 1 of a BlockInt4Linear (start: a whole number of tiles)."""
    return module.weight[start // native.TILE : -(-end // native.TILE)]


NATIVE_VARIANTS = {  # native.variants(): the instruction sets each of our kernels comes in, fastest first
    "int8": ("avx512vnni", "avxvnni", "avx2", "scalar"), "int4": ("avx512vnni", "avxvnni", "avx2", "scalar"),
    "bf16": ("avx512bf16", "avx512", "avx2", "scalar")}


def native_kernels(family, kind, layout, run, rows, dtypes=(), input_rounding=None):
    """The kernel named `family` (our `kind` kernel's fastest variant here) and one per variant (family-avx2,
    ...), which only KERNELS=name runs: timing the slower ones would only cost time."""
    variants = NATIVE_VARIANTS[kind]
    return [Kernel(f"{family}-{variant}" if variant else family, layout, rows, ("cpu",),
                   lambda m, x, variant=variant: run(m, x, variant), input_rounding=input_rounding, dtypes=dtypes,
                   candidate=not variant, ours=True) for variant in ("", *variants)]


ALL_ROWS, ANY_DEVICE = ROW_CLASSES, ("cpu", "cuda", "mps")
KERNELS = {kernel.name: kernel for kernel in (  # the candidates
    Kernel("mv", PlainLinear, ("one",), ANY_DEVICE, mv_product),  # torch.mv: PyTorch's matrix-vector kernel
    Kernel("linear", PlainLinear, ALL_ROWS, ANY_DEVICE, lambda m, x: F.linear(x, m.weight)),  # oneDNN on x86
    Kernel("linear-native", PlainLinear, ALL_ROWS, ("cpu",), native_product),  # F.linear with oneDNN off
    Kernel("packed", PackedLinear, ALL_ROWS, ("cpu",),
           lambda m, x: torch.ops.mkldnn._linear_pointwise(x, m.weight, None, "none", [], "")),
    Kernel("linear-f32", PlainLinear, ("chunk",), ("cpu",), float32_product),
    *native_kernels("bf16-mv", "bf16", PlainLinear, our_bf16_product, ("one", "few"), dtypes=(torch.bfloat16,)),
    Kernel("w8", Int8Linear, ALL_ROWS, ("cpu", "mps"), lambda m, x: int8_matmul(x, m.weight, m.scales)),
    Kernel("w8-copy", Int8Linear, ALL_ROWS, ANY_DEVICE, lambda m, x: int8_copy_matmul(x, m.weight, m.scales),
           ("chunk",)),  # copying the weight to read it once loses to every kernel but for chunks
    Kernel("w8a8", Int8Linear, ALL_ROWS, ("cpu",), lambda m, x: int8_int8_matmul(x, m.weight, m.scales),
           input_rounding=per_token_rounding),
    Kernel("w8a8-onednn", PackedInt8Linear, ALL_ROWS, ("cpu",), onednn_int8_matmul,
           input_rounding=per_token_rounding),
    Kernel("w8-f32", Int8Linear, ("chunk",), ("cpu",), int8_float32_product),
    *native_kernels("q8", "int8", Int8Linear, our_int8_product, ALL_ROWS, input_rounding=block_rounding),
    Kernel("int4", Int4Linear, ALL_ROWS, ("cpu",), lambda m, x: torch._weight_int4pack_mm_for_cpu(
        x, m.weight, INT4_GROUP, m.scales_and_zeros)),
    *native_kernels("q4", "int4", BlockInt4Linear, our_int4_product, ALL_ROWS, input_rounding=block_rounding),
    Kernel("q4-f32", BlockInt4Linear, ("chunk",), ("cpu",), int4_float32_product),
    Kernel("q4-bf16", BlockInt4Linear, ("chunk",), ("cpu",), int4_bfloat16_product, dtypes=(torch.bfloat16,)),
)}
DEFAULT_KERNEL = {  # a layout's kernel for a row class that nothing was timed for
    PlainLinear: {"one": "linear", "few": "linear", "chunk": "linear"},
    PackedLinear: dict.fromkeys(ROW_CLASSES, "packed"),
    Int8Linear: {"one": "w8", "few": "w8", "chunk": "w8-copy"},
    PackedInt8Linear: dict.fromkeys(ROW_CLASSES, "w8a8-onednn"),
    Int4Linear: dict.fromkeys(ROW_CLASSES, "int4"),
    BlockInt4Linear: {"one": "q4", "few": "q4", "chunk": "q4-f32"},
}


def base_layout(quantize, ours):
    """What each format's layers are converted to first: the layout every layer holds unless another measures
    faster. 4-bit weights: ours where our kernels were built (`ours`), else PyTorch's packing."""
    if quantize == "int4":
        return BlockInt4Linear if ours else Int4Linear
    return {"": PlainLinear, "int8": Int8Linear}[quantize]


def use(module, names, few_rows):
    """Give a layer the kernels named per row class ({row class: name})."""
    module.use({rows: KERNELS[name] for rows, name in names.items()}, few_rows)
