"""The linear layers' weight layouts, and the quantizing that builds them.

Each class below replaces one of fairscale's linear layers and holds its weight in one layout; the
kernels that read each layout are in kernels.py, which FastLinear.use hands to the layer, one per row
class (one row, a few rows, a prompt chunk).

Memory while converting. Converted weights (8- or 4-bit, or packed) are built a block of rows at a time
from the memory-mapped file; release_pages then madvise(MADV_DONTNEED)s the block's file pages, so the
process never holds the bfloat16 model beside its converted copy (Linux; macOS keeps the pages). glibc's
malloc keeps freed temporaries in per-thread pools it does not always reuse; trim_heap (malloc_trim) hands
them back after each layer, which made the int8 load's peak the same from run to run.

Memory while decoding. Each step reads every weight once; the weights built here (joined, quantized) go in
weight_memory, which asks Linux to back them with 2 MiB pages, and so do the file's own weights that stay as
they are (wo, w2 and the output table in 16 bits: move_into_weight_memory copies them there, 2 MiB at a time,
a small part of the load; benchmarks/README.md, "The file's weights in 2 MiB pages", has what it costs and
buys).
"""

import ctypes
import functools
import mmap
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region, reduce_from_model_parallel_region
from torch import nn

from speedups import native

QUANTIZE_BLOCK_ROWS = 4096  # rows of a weight converted at a time: bounds the conversion's temporary memory
INT4_PACK_ROWS = 64  # PyTorch's CPU int4 packing interleaves blocks of up to 64 rows: ours must hold whole ones
assert QUANTIZE_BLOCK_ROWS % INT4_PACK_ROWS == 0
INT8_MAX = 127  # symmetric 8-bit: -127 .. 127, one scale per output row (weights) or per token (activations)
ERROR_SAMPLE = 8  # the quantisation error is measured on every 8th row: enough for two significant digits
INT4_GROUP = 32  # 4-bit: one scale and one offset per 32 consecutive weights of a row
INT4_LEVELS = 15  # 0 .. 15
INT4_MIDPOINT = 8  # PyTorch's int4 kernel computes (q - 8) * scale + zero


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

ROW_CLASSES = ("one", "few", "chunk")  # 1 row; a few (beam search's, a short prompt's); more (a prompt chunk)
FEW_ROWS = 16  # rows that still count as a few, whatever the beam width: each weight read once serves them all


def row_class(rows, few_rows):
    """The class of a product of `rows` rows, where beam search runs `few_rows` (max_batch_size) at a time."""
    if rows == 1:
        return "one"
    return "few" if rows <= max(few_rows, FEW_ROWS) else "chunk"


# ---------------------------------------------------------------------------------------------------------
# The layouts: fairscale's linear layers, with one weight layout each and a kernel per row class.
# ---------------------------------------------------------------------------------------------------------
class FastLinear(nn.Module):
    """A fairscale linear layer's forward with another product, then the same collective: a row-parallel
    layer sums the processes' partial products, the output layer gathers the processes' slices. Each
    subclass is a weight layout; `kernels` holds the kernel (kernels.Kernel) used for each row class."""

    FORMAT = ""  # the QUANTIZE format the layout holds

    def __init__(self, layer):
        super().__init__()
        self.out_features, self.in_features = layer.out_features, layer.in_features  # this process's slice
        self.reduce, self.gather = layer.reduce, layer.gather
        self.kernels = {}
        self.few_rows = 1

    @property
    def shape(self):
        return self.out_features, self.in_features

    def dequantized(self, rows):
        """The values of the first `rows` output rows, in float32: what a right product multiplies by."""
        raise NotImplementedError(f"{type(self).__name__} is not a base layout")

    def rows_view(self, start, end):
        """The output rows start .. end - 1 as an object the kernels read like this layer (its tensors are
        views: no copy), or None where the layout cannot be cut by rows (oneDNN's and PyTorch's packings)."""
        return None

    def view_of(self, start, end, **tensors):
        return SimpleNamespace(out_features=end - start, in_features=self.in_features, shape=(end - start,
                               self.in_features), **tensors)

    def use(self, kernels, few_rows):
        """kernels: {row class: kernels.Kernel}."""
        self.kernels = dict(kernels)
        self.few_rows = few_rows

    def forward(self, x):  # x: (..., in), as many rows as its leading dimensions hold
        rows = x.reshape(-1, self.in_features)  # (rows, in)
        out = self.kernels[row_class(rows.shape[0], self.few_rows)].run(self, rows)
        out = out.view(*x.shape[:-1], -1)  # (..., out)
        if self.reduce:
            return reduce_from_model_parallel_region(out)
        return gather_from_model_parallel_region(out) if self.gather else out

    def extra_repr(self):
        kernels = ", ".join(f"{rows}: {kernel.name}" for rows, kernel in self.kernels.items())
        return f"in={self.in_features}, out={self.out_features}, kernels=({kernels})"


class Concatenated:
    """Several of fairscale's column-parallel layers of one block (wq, wk, wv; or w1, w3) as one: their weights
    (this process's slices) one after the other by rows, so that one product computes all of them. The
    copy is made from the memory-mapped file when the layer is converted (one layer at a time), and the
    file's pages are then let go."""

    def __init__(self, layers):
        self.layers = layers
        self.sizes = [layer.weight.shape[0] for layer in layers]
        self.joined = None

    def numel(self):
        return sum(layer.weight.numel() for layer in self.layers)

    @property
    def weight(self):
        if self.joined is None:
            self.joined = nn.Parameter(joined_rows([layer.weight.detach() for layer in self.layers]),
                                       requires_grad=False)
            for layer in self.layers:
                release_pages(layer.weight)
        return self.joined


def from_file(layer):
    """Whether the layer's weight may be the memory-mapped file, whose pages can be let go once read (a
    Concatenated weight is a copy in memory: letting its pages go would zero them)."""
    return not isinstance(layer, Concatenated)


def fairscale_facts(layer):
    """The fairscale layer's shape and collective, as FastLinear keeps them (a Concatenated one has none). In
    one process the collectives return their input; fairscale's still cost an autograd call each (13 us, 33 a
    decode step), so FastLinear makes none there."""
    layer.out_features, layer.in_features = layer.weight.shape
    several = get_model_parallel_world_size() > 1
    layer.reduce = several and isinstance(layer, RowParallelLinear)
    layer.gather = several and isinstance(layer, ColumnParallelLinear) and layer.gather_output
    return layer


class PlainLinear(FastLinear):
    """The weight as stored (16 or 32 bits): PyTorch's matrix-vector kernel, its own matrix kernel, or
    oneDNN's, as measured."""

    def __init__(self, layer):
        super().__init__(fairscale_facts(layer))
        self.weight = layer.weight  # the same Parameter: a tied weight stays tied
        self.from_file = from_file(layer)  # the memory-mapped file's pages (move_into_weight_memory may copy them)

    def dequantized(self, rows):
        return self.weight[:rows].float()

    def rows_view(self, start, end):
        return self.view_of(start, end, weight=self.weight[start:end])


class PackedLinear(FastLinear):
    """The weight rearranged once into oneDNN's blocked layout for `rows` rows per product; the plain
    weight's file pages are let go, so the model stays resident once."""

    def __init__(self, plain, dtype, rows, release=True):
        super().__init__(plain)
        weight = plain.weight.detach()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), rows)  # an opaque "mkldnn" tensor
        self.weight = nn.Parameter(packed, requires_grad=False)
        if release and from_file(plain):
            release_pages(weight)


class Int8Linear(FastLinear):
    """8-bit weights (out, in), one scale per output row: weight ~= int8 * scale. Kernels: PyTorch's
    int8-weight kernel, int8 x int8 with the activations rounded per token, or a temporary 16-bit copy."""

    FORMAT = "int8"

    def __init__(self, layer):
        super().__init__(fairscale_facts(layer))
        weight, scales, self.relative_error = quantize_int8(layer.weight.detach(), from_file(layer))
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("scales", scales)  # a buffer: model.to(dtype) converts it with the rest

    def dequantized(self, rows):
        return self.weight[:rows].float() * self.scales[:rows, None].float()

    def rows_view(self, start, end):
        return self.view_of(start, end, weight=self.weight[start:end], scales=self.scales[start:end])


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


def quantize_int8(weight, release=True):
    """(int8 weight, one float32 scale per row, relative error) such that weight ~= int8 * scale[:, None],
    converted a block of rows at a time, each block's file pages let go once done. The relative error
    |weight - int8 * scale| / |weight| (Frobenius norms, measured on every ERROR_SAMPLE-th row) is also the
    layer's expected relative output error for inputs with independent entries."""
    scales = torch.empty(weight.shape[0])
    quantized = weight_memory(weight.shape, torch.int8)
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
        if release:
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


class BlockInt4Linear(FastLinear):
    """4-bit weights in blocks of INT4_GROUP along each row, each block with its own scale and minimum
    (weight ~= q * scale + minimum, q in 0..15: Int4Linear's numbers), laid out for the project's own kernels:
    the rows in tiles of native.TILE side by side, each tile's blocks one after the other, each block its rows'
    scales and minima (float16), then their codes (native.pack_int4), so that a kernel reads a tile in one
    stream and multiplies its rows at once."""

    FORMAT = "int4"

    def __init__(self, layer):
        super().__init__(fairscale_facts(layer))
        weight = layer.weight.detach()
        parts, error, sample = [], ErrorSum(), slice(None, None, ERROR_SAMPLE)
        for start in range(0, weight.shape[0], QUANTIZE_BLOCK_ROWS):  # whole tiles but in the last block
            block = weight[start : start + QUANTIZE_BLOCK_ROWS]
            codes, scales, lows = native.quantize_int4(block)
            scales, lows = scales.to(torch.float16), lows.to(torch.float16)  # as the kernels read them
            parts.append(native.pack_int4(codes, scales, lows))
            error.add(block[sample], native.dequantize_int4_reference(codes[sample], scales[sample], lows[sample],
                                                                      self.in_features))
            if from_file(layer):
                release_pages(block)
        self.relative_error = error.relative()
        self.weight = nn.Parameter(joined_rows(parts), requires_grad=False)  # (tiles, blocks, 320) uint8

    def unpacked(self, start, end):
        """(codes (rows, blocks * 32) uint8, scales, lows (rows, blocks) float16) of rows start .. end - 1."""
        first = start // native.TILE
        tiles = self.weight.detach()[first : -(-end // native.TILE)]
        parts = native.unpack_int4(tiles, end - first * native.TILE)  # from the first row of the first tile
        return tuple(part[start - first * native.TILE :] for part in parts)

    def codes(self, start, end):
        """The 4-bit codes of rows start .. end - 1, (rows, in) uint8."""
        return self.unpacked(start, end)[0][:, : self.in_features]

    def dequantized(self, rows):
        return native.dequantize_int4_reference(*self.unpacked(0, rows), self.in_features)

    def rows_view(self, start, end):
        if start % native.TILE or (end % native.TILE and end != self.out_features):  # whole tiles only
            return None
        return self.view_of(start, end, weight=self.weight[start // native.TILE : -(-end // native.TILE)])


class Int4Linear(FastLinear):
    """4-bit weights in groups of INT4_GROUP along each row, each group with its own scale and offset
    (weight ~= q * scale + minimum, q in 0..15), packed for PyTorch's CPU int4 kernel: quantized from the
    file's weights, or repacked from a BlockInt4Linear (the same numbers)."""

    FORMAT = "int4"

    def __init__(self, layer, dtype=None, rows=None, release=True):
        if isinstance(layer, BlockInt4Linear):
            super().__init__(layer)
            self.relative_error = layer.relative_error
            weight, scales_and_zeros = repack_int4(layer)
            scales_and_zeros = scales_and_zeros.to(dtype)  # as model.to(dtype) leaves a quantized layer's
        else:
            super().__init__(fairscale_facts(layer))
            self.first_rows = layer.weight.detach()[:INT4_PACK_ROWS].clone()  # see dequantized; before its pages go
            weight, scales_and_zeros, self.relative_error = quantize_int4(layer.weight.detach(), from_file(layer))
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # converted to the model's dtype by .to()

    def rows_view(self, start, end):
        if start % INT4_PACK_ROWS or end % INT4_PACK_ROWS:  # PyTorch's packing interleaves blocks of rows
            return None
        return self.view_of(start, end, weight=self.weight[start:end],
                            scales_and_zeros=self.scales_and_zeros[:, start:end].contiguous())

    def dequantized(self, rows):
        """PyTorch's packing cannot be read back cheaply: the first rows (at most INT4_PACK_ROWS), kept from the
        weight the layer was made from, are quantized again, the scales and zeros rounded as the kernel reads
        them. apply() drops them once the kernels are chosen."""
        assert rows <= len(self.first_rows)
        codes, scale, low = int4_groups(self.first_rows[:rows])
        zero = (low + INT4_MIDPOINT * scale).to(self.scales_and_zeros.dtype).float()
        scale = scale.to(self.scales_and_zeros.dtype).float()
        return ((codes - INT4_MIDPOINT) * scale[..., None] + zero[..., None]).view(rows, -1)


def quantize_int4(weight, release=True):
    """(packed 4-bit weight, scales and zeros (in / INT4_GROUP, out, 2), relative error as in quantize_int8),
    in the layout of PyTorch's kernel."""
    out_features, in_features = weight.shape
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8)  # two 4-bit codes per byte
    scales_and_zeros = torch.empty(out_features, in_features // INT4_GROUP, 2)
    error = ErrorSum()
    for start in range(0, out_features, QUANTIZE_BLOCK_ROWS):
        block = weight[start : start + QUANTIZE_BLOCK_ROWS]
        codes, scale, low = int4_groups(block)
        packed[start : start + QUANTIZE_BLOCK_ROWS] = torch._convert_weight_to_int4pack_for_cpu(
            codes.view(block.shape).to(torch.int32), 1)  # whole packing blocks: see INT4_PACK_ROWS
        zero = low + INT4_MIDPOINT * scale  # the kernel's offset is the value of the middle code
        scales_and_zeros[start : start + QUANTIZE_BLOCK_ROWS] = torch.stack([scale, zero], dim=2)
        sample = slice(None, None, ERROR_SAMPLE)
        dequantized = codes[sample] * scale[sample, :, None] + low[sample, :, None]
        error.add(block[sample], dequantized.view(-1, in_features))
        if release:
            release_pages(block)
    # the kernel's layout: (groups, out, 2)
    return packed, scales_and_zeros.transpose(0, 1).contiguous(), error.relative()


def repack_int4(block_int4):
    """A BlockInt4Linear's codes, scales and minima in PyTorch's int4 layout: (packed weight, scales and zeros)."""
    packed = torch.empty(block_int4.out_features, block_int4.in_features // 2, dtype=torch.uint8)
    for start in range(0, block_int4.out_features, QUANTIZE_BLOCK_ROWS):
        end = min(start + QUANTIZE_BLOCK_ROWS, block_int4.out_features)
        packed[start:end] = torch._convert_weight_to_int4pack_for_cpu(block_int4.codes(start, end).to(torch.int32), 1)
    _, scale, low = (part.float() for part in block_int4.unpacked(0, block_int4.out_features))
    zero = low + INT4_MIDPOINT * scale  # the kernel's offset is the value of the middle code
    return packed, torch.stack([scale, zero], dim=2).transpose(0, 1).contiguous()  # (groups, out, 2)


def int4_groups(block):
    """(codes (rows, groups, INT4_GROUP) in 0 .. 15 as floats, scale and minimum (rows, groups)) of a block of
    rows: weight ~= codes * scale + minimum."""
    groups = block.to(torch.float32, copy=True).view(block.shape[0], -1, INT4_GROUP)  # (rows, groups, 32)
    low, high = torch.aminmax(groups, dim=2)
    scale = ((high - low) / INT4_LEVELS).clamp_(min=torch.finfo(torch.float32).tiny)
    codes = groups.sub_(low[..., None]).div_(scale[..., None]).round_().clamp_(0, INT4_LEVELS)
    return codes, scale, low


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


HUGE_PAGE = 2 << 20  # bytes: a transparent huge page on x86-64 Linux (and on Arm with 4 KiB base pages)


def empty_in_huge_pages(shape, dtype):
    """An uninitialised tensor in fresh memory of which Linux may back every whole 2 MiB with one page
    (madvise(MADV_HUGEPAGE): transparent huge pages, where the system allows them), or None where it cannot
    be asked for (not Linux). Its head is aligned to 2 MiB; the tail past the last whole huge page keeps
    small pages, so nothing resident is wasted."""
    if not huge_pages_available():
        return None
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    memory = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE)  # anonymous; page-aligned, not 2 MiB
    raw = torch.frombuffer(memory, dtype=torch.uint8)  # holds `memory` open for as long as the tensor lives
    start = -raw.data_ptr() % HUGE_PAGE
    try:
        memory.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    except OSError:  # a kernel built without transparent huge pages
        return None
    return raw[start : start + nbytes].view(dtype).view(shape)


def weight_memory(shape, dtype):
    """Memory for a weight that every decoding step reads in full: empty_in_huge_pages where the system has
    them, else torch.empty. Why: the CPU translates each page's address before reading it; with 4 KiB pages
    the 1B model's 2.5 GB are 600,000 translations per token, far more than its translation cache (TLB)
    holds; with 2 MiB pages, 1,200. `python benchmarks/bench_decode.py --only minimal,minimal-small-pages`
    measures the difference in whole runs, `python benchmarks/bench_kernels.py` (its pages table) in the
    linear layers alone."""
    memory = empty_in_huge_pages(shape, dtype) if torch.Size(shape).numel() * dtype.itemsize >= HUGE_PAGE else None
    return memory if memory is not None else torch.empty(shape, dtype=dtype)


COPY_BYTES = 2 << 20  # move_into_weight_memory copies this much at a time (a whole tensor's copy_ was slower)


def move_into_weight_memory(weight):
    """A weight of the memory-mapped file (a Parameter) copied into weight_memory, a piece at a time, each piece's
    file pages released once copied; the Parameter keeps its identity (a tied embedding table follows). Where no
    2 MiB pages can be asked for, nothing is done."""
    if not huge_pages_available() or weight.device.type != "cpu" or weight.nbytes < HUGE_PAGE:
        return
    copy = weight_memory(weight.shape, weight.dtype)
    rows = max(1, COPY_BYTES // (weight[0].nbytes or 1))
    for start in range(0, weight.shape[0], rows):
        copy[start : start + rows].copy_(weight[start : start + rows])
        release_pages(weight[start : start + rows])
    weight.data = copy


def joined_rows(tensors):
    """torch.cat(tensors) (along rows) into weight_memory."""
    rows = sum(tensor.shape[0] for tensor in tensors)
    return torch.cat(tensors, out=weight_memory((rows, *tensors[0].shape[1:]), tensors[0].dtype))


def weights_in_huge_pages(modules):
    """(bytes of the modules' weight tensors on the CPU of at least one huge page, bytes of them Linux backs
    with 2 MiB pages (None where the system does not say))."""
    tensors = [tensor for module in modules for tensor in [*module.parameters(recurse=False),
                                                           *module.buffers(recurse=False)]
               if tensor.device.type == "cpu" and not tensor.is_mkldnn and tensor.nbytes >= HUGE_PAGE]
    unique = list({tensor.data_ptr(): tensor for tensor in tensors}.values())  # a tied weight once
    return sum(tensor.nbytes for tensor in unique), huge_page_bytes(unique)


def huge_pages_available():
    """Whether memory can ask for 2 MiB pages here (Linux, transparent huge pages not switched off)."""
    return hasattr(mmap, "MADV_HUGEPAGE") and transparent_huge_pages() in ("always", "madvise")


@functools.cache
def transparent_huge_pages():
    """Linux's setting for transparent huge pages: "always", "madvise" (where asked for, as here) or "never"."""
    try:
        setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "not on this system"
    return setting.split("[")[1].split("]")[0] if "[" in setting else setting.strip()


def huge_page_bytes(tensors):
    """How many bytes of `tensors` Linux backs with 2 MiB pages (from /proc/self/smaps), or None where the
    system does not say."""
    ranges = [(t.data_ptr(), t.data_ptr() + t.nbytes) for t in tensors]
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                field = line.split(maxsplit=1)[0]
                if not field.endswith(":"):  # a mapping's first line: "start-end perms ..."
                    begin, end = (int(address, 16) for address in field.split("-"))
                    inside = any(low <= begin and end <= high for low, high in ranges)
                elif inside and field == "AnonHugePages:":
                    total += int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return total


def trim_heap():
    """glibc's malloc_trim(0): freed memory that malloc kept for reuse goes back to the operating system
    (glibc keeps a pool per thread and does not always reuse it; elsewhere there is nothing to do)."""
    libc = c_library()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
