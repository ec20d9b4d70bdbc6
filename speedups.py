"""The fast path: what makes decoding fast and lean without being part of the model's story.

Both scripts call `speedups.apply(model, device, dtype, quantize)` once, in load_model, after the weights
are loaded and before the model moves to its device. It swaps the module classes below into llama-models'
Transformer, so `print(model)` shows what runs:

    GroupedQueryAttention  llama-models' Attention, without copying the shared key-value heads
    LastPositionLogits     the output layer, for the last position only
    MatVecLinear           a linear layer whose single-row products use PyTorch's own matrix-vector kernel
    PackedLinear           a linear layer whose weight is laid out once for oneDNN's several-row kernels
    Int8Linear, Int4Linear a linear layer with 8-bit or 4-bit weights (QUANTIZE=int8 / int4)

Nothing here changes what the model computes, except rounding and the 8- or 4-bit weights asked for.
run_inference.py explains each idea where its story reaches it; benchmarks/bench_kernels.py measures each
kernel on your CPU. With SPEEDUPS=0 neither script calls this module: llama-models' code runs as written.
"""

import ctypes
import mmap
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region, reduce_from_model_parallel_region
from llama_models.llama3.model import apply_rotary_emb
from torch import nn

QUANTIZE_BLOCK_ROWS = 4096  # rows of a weight converted at a time: bounds the conversion's temporary memory
INT4_PACK_ROWS = 64  # PyTorch's CPU int4 packing interleaves blocks of up to 64 rows: ours must hold whole ones
assert QUANTIZE_BLOCK_ROWS % INT4_PACK_ROWS == 0
INT8_MAX = 127  # symmetric 8-bit: -127 .. 127, one scale per output row
# The int8 kernel's time grows with every row; above this many rows a temporary 16-bit copy of the weight
# and the ordinary matrix product are faster. Measure: benchmarks/bench_kernels.py --rows 1,32,64,256
INT8_KERNEL_MAX_ROWS = 64
ERROR_SAMPLE = 8  # the quantisation error is measured on every 8th row: enough for two significant digits
INT4_GROUP = 32  # 4-bit: one scale and one offset per 32 consecutive weights of a row
INT4_LEVELS = 15  # 0 .. 15
INT4_MIDPOINT = 8  # PyTorch's int4 kernel computes (q - 8) * scale + zero
MADV_DONTNEED = 4  # madvise(): "this process no longer needs these pages" (Linux)


# ---------------------------------------------------------------------------------------------------------
# The one call.
# ---------------------------------------------------------------------------------------------------------
def apply(model, device, dtype, quantize="", progress=None):
    """Swap the fast modules into a loaded llama-models Transformer whose weights are still on the CPU
    (memory-mapped). The KV caches it leaves are shapes on the meta device: load_model allocates them."""
    args = model.params
    for layer in model.layers:
        layer.attention = GroupedQueryAttention(layer.attention, args.max_batch_size, args.max_seq_len)
    make = linear_maker(device, dtype, args.max_batch_size, quantize)
    layers = linear_layers(model)
    for done, (parent, name, layer) in enumerate(layers):  # the largest first, while little else is converted
        setattr(parent, name, make(layer))
        trim_heap()  # freed temporaries of the conversion go back to the operating system
        if progress:
            progress(done + 1, len(layers))
    model.output = LastPositionLogits(model.output)
    return model


def linear_maker(device, dtype, rows, quantize):
    """The linear module class for this job, as a function of a fairscale layer."""
    if quantize == "int8":
        return Int8Linear
    if quantize == "int4":
        return Int4Linear
    if packs_weights(device, dtype, rows):
        return lambda layer: PackedLinear(layer, dtype, rows)
    return MatVecLinear


def linear_layers(model):
    """(parent module, attribute name, layer) for every fairscale linear layer, the largest weight first."""
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, (ColumnParallelLinear, RowParallelLinear))]
    return sorted(found, key=lambda item: -item[2].weight.numel())


def describe(model):
    """One line: how many of each fast module the model holds, and the error of 8- or 4-bit weights."""
    counts, errors = {}, []
    for module in model.modules():
        if isinstance(module, (GroupedQueryAttention, LastPositionLogits, FastLinear)):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
        if hasattr(module, "relative_error"):
            errors.append(module.relative_error)
    line = ", ".join(f"{count} x {name}" for name, count in counts.items())
    if errors:
        line += (f"; quantised weights' relative error {sum(errors) / len(errors):.2%} on average, "
                 f"{max(errors):.2%} at most (also each layer's output error on random inputs)")
    return line


# ---------------------------------------------------------------------------------------------------------
# Attention.
# ---------------------------------------------------------------------------------------------------------
class GroupedQueryAttention(nn.Module):
    """llama-models' Attention (the same projections, RoPE and mask) with its KV cache laid out
    (batch, kv_heads, seq, head_dim) and PyTorch's fused attention reading each key-value head in place for
    the n_rep query heads that share it, instead of copying it n_rep times. The cache keeps the model's
    dtype; the fused kernel accumulates in float32."""

    def __init__(self, attention, max_batch_size, max_seq_len):
        super().__init__()
        self.n_local_heads, self.n_local_kv_heads = attention.n_local_heads, attention.n_local_kv_heads
        self.n_rep, self.head_dim = attention.n_rep, attention.head_dim
        self.wq, self.wk, self.wv, self.wo = attention.wq, attention.wk, attention.wv, attention.wo
        cache_shape = (max_batch_size, self.n_local_kv_heads, max_seq_len, self.head_dim)
        self.cache_k = torch.empty(cache_shape, device="meta")  # a shape: load_model allocates it
        self.cache_v = torch.empty(cache_shape, device="meta")

    def forward(self, x, start_pos, freqs_cis, mask):
        batch, seqlen, _ = x.shape
        xq = self.wq(x).view(batch, seqlen, self.n_local_heads, self.head_dim)
        xk = self.wk(x).view(batch, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = self.wv(x).view(batch, seqlen, self.n_local_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)  # llama-models' own RoPE
        end = start_pos + seqlen
        self.cache_k[:batch, :, start_pos:end] = xk.transpose(1, 2)  # (batch, kv_heads, seqlen, head_dim)
        self.cache_v[:batch, :, start_pos:end] = xv.transpose(1, 2)
        keys, values = self.cache_k[:batch, :, :end], self.cache_v[:batch, :, :end]  # (batch, kv_heads, end, head_dim)
        queries = xq.transpose(1, 2)  # (batch, heads, seqlen, head_dim); head h reads key-value head h // n_rep
        if seqlen == 1:  # decoding: each key-value head's n_rep queries as n_rep rows, no mask needed
            grouped = queries.reshape(batch, self.n_local_kv_heads, self.n_rep, self.head_dim)
            output = F.scaled_dot_product_attention(grouped, keys, values)  # (batch, kv_heads, n_rep, head_dim)
        else:  # a prompt chunk: the causal mask llama-models built for it
            output = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, enable_gqa=True)
        output = output.reshape(batch, self.n_local_heads, seqlen, self.head_dim).transpose(1, 2)
        return self.wo(output.reshape(batch, seqlen, -1))  # (batch, seqlen, dim)

    def extra_repr(self):
        return (f"heads={self.n_local_heads}, kv_heads={self.n_local_kv_heads}, head_dim={self.head_dim}, "
                f"cache={tuple(self.cache_k.shape)} (batch, kv_heads, seq, head_dim)")


class LastPositionLogits(nn.Module):
    """The output layer applied to the last position only: generation reads no other position's scores."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, h):  # (batch, seqlen, dim) -> (batch, 1, vocab)
        return self.layer(h[:, -1:])


# ---------------------------------------------------------------------------------------------------------
# Linear layers: fairscale's, with the product chosen for the number of rows and the weights' format.
# ---------------------------------------------------------------------------------------------------------
class FastLinear(nn.Module):
    """A fairscale linear layer's forward with another product, then the same collective: a row-parallel
    layer sums the processes' partial products, the output layer gathers the processes' slices."""

    def __init__(self, layer):
        super().__init__()
        self.out_features, self.in_features = layer.weight.shape  # this process's slice
        self.reduce = isinstance(layer, RowParallelLinear)
        self.gather = isinstance(layer, ColumnParallelLinear) and layer.gather_output

    def forward(self, x):  # x: (..., in), as many rows as its leading dimensions hold
        out = self.product(x.reshape(-1, self.in_features)).view(*x.shape[:-1], -1)  # (rows, in) -> (..., out)
        if self.reduce:
            return reduce_from_model_parallel_region(out)
        return gather_from_model_parallel_region(out) if self.gather else out

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}"


class MatVecLinear(FastLinear):
    """Plain weights. One row on a CPU goes to PyTorch's own matrix-vector kernel; several rows go where
    PyTorch sends them (oneDNN on x86), which is faster for them. Measure: benchmarks/bench_kernels.py"""

    def __init__(self, layer):
        super().__init__(layer)
        self.weight = layer.weight  # the same Parameter: a tied weight stays tied

    def product(self, x):
        if x.device.type == "cpu" and x.shape[0] == 1:  # one row
            with onednn_disabled():
                return F.linear(x, self.weight)
        return F.linear(x, self.weight)


@contextmanager
def onednn_disabled():
    """Within: PyTorch's own CPU kernels instead of oneDNN's (a process-wide switch, restored on exit)."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def packs_weights(device, dtype, rows):
    """Whether weights are packed for oneDNN: several rows per step (beam search), on an x86 CPU where
    oneDNN has fast kernels for the dtype (bfloat16 needs AVX-512 bfloat16 or AMX instructions)."""
    if device.type != "cpu" or rows == 1 or not torch.backends.mkldnn.is_available():
        return False
    x86 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    if dtype == torch.bfloat16:
        return x86 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return x86 and dtype == torch.float32


class PackedLinear(FastLinear):
    """The weight rearranged once into oneDNN's blocked layout for `rows` rows per product; the plain
    weight's file pages are let go, so the model stays resident once."""

    def __init__(self, layer, dtype, rows):
        super().__init__(layer)
        plain = layer.weight.detach()
        packed = torch.ops.mkldnn._reorder_linear_weight(plain.to(dtype), rows)  # an opaque "mkldnn" tensor
        self.weight = nn.Parameter(packed, requires_grad=False)
        release_pages(plain)

    def product(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")  # no bias, nothing fused


class Int8Linear(FastLinear):
    """8-bit weights, one scale per output row: weight ~= int8 * scale. Few rows: PyTorch's int8-weight
    kernel (CPU, mps); many rows, or other devices: a temporary 16-bit copy of the weight."""

    def __init__(self, layer):
        super().__init__(layer)
        weight, scales, self.relative_error = quantize_int8(layer.weight.detach())
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("scales", scales)  # a buffer: model.to(dtype) converts it with the rest

    def product(self, x):
        return int8_matmul(x, self.weight, self.scales)


def quantize_int8(weight):
    """(int8 weight, one float32 scale per row, relative error) such that weight ~= int8 * scale[:, None],
    converted a block of rows at a time, each block's file pages let go once done. The relative error
    |weight - int8 * scale| / |weight| (Frobenius norms, measured on every ERROR_SAMPLE-th row) is also the
    layer's expected relative output error for inputs with independent entries."""
    scales = torch.empty(weight.shape[0])
    quantized = torch.empty(weight.shape, dtype=torch.int8)
    error = ErrorSum()
    for start in range(0, weight.shape[0], QUANTIZE_BLOCK_ROWS):
        block = weight[start : start + QUANTIZE_BLOCK_ROWS]
        rows = block.to(torch.float32, copy=True)  # a copy even if float32: changed in place below
        low, high = torch.aminmax(rows, dim=1)
        block_scales = torch.maximum(-low, high).clamp_(min=torch.finfo(torch.float32).tiny) / INT8_MAX
        codes = rows.div_(block_scales[:, None]).round_()  # whole numbers in -127 .. 127: exact in int8
        quantized[start : start + QUANTIZE_BLOCK_ROWS] = codes
        scales[start : start + QUANTIZE_BLOCK_ROWS] = block_scales
        error.add(block[::ERROR_SAMPLE], codes[::ERROR_SAMPLE] * block_scales[::ERROR_SAMPLE, None])
        release_pages(block)
    return quantized, scales, error.relative()


class ErrorSum:
    """Accumulates |approximation - exact|^2 and |exact|^2 over blocks of a weight."""

    def __init__(self):
        self.error, self.norm = 0.0, 0.0

    def add(self, exact, approximation):
        exact = exact.float()
        self.error += torch.linalg.vector_norm(approximation - exact).item() ** 2
        self.norm += torch.linalg.vector_norm(exact).item() ** 2

    def relative(self):
        return (self.error / self.norm) ** 0.5 if self.norm else 0.0


def int8_matmul(x, weight, scales):
    """x @ (weight * scales[:, None]).T for an int8 weight (out, in) and x (rows, in)."""
    if x.device.type in ("cpu", "mps") and x.shape[0] <= INT8_KERNEL_MAX_ROWS:
        return torch._weight_int8pack_mm(x, weight, scales)  # reads 1 byte per weight
    return F.linear(x, weight.to(x.dtype)) * scales  # a prompt chunk, or a device without the kernel


class Int4Linear(FastLinear):
    """4-bit weights in groups of INT4_GROUP along each row, each group with its own scale and offset
    (weight ~= q * scale + minimum, q in 0..15), packed for PyTorch's CPU int4 kernel."""

    def __init__(self, layer):
        super().__init__(layer)
        weight, scales_and_zeros, self.relative_error = quantize_int4(layer.weight.detach())
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # converted to the model's dtype by .to()

    def product(self, x):
        return torch._weight_int4pack_mm_for_cpu(x, self.weight, INT4_GROUP, self.scales_and_zeros)


def quantize_int4(weight):
    """(packed 4-bit weight, scales and zeros (in / INT4_GROUP, out, 2), relative error as in quantize_int8),
    in the layout of PyTorch's kernel."""
    out_features, in_features = weight.shape
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8)  # two 4-bit codes per byte
    scales_and_zeros = torch.empty(out_features, in_features // INT4_GROUP, 2)
    error = ErrorSum()
    for start in range(0, out_features, QUANTIZE_BLOCK_ROWS):
        block = weight[start : start + QUANTIZE_BLOCK_ROWS]
        groups = block.to(torch.float32, copy=True).view(block.shape[0], -1, INT4_GROUP)  # (rows, groups, 32)
        low, high = torch.aminmax(groups, dim=2)
        scale = ((high - low) / INT4_LEVELS).clamp_(min=torch.finfo(torch.float32).tiny)
        codes = groups.sub_(low[..., None]).div_(scale[..., None]).round_().clamp_(0, INT4_LEVELS)
        packed[start : start + QUANTIZE_BLOCK_ROWS] = torch._convert_weight_to_int4pack_for_cpu(
            codes.view(block.shape).to(torch.int32), 1)  # whole packing blocks: see INT4_PACK_ROWS
        zero = low + INT4_MIDPOINT * scale  # the kernel's offset is the value of the middle code
        scales_and_zeros[start : start + QUANTIZE_BLOCK_ROWS] = torch.stack([scale, zero], dim=2)
        sample = slice(None, None, ERROR_SAMPLE)
        error.add(block[sample], (codes[sample] * scale[sample, :, None] + low[sample, :, None]).view(-1, in_features))
        release_pages(block)
    return packed, scales_and_zeros.transpose(0, 1).contiguous(), error.relative()  # kernel's layout: (groups, out, 2)


# ---------------------------------------------------------------------------------------------------------
# Memory: pages of the memory-mapped checkpoint, and the C heap.
# ---------------------------------------------------------------------------------------------------------
def c_library():
    """The C library's functions (madvise, malloc_trim), or None where it cannot be opened this way (Windows)."""
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):
        return None


def release_pages(tensor):
    """madvise(MADV_DONTNEED): the memory-mapped pages wholly inside `tensor` leave this process's resident
    memory (Linux; macOS keeps them resident). Reading them again fetches them from the file (only a tied
    embedding table is read again, a row per token)."""
    libc = c_library()
    if libc is None or not hasattr(libc, "madvise") or tensor.device.type != "cpu":
        return
    start = -(-tensor.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE  # first whole page
    end = (tensor.data_ptr() + tensor.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


def trim_heap():
    """glibc's malloc_trim(0): freed memory that malloc kept for reuse goes back to the operating system
    (glibc keeps a pool per thread and does not always reuse it; elsewhere there is nothing to do)."""
    libc = c_library()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
