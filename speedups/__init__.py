"""The fast path: what makes decoding fast and lean without being part of the model's story.

Both scripts call `speedups.apply(model, device, dtype, quantize)` once, in load_model, after the weights
are loaded and before the model moves to its device. It swaps the module classes below into llama-models'
Transformer, so `print(model)` shows what runs:

    GroupedQueryAttention   llama-models' Attention, without copying the shared key-value heads
    LastPositionLogits      the output layer, for the last position only (every_position(model): for all)
    PlainLinear             a linear layer with its weight as stored (16 or 32 bits)
    PackedLinear            the weight laid out once for oneDNN's kernels
    Int8Linear              8-bit weights, one scale per row (QUANTIZE=int8)
    PackedInt8Linear        the same 8-bit weights laid out once for oneDNN's int8 x int8 kernel
    Int4Linear              4-bit weights in groups of 32 (QUANTIZE=int4)

Each linear layer keeps one weight layout (one of the classes above) and picks a kernel for it by the
number of rows in the product: one (decoding one sequence), a few (beam search: up to max_batch_size),
or a prompt chunk. Which layout and kernels are fastest differs from CPU to CPU (bench_kernels.py and
benchmarks/README.md show two machines disagreeing), so on a CPU they are measured where they run:
`calibrate` times every stock candidate in KERNELS on the model's own weights (at most
CALIBRATION_SECONDS), and `choose` picks from the timings; the timings are cached in a small JSON file
under the user's cache directory ($XDG_CACHE_HOME or ~/.cache, folder CACHE_FOLDER), keyed by the CPU,
torch version, threads, format, rows and weight shape, so later loads measure nothing. Other devices
keep a fixed rule (`rule_plan`).

With KERNELS=measure on a CPU with several threads, StepThreads also picks the number of threads while
decoding (1 or all), by timing steps: another process on one core makes PyTorch's threads wait for each other.

The environment variable KERNELS overrides the measuring:
    KERNELS=measure          (the default) measure on a CPU, or read the cached timings
    KERNELS=rule             no measuring, threads left alone: the fixed rule (deterministic: the tests use it)
    KERNELS=mv,w8a8          these kernels (names in KERNELS) wherever they serve the format and rows;
                             the rule elsewhere

Why the candidates differ. A one-row product reads each weight once for one multiply-add, so it is as
fast as the kernel streams weights. oneDNN's kernels are built for many rows: they read the weight in a
blocked layout of their own (tiles of output channels x inputs, neighbouring inputs side by side, as the
CPU's bfloat16 dot-product instructions (AVX-512 bfloat16, AMX) consume them). Given the plain (out, in)
weight, oneDNN rearranges it inside every call, which on a few rows costs more than the multiplying;
PackedLinear rearranges it once at load time. PyTorch's own matrix-vector code widens each bfloat16
weight to float32 and multiplies, so on a CPU with few cores arithmetic, not memory, can be its limit.
Which wins depends on the CPU: measure, never assume.

Memory while converting. Converted weights (8- or 4-bit, or packed) are built a block of rows at a time
from the memory-mapped file; release_pages then madvise(MADV_DONTNEED)s the block's file pages, so the
process never holds the bfloat16 model beside its converted copy (Linux; macOS keeps the pages). glibc's
malloc keeps freed temporaries in per-thread pools it does not always reuse; trim_heap (malloc_trim) hands
them back after each layer, which made the int8 load's peak the same from run to run.

Nothing here changes what the model computes, except rounding, the 8- or 4-bit weights asked for, and
(kernels w8a8, w8a8-onednn) activations rounded to 8 bits per token. DTYPE and QUANTIZE are never changed.
run_inference.py explains each idea where its story reaches it; benchmarks/bench_kernels.py measures each
kernel on your CPU. With SPEEDUPS=0 neither script calls this module: llama-models' code runs as written.
"""

import ctypes
import functools
import hashlib
import json
import mmap
import os
import platform
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region, reduce_from_model_parallel_region
from llama_models.llama3.model import apply_rotary_emb
from torch import nn

QUANTIZE_BLOCK_ROWS = 4096  # rows of a weight converted at a time: bounds the conversion's temporary memory
INT4_PACK_ROWS = 64  # PyTorch's CPU int4 packing interleaves blocks of up to 64 rows: ours must hold whole ones
assert QUANTIZE_BLOCK_ROWS % INT4_PACK_ROWS == 0
INT8_MAX = 127  # symmetric 8-bit: -127 .. 127, one scale per output row (weights) or per token (activations)
ERROR_SAMPLE = 8  # the quantisation error is measured on every 8th row: enough for two significant digits
INT4_GROUP = 32  # 4-bit: one scale and one offset per 32 consecutive weights of a row
INT4_LEVELS = 15  # 0 .. 15
INT4_MIDPOINT = 8  # PyTorch's int4 kernel computes (q - 8) * scale + zero

KERNELS_SETTING = "KERNELS"  # the environment variable: measure (default), rule, or kernel names
CALIBRATION_SECONDS = 2.0  # the most the timing may take, once per cache key (paging the weights in aside)
CALIBRATION_ROUNDS = 3  # each candidate is timed up to this many times, interleaved; the fastest counts
CALIBRATION_VERSION = 2  # part of the cache key: raise it when what is measured or how it is chosen changes
SWEEP_BYTES = 2**30  # the weights one timed pass streams: more than this machine's caches (a 480 MiB L3)
CHUNK_ROWS = 64  # a prompt chunk is timed with this many rows (compute-bound: one layer per shape)
SAMPLE_MAX_WEIGHTS = 2**26  # larger weights (the output layer) are not copied into another layout to be timed
CACHE_FOLDER = "llama-scripts"  # under $XDG_CACHE_HOME or ~/.cache
CACHE_FILE = "kernels.json"


@dataclass(frozen=True)
class Format:
    """What a QUANTIZE format costs and where it runs. support/'s checks (settings.py, memory.py) read this table."""
    bits: int  # bits per weight in memory, for the memory check (0: the dtype's own)
    devices: tuple  # device types with kernels for it
    load: str  # what loading costs


FORMATS = {
    "": Format(0, ("cpu", "cuda", "mps"), "nothing: the file's weights are used in place (memory-mapped), or "
               "copied once where DTYPE or the device differ"),
    "int8": Format(8, ("cpu", "cuda", "mps"), "every weight read once and rounded to 8 bits, one scale per row: "
                   "about 1 s per GB of weights on 2 cores"),
    "int4": Format(5, ("cpu",), "every weight read once and rounded to 4 bits with a 16-bit scale and offset per 32 "
                   "weights (5 bits a weight in all), packed for PyTorch's CPU kernel: about 2 s per GB"),
}


# ---------------------------------------------------------------------------------------------------------
# The one call.
# ---------------------------------------------------------------------------------------------------------
def apply(model, device, dtype, quantize="", progress=None):
    """Swap the fast modules into a loaded llama-models Transformer whose weights are still on the CPU
    (memory-mapped). The KV caches it leaves are shapes on the meta device: load_model allocates them."""
    args = model.params
    for layer in model.layers:
        layer.attention = GroupedQueryAttention(layer.attention, args.max_batch_size, args.max_seq_len)
    layers = linear_layers(model)
    base = BASE_LAYOUT[quantize]
    for done, (parent, name, layer) in enumerate(layers):  # the largest first, while little else is converted
        setattr(parent, name, base(layer))
        trim_heap()  # freed temporaries of the conversion go back to the operating system
        if progress:
            progress(done + 1, len(layers))
    in_order = [module for module in model.modules() if isinstance(module, FastLinear)]  # the model's order
    plans, model.kernel_report = plan_kernels(in_order, device, dtype, quantize, args.max_batch_size)
    for parent, name, _ in layers:
        module = getattr(parent, name)
        layout, kernels = plans[module.shape]
        if type(module) is not layout:  # another layout measured faster: each layer converted once
            module = layout(module, dtype, args.max_batch_size)
            setattr(parent, name, module)
            trim_heap()
        module.use(kernels, args.max_batch_size)
    threads = torch.get_num_threads()
    choosing = device.type == "cpu" and threads > 1 and kernels_setting() == "measure"
    model.output = LastPositionLogits(model.output, StepThreads(threads) if choosing else None)
    return model


def linear_layers(model):
    """(parent module, attribute name, layer) for every fairscale linear layer, the largest weight first."""
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, (ColumnParallelLinear, RowParallelLinear))]
    return sorted(found, key=lambda item: -item[2].weight.numel())


def describe(model):
    """One line: how many of each fast module the model holds, the error of 8- or 4-bit weights, and which
    kernels run, chosen how (with the measured rates)."""
    counts = {}
    errors = []
    for module in model.modules():
        if isinstance(module, (GroupedQueryAttention, LastPositionLogits, FastLinear)):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
        if hasattr(module, "relative_error"):
            errors.append(module.relative_error)
    line = ", ".join(f"{count} x {name}" for name, count in counts.items())
    if errors:
        line += (f"; quantised weights' relative error {sum(errors) / len(errors):.2%} on average, "
                 f"{max(errors):.2%} at most (also each layer's output error on random inputs)")
    if getattr(model, "kernel_report", ""):
        line += "; " + model.kernel_report
    return line


# ---------------------------------------------------------------------------------------------------------
# Attention.
# ---------------------------------------------------------------------------------------------------------
class GroupedQueryAttention(nn.Module):
    """llama-models' Attention (the same projections, RoPE and mask) with its KV cache laid out
    (batch, kv_heads, seq, head_dim) and PyTorch's fused attention reading each key-value head in place for
    the n_rep query heads that share it, instead of copying it n_rep times. The cache keeps the model's
    dtype; the fused kernel accumulates in float32."""

    cache_positions_dim = 2  # which dimension of cache_k and cache_v counts positions

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
    """The output layer applied to the last position only: generation reads no other position's scores.
    It ends every forward pass, so it also keeps the decode steps' clock for `threads` (a StepThreads, or
    None where the thread count is left alone)."""

    def __init__(self, layer, threads=None):
        super().__init__()
        self.layer = layer
        self.threads = threads
        self.every_position = False  # set by every_position(model)

    def forward(self, h):  # (batch, seqlen, dim) -> (batch, 1, vocab)
        if self.threads:
            self.threads.step(decoding=h.shape[1] == 1)
        if self.every_position:
            return self.layer(h)  # (batch, seqlen, vocab)
        return self.layer(h[:, -1:])


@contextmanager
def every_position(model):
    """Within: the model's forward returns the logits of every position it is fed, as llama-models' own output
    layer does (speculative decoding's verify pass reads them all); a model without LastPositionLogits
    (SPEEDUPS=0) always does."""
    output = model.output
    if not isinstance(output, LastPositionLogits):
        yield
        return
    output.every_position = True
    try:
        yield
    finally:
        output.every_position = False


class StepThreads:
    """The number of CPU threads, chosen while decoding by timing steps. PyTorch's threads wait for each
    other at the end of every operation: when another process occupies one of the cores, a 2-thread decode
    step waits for the thread that is not running, and took 3 to 6 times as long as a 1-thread step here
    (benchmarks/README.md). So every PERIOD decode steps, TRIAL steps run with the other count (1 or all the
    threads PyTorch had), and the count whose median step was shorter is kept. Steps are timed from one
    decode step's end to the next, so the prompt's chunks and what the script does between steps are left out
    as long as they are alike for both counts."""

    PERIOD = 32  # decode steps between trials of the other thread count
    TRIAL = 4  # steps of each trial

    def __init__(self, threads):
        self.counts = (threads, 1)
        self.current = threads
        self.steps = {count: [] for count in self.counts}  # recent step times per count
        self.last = None
        self.taken = 0

    def step(self, decoding):
        now = time.perf_counter()
        if decoding and self.last is not None:
            recent = self.steps[torch.get_num_threads()]
            recent.append(now - self.last)
            del recent[: -self.TRIAL]
            self.taken += 1
            self.switch()
        self.last = time.perf_counter() if decoding else None

    def switch(self):
        threads = torch.get_num_threads()
        if threads != self.current:  # a trial of the other count: over once it has TRIAL steps
            if len(self.steps[threads]) >= self.TRIAL:
                self.current = min(self.counts, key=lambda count: median(self.steps[count]))
                torch.set_num_threads(self.current)
        elif self.taken % self.PERIOD == self.TRIAL:  # the first trial after TRIAL steps, then every PERIOD
            other = self.counts[1] if self.current == self.counts[0] else self.counts[0]
            self.steps[other].clear()
            torch.set_num_threads(other)

    def __repr__(self):
        return f"StepThreads(now {torch.get_num_threads()}, choosing between {self.counts[0]} and 1)"


def median(values):
    return sorted(values)[len(values) // 2] if values else float("inf")


# ---------------------------------------------------------------------------------------------------------
# Linear layers: fairscale's, with one weight layout each and a kernel per number of rows.
# ---------------------------------------------------------------------------------------------------------
ROW_CLASSES = ("one", "few", "chunk")  # 1 row; 2 .. max_batch_size rows (beam search); more (a prompt chunk)


def row_class(rows, few_rows):
    if rows == 1:
        return "one"
    return "few" if rows <= few_rows else "chunk"


class FastLinear(nn.Module):
    """A fairscale linear layer's forward with another product, then the same collective: a row-parallel
    layer sums the processes' partial products, the output layer gathers the processes' slices. Each
    subclass is a weight layout; `kernels` names the kernel (in KERNELS) used for each row class."""

    FORMAT = ""  # the QUANTIZE format the layout holds

    def __init__(self, layer):
        super().__init__()
        self.out_features, self.in_features = layer.out_features, layer.in_features  # this process's slice
        self.reduce, self.gather = layer.reduce, layer.gather
        self.kernels = dict(DEFAULT_KERNEL[type(self)])
        self.few_rows = 1

    @property
    def shape(self):
        return self.out_features, self.in_features

    def use(self, kernels, few_rows):
        self.kernels = dict(kernels)
        self.few_rows = few_rows

    def forward(self, x):  # x: (..., in), as many rows as its leading dimensions hold
        rows = x.reshape(-1, self.in_features)  # (rows, in)
        out = KERNELS[self.kernels[row_class(rows.shape[0], self.few_rows)]].run(self, rows)
        out = out.view(*x.shape[:-1], -1)  # (..., out)
        if self.reduce:
            return reduce_from_model_parallel_region(out)
        return gather_from_model_parallel_region(out) if self.gather else out

    def extra_repr(self):
        kernels = ", ".join(f"{rows}: {name}" for rows, name in self.kernels.items())
        return f"in={self.in_features}, out={self.out_features}, kernels=({kernels})"


def fairscale_facts(layer):
    """The fairscale layer's shape and collective, as FastLinear keeps them."""
    layer.out_features, layer.in_features = layer.weight.shape
    layer.reduce = isinstance(layer, RowParallelLinear)
    layer.gather = isinstance(layer, ColumnParallelLinear) and layer.gather_output
    return layer


class PlainLinear(FastLinear):
    """The weight as stored (16 or 32 bits): PyTorch's matrix-vector kernel, its own matrix kernel, or
    oneDNN's, as measured."""

    def __init__(self, layer):
        super().__init__(fairscale_facts(layer))
        self.weight = layer.weight  # the same Parameter: a tied weight stays tied


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
    """The fixed rule's packing: several rows per step (beam search), on an x86 CPU where oneDNN has fast
    kernels for the dtype (bfloat16 needs AVX-512 bfloat16 or AMX instructions)."""
    if device.type != "cpu" or rows == 1 or not torch.backends.mkldnn.is_available():
        return False
    x86 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    if dtype == torch.bfloat16:
        return x86 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return x86 and dtype == torch.float32


class PackedLinear(FastLinear):
    """The weight rearranged once into oneDNN's blocked layout for `rows` rows per product; the plain
    weight's file pages are let go, so the model stays resident once."""

    def __init__(self, plain, dtype, rows, release=True):
        super().__init__(plain)
        weight = plain.weight.detach()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), rows)  # an opaque "mkldnn" tensor
        self.weight = nn.Parameter(packed, requires_grad=False)
        if release:
            release_pages(weight)


class Int8Linear(FastLinear):
    """8-bit weights (out, in), one scale per output row: weight ~= int8 * scale. Kernels: PyTorch's
    int8-weight kernel, int8 x int8 with the activations rounded per token, or a temporary 16-bit copy."""

    FORMAT = "int8"

    def __init__(self, layer):
        super().__init__(fairscale_facts(layer))
        weight, scales, self.relative_error = quantize_int8(layer.weight.detach())
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("scales", scales)  # a buffer: model.to(dtype) converts it with the rest


class PackedInt8Linear(FastLinear):
    """Int8Linear's 8-bit weights rearranged once for oneDNN's int8 x int8 kernel (AMX or VNNI on x86); the
    activations are rounded to 8 bits per token (kernel w8a8-onednn)."""

    FORMAT = "int8"

    def __init__(self, int8, dtype, rows, release=True):  # the 8-bit weight is not a file's: nothing to release
        super().__init__(int8)
        self.relative_error = int8.relative_error
        packed = torch.ops.onednn.qlinear_prepack(int8.weight, [1, self.in_features])
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.weight_scales = int8.scales.float()  # float32 as oneDNN wants it: an attribute, not a buffer
        self.zero_points = torch.zeros(self.out_features, dtype=torch.int64)


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
        self.error = 0.0
        self.norm = 0.0

    def add(self, exact, approximation):
        exact = exact.float()
        self.error += torch.linalg.vector_norm(approximation - exact).item() ** 2
        self.norm += torch.linalg.vector_norm(exact).item() ** 2

    def relative(self):
        return (self.error / self.norm) ** 0.5 if self.norm else 0.0


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


def onednn_int8_matmul(module, x):
    """The same product through oneDNN's quantized linear on PackedInt8Linear's weight: its activation scale
    is one number, so each row is first divided by its own scale (the product is linear in each row)."""
    codes, x_scales = per_token_int8(x)
    out = torch.ops.onednn.qlinear_pointwise(codes, 1.0, 0, module.weight, module.weight_scales,
                                             module.zero_points, None, 1.0, 0, torch.float32, "none", [], "")
    return (out * x_scales).to(x.dtype)


class Int4Linear(FastLinear):
    """4-bit weights in groups of INT4_GROUP along each row, each group with its own scale and offset
    (weight ~= q * scale + minimum, q in 0..15), packed for PyTorch's CPU int4 kernel."""

    FORMAT = "int4"

    def __init__(self, layer):
        super().__init__(fairscale_facts(layer))
        weight, scales_and_zeros, self.relative_error = quantize_int4(layer.weight.detach())
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # converted to the model's dtype by .to()


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
        dequantized = codes[sample] * scale[sample, :, None] + low[sample, :, None]
        error.add(block[sample], dequantized.view(-1, in_features))
        release_pages(block)
    # the kernel's layout: (groups, out, 2)
    return packed, scales_and_zeros.transpose(0, 1).contiguous(), error.relative()


# ---------------------------------------------------------------------------------------------------------
# The kernels, and how each layer's are chosen.
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernel:
    layout: type  # the FastLinear subclass whose weight it reads
    rows: tuple  # the row classes it serves
    devices: tuple  # device types it runs on
    run: object  # (module, x (rows, in)) -> (rows, out)
    timed_rows: tuple = ()  # the row classes it is timed for, where fewer than it serves (default: all it serves)

    @property
    def candidate_rows(self):
        return self.timed_rows or self.rows


def mv_product(module, x):
    return torch.mv(module.weight, x[0]).unsqueeze(0)


def native_product(module, x):
    with onednn_disabled():
        return F.linear(x, module.weight)


ALL_ROWS, ANY_DEVICE = ROW_CLASSES, ("cpu", "cuda", "mps")
KERNELS = {  # the stock candidates
    "mv": Kernel(PlainLinear, ("one",), ANY_DEVICE, mv_product),  # torch.mv: PyTorch's matrix-vector kernel
    "linear": Kernel(PlainLinear, ALL_ROWS, ANY_DEVICE, lambda m, x: F.linear(x, m.weight)),  # oneDNN on x86
    "linear-native": Kernel(PlainLinear, ALL_ROWS, ("cpu",), native_product),  # F.linear with oneDNN off
    "packed": Kernel(PackedLinear, ALL_ROWS, ("cpu",),
                     lambda m, x: torch.ops.mkldnn._linear_pointwise(x, m.weight, None, "none", [], "")),
    "w8": Kernel(Int8Linear, ALL_ROWS, ("cpu", "mps"), lambda m, x: int8_matmul(x, m.weight, m.scales)),
    "w8-copy": Kernel(Int8Linear, ALL_ROWS, ANY_DEVICE, lambda m, x: int8_copy_matmul(x, m.weight, m.scales),
                      ("chunk",)),  # copying the weight to read it once loses to every kernel but for chunks
    "w8a8": Kernel(Int8Linear, ALL_ROWS, ("cpu",), lambda m, x: int8_int8_matmul(x, m.weight, m.scales)),
    "w8a8-onednn": Kernel(PackedInt8Linear, ALL_ROWS, ("cpu",), onednn_int8_matmul),
    "int4": Kernel(Int4Linear, ALL_ROWS, ("cpu",), lambda m, x: torch._weight_int4pack_mm_for_cpu(
        x, m.weight, INT4_GROUP, m.scales_and_zeros)),
}
BASE_LAYOUT = {"": PlainLinear, "int8": Int8Linear, "int4": Int4Linear}  # what each format converts to first
DEFAULT_KERNEL = {  # a layout's kernel for a row class that nothing was timed for
    PlainLinear: {"one": "linear", "few": "linear", "chunk": "linear"},
    PackedLinear: dict.fromkeys(ROW_CLASSES, "packed"),
    Int8Linear: {"one": "w8", "few": "w8", "chunk": "w8-copy"},
    PackedInt8Linear: dict.fromkeys(ROW_CLASSES, "w8a8-onednn"),
    Int4Linear: dict.fromkeys(ROW_CLASSES, "int4"),
}


def choose(seconds, decode_class):
    """The choice for one weight shape, a pure function of timings: seconds {row class: {kernel: seconds per
    product}} (measured, cached, or the rule's stand-ins) -> (layout, {row class: kernel}). The layout is
    that of the kernel fastest for the rows decoding uses (decode_class: "one", or "few" for beam search);
    every row class then takes the fastest kernel timed on that layout, or the layout's default."""
    decoding = seconds[decode_class]
    layout = KERNELS[min(decoding, key=decoding.get)].layout
    kernels = {}
    for rows in ROW_CLASSES:
        options = {name: s for name, s in seconds.get(rows, {}).items()
                   if KERNELS[name].layout is layout and rows in KERNELS[name].rows}
        kernels[rows] = min(options, key=options.get) if options else DEFAULT_KERNEL[layout][rows]
    return layout, kernels


def rule_seconds(quantize, device, dtype, few_rows):
    """Stand-in timings (1 s each) for the fixed rule: what runs on devices other than CPUs, and with
    KERNELS=rule. One row: PyTorch's own kernel on CPUs; several rows: oneDNN's, on weights packed for it
    (beam search); int8: PyTorch's int8-weight kernel (CPU, mps), a 16-bit copy for prompt chunks."""
    if quantize == "int4":
        return {rows: {"int4": 1.0} for rows in ROW_CLASSES}
    if quantize == "int8":
        kernel = "w8" if device.type in KERNELS["w8"].devices else "w8-copy"
        return {"one": {kernel: 1.0}, "few": {kernel: 1.0}, "chunk": {"w8-copy": 1.0}}
    if device.type != "cpu":
        return {rows: {"linear": 1.0} for rows in ROW_CLASSES}
    if packs_weights(device, dtype, few_rows):
        return {rows: {"packed": 1.0} for rows in ROW_CLASSES}
    return {"one": {"linear-native": 1.0}, "few": {"linear": 1.0}, "chunk": {"linear": 1.0}}


def forced_seconds(names, quantize, device, dtype, few_rows):
    """The rule's stand-ins, with the named kernels (KERNELS=mv,w8a8) at 0 s wherever they serve."""
    seconds = rule_seconds(quantize, device, dtype, few_rows)
    for name in names:
        kernel = KERNELS[name]
        if kernel.layout.FORMAT == quantize and device.type in kernel.devices:
            for rows in kernel.rows:
                seconds[rows] = {**seconds.get(rows, {}), name: 0.0}
    return seconds


def kernels_setting():
    """KERNELS from the environment: "measure", "rule", or a list of kernel names."""
    value = os.environ.get(KERNELS_SETTING, "measure").strip() or "measure"
    if value in ("measure", "rule"):
        return value
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in KERNELS]
    if unknown:
        raise SystemExit(f"{KERNELS_SETTING}={value!r}: unknown kernel {', '.join(unknown)}; choose measure, rule, "
                         f"or names from: {', '.join(KERNELS)}")
    return names


def plan_kernels(modules, device, dtype, quantize, few_rows):
    """({weight shape: (layout, {row class: kernel})}, a short report of what was chosen and why)."""
    setting = kernels_setting()
    decode_class = "one" if few_rows == 1 else "few"
    shapes = {module.shape for module in modules}
    if setting == "measure" and device.type == "cpu":
        seconds, how = calibrate(modules, dtype, quantize, few_rows)
        plans = {shape: choose(seconds[shape], decode_class) for shape in shapes}
        return plans, how + "; " + rates_report(seconds, modules, plans, dtype, quantize, few_rows)
    seconds = rule_seconds(quantize, device, dtype, few_rows)
    how = f"kernels by the fixed rule on {device.type}"
    if setting == "rule":
        how = f"kernels by the fixed rule ({KERNELS_SETTING}=rule)"
    elif setting != "measure":
        seconds = forced_seconds(setting, quantize, device, dtype, few_rows)
        how = f"kernels forced by {KERNELS_SETTING}={','.join(setting)}"
    plan = choose(seconds, decode_class)
    used = ", ".join(f"{rows} {plan[1][rows]}" for rows in ROW_CLASSES)
    return dict.fromkeys(shapes, plan), f"{how}: {used}"


def rates_report(seconds, modules, plans, dtype, quantize, few_rows):
    """Per row class: GB/s of weights per kernel timed (over all the model's layers where timed), and the
    kernels chosen."""
    bits = FORMATS[quantize].bits or torch.finfo(dtype).bits
    count = {}
    for module in modules:
        count[module.shape] = count.get(module.shape, 0) + 1
    labels = {"one": "1 row", "few": f"{few_rows} rows", "chunk": f"{CHUNK_ROWS} rows"}
    parts = []
    for rows in ROW_CLASSES:
        weight_bytes, total = {}, {}
        for shape, by_rows in seconds.items():
            for name, s in by_rows.get(rows, {}).items():
                weight_bytes[name] = weight_bytes.get(name, 0) + count[shape] * shape[0] * shape[1] * bits / 8
                total[name] = total.get(name, 0) + count[shape] * s
        if not total:
            continue
        rates = sorted(((weight_bytes[name] / total[name] / 1e9, name) for name in total), reverse=True)
        chosen = sorted({plans[shape][1][rows] for shape in count})
        rates_text = ", ".join(f"{name} {rate:.1f}" for rate, name in rates)
        parts.append(f"{labels[rows]}: {rates_text} GB/s -> {'/'.join(chosen)}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Measuring the candidates on this CPU, once per cache key.
# ---------------------------------------------------------------------------------------------------------
def calibrate(modules, dtype, quantize, few_rows):
    """({weight shape: {row class: {kernel: seconds per product}}}, how they were obtained): from the cache
    file where it holds every key, else timed on the model's own weights and written to it.

    The base layout's kernels (PlainLinear, Int8Linear, ...) run on every layer of a pass that streams
    SWEEP_BYTES of the model's weights, as decoding does; another layout's (PackedLinear, PackedInt8Linear)
    on a copy of one layer per shape, timed in the same pass (the rest of the pass evicts it from the caches
    between timings) and freed before the model is converted. Prompt chunks (compute-bound) are timed on that
    one layer per shape. Candidates take turns, up to CALIBRATION_ROUNDS rounds within CALIBRATION_SECONDS
    (one round at least); the fastest round counts."""
    keys = {(shape, rows): cache_key(shape, rows, dtype, quantize, few_rows)
            for shape in {module.shape for module in modules} for rows in row_classes(few_rows)}
    cache = read_cache()
    if all(key in cache for key in keys.values()):
        seconds = {}
        for (shape, rows), key in keys.items():
            if cache[key]:
                seconds.setdefault(shape, {})[rows] = cache[key]
        return seconds, f"kernels measured on this CPU earlier (cached in {cache_path()})"
    seconds, warmup_s, timing_s = time_candidates(modules, dtype, quantize, few_rows)
    write_cache({key: seconds[shape].get(rows, {}) for (shape, rows), key in keys.items()})  # {}: nothing ran
    return seconds, (f"kernels measured on this CPU in {timing_s:.1f} s (+ {warmup_s:.1f} s reading the weights in), "
                     f"cached in {cache_path()}")


def row_classes(few_rows):
    return ROW_CLASSES if few_rows > 1 else ("one", "chunk")


def time_candidates(modules, dtype, quantize, few_rows):
    """({shape: {row class: {kernel: seconds}}}, seconds warming up, seconds timing)."""
    start = time.perf_counter()
    base, decode_class = BASE_LAYOUT[quantize], "one" if few_rows == 1 else "few"
    candidates = [name for name, kernel in KERNELS.items()
                  if kernel.layout.FORMAT == quantize and "cpu" in kernel.devices]
    sweep = timing_sweep(modules, dtype)
    samples = {}  # shape: its first layer in the sweep
    for module in sweep:
        samples.setdefault(module.shape, module)
    others = {}  # (layout, shape): a temporary copy of the sample in that layout
    for name in candidates:
        layout = KERNELS[name].layout
        for shape, sample in samples.items():
            if layout is not base and shape[0] * shape[1] <= SAMPLE_MAX_WEIGHTS and (layout, shape) not in others:
                others[layout, shape] = layout(sample, dtype, few_rows, release=False)
    chunk_samples = [sample for shape, sample in samples.items() if shape[0] * shape[1] <= SAMPLE_MAX_WEIGHTS]
    rows_in = {"one": 1, "few": few_rows, "chunk": CHUNK_ROWS}
    inputs = {(rows, n): torch.randn(rows_in[rows], n, dtype=dtype) for rows in row_classes(few_rows)
              for n in {module.in_features for module in sweep}}
    evict = KERNELS[DEFAULT_KERNEL[base]["one"]].run

    def one_pass(name, rows, modules=None):  # {shape: seconds per product}
        kernel, total, calls = KERNELS[name], {}, {}
        for module in modules or (sweep if rows != "chunk" else chunk_samples):
            x = inputs[rows, module.in_features]
            target = module if kernel.layout is base else others.get((kernel.layout, module.shape))
            if target is None or (kernel.layout is not base and module is not samples[module.shape]):
                if rows != "chunk":
                    evict(module, x[:1])  # streams the weight as decoding would, untimed
                continue
            begin = time.perf_counter()
            kernel.run(target, x)
            total[module.shape] = total.get(module.shape, 0.0) + time.perf_counter() - begin
            calls[module.shape] = calls.get(module.shape, 0) + 1
        return {shape: total[shape] / calls[shape] for shape in total}

    tasks = []
    with torch.inference_mode():
        for module in sweep:  # reads the memory-mapped weights in, and starts the threads
            evict(module, inputs["one", module.in_features])
        for rows in sorted(row_classes(few_rows), key=lambda rows: rows != decode_class):
            for name in candidates:
                if rows in KERNELS[name].candidate_rows:
                    try:  # once per shape: builds oneDNN's kernels
                        one_pass(name, rows, chunk_samples if rows == "chunk" else list(samples.values()))
                        tasks.append((name, rows))
                    except (RuntimeError, NotImplementedError):
                        pass  # not on this CPU or build
        timing_start = time.perf_counter()
        seconds = {}
        for round_ in range(CALIBRATION_ROUNDS):
            for name, rows in tasks:
                if (round_ or rows != decode_class) and time.perf_counter() - timing_start > CALIBRATION_SECONDS:
                    break  # out of time: what was timed decides (every kernel for decoding's rows once at least)
                for shape, s in one_pass(name, rows).items():
                    best = seconds.setdefault(shape, {}).setdefault(rows, {})
                    best[name] = min(best.get(name, s), s)
    return seconds, timing_start - start, time.perf_counter() - timing_start


def timing_sweep(modules, dtype):
    """The layers one timed pass runs: the last (the output layer) and the first ones in the model's order,
    up to SWEEP_BYTES; floating-point weights in another dtype than the run's are copied into it."""
    chosen, total = [modules[-1]], modules[-1].weight.nbytes
    for module in modules[:-1]:
        if total < SWEEP_BYTES or module.shape not in {other.shape for other in chosen}:  # every shape once
            chosen.append(module)
            total += module.weight.nbytes
    chosen = [copy_in_dtype(module, dtype) for module in chosen]
    return chosen


def copy_in_dtype(module, dtype):
    """The module itself, its scales in dtype (as model.to(dtype) leaves them), or, for a plain weight in another
    dtype, a stand-in holding a copy in dtype (converting the layer here would untie a tied weight)."""
    if not isinstance(module, PlainLinear):
        return module.to(dtype)
    if module.weight.dtype == dtype:
        return module
    return SimpleNamespace(weight=module.weight.detach().to(dtype), shape=module.shape, in_features=module.in_features,
                           out_features=module.out_features, reduce=module.reduce, gather=module.gather)


# ---------------------------------------------------------------------------------------------------------
# The cache of timings: a small JSON file, one entry per key.
# ---------------------------------------------------------------------------------------------------------
@functools.cache
def machine_key():
    """This CPU (its model name and a digest of its feature flags), the torch version and its threads."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = [line.split(":", 1)[1].strip() for line in lines if line.startswith(("flags", "Features"))]
    cpu = names[0] if names else platform.processor() or platform.machine()
    digest = hashlib.sha256((flags[0] if flags else "").encode()).hexdigest()[:12]
    return f"{cpu} flags:{digest} {platform.machine()} torch {torch.__version__} threads {torch.get_num_threads()}"


def cache_key(shape, rows, dtype, quantize, few_rows):
    format_ = f"{str(dtype).removeprefix('torch.')}{'/' + quantize if quantize else ''}"
    rows_count = {"one": 1, "few": few_rows, "chunk": CHUNK_ROWS}[rows]
    return (f"{machine_key()} | {format_} | {rows} rows {rows_count} | weight {shape[0]}x{shape[1]} "
            f"| choice v{CALIBRATION_VERSION}")


def cache_path():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / CACHE_FOLDER / CACHE_FILE


def read_cache():
    """The cached timings, or {} where the file is missing, unreadable or not what this module writes."""
    try:
        cache = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict):
        return {}
    return {key: value for key, value in cache.items() if isinstance(value, dict)
            and all(name in KERNELS and isinstance(s, (int, float)) for name, s in value.items())}


def write_cache(entries):
    """Add entries to the cache file atomically (a temporary file renamed over it): readers never see half a
    file, and a corrupt one is replaced. A cache that cannot be written only costs the next load a measurement."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as file:
            json.dump({**read_cache(), **entries}, file, indent=1, sort_keys=True)
        os.replace(file.name, path)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------------------
# Memory: pages of the memory-mapped checkpoint, and the C heap.
# ---------------------------------------------------------------------------------------------------------
@functools.cache
def c_library():
    """The C library's functions (madvise, malloc_trim), or None where it cannot be opened this way (Windows)."""
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):
        return None


def release_pages(tensor):
    """madvise(mmap.MADV_DONTNEED): the memory-mapped pages wholly inside `tensor` leave this process's resident
    memory (Linux; macOS keeps them resident). Reading them again fetches them from the file (only a tied
    embedding table is read again, a row per token)."""
    libc = c_library()
    if libc is None or not hasattr(libc, "madvise") or tensor.device.type != "cpu":
        return
    start = -(-tensor.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE  # first whole page
    end = (tensor.data_ptr() + tensor.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


def trim_heap():
    """glibc's malloc_trim(0): freed memory that malloc kept for reuse goes back to the operating system
    (glibc keeps a pool per thread and does not always reuse it; elsewhere there is nothing to do)."""
    libc = c_library()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
