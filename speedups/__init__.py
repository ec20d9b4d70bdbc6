"""The fast path: what makes decoding fast and lean without being part of the model's story.

Both scripts call `speedups.apply(model, device, dtype, quantize, kernels)` once, in load_model, after the
weights are loaded and before the model moves to its device. It is the one entry point: it swaps the
module classes below into llama-models' Transformer, so `print(model)` shows what runs:

    GroupedQueryAttention   llama-models' Attention, without copying the shared key-value heads, and wq, wk and
                            wv as one weight wqkv (one product, one pass over the input)
    FusedFeedForward        llama-models' FeedForward, with w1 and w3 as one weight w13
    LastPositionLogits      the output layer, for the last position only (every_position(model): for all)
    OneCallRMSNorm          llama-models' RMSNorm as one call of our C++ loop (where our kernels were built)
    PlainLinear             a linear layer with its weight as stored (16 or 32 bits)
    PackedLinear            the weight laid out once for oneDNN's kernels
    Int8Linear              8-bit weights, one scale per row (QUANTIZE=int8)
    PackedInt8Linear        the same 8-bit weights laid out once for oneDNN's int8 x int8 kernel
    Int4Linear              4-bit weights in groups of 32 (QUANTIZE=int4)

Each linear layer keeps one weight layout (one of the classes above) and picks a kernel for it by the
number of rows in the product: one (decoding one sequence), a few (beam search: up to max_batch_size),
or a prompt chunk. Which layout and kernels are fastest, and which are even right, differs from CPU to
CPU, so on a CPU they are tried and measured where they run, and the fast-path line says which won.

The package, one module per concern (imports point down the list):
    layouts.py       the linear layouts and the quantizing that builds them, in 2 MiB pages; FORMATS; page
                     release
    kernels.py       every product a layout can run (KERNELS), and the float32 products for prompt chunks
    calibration.py   the choice: the fixed rule, trying each kernel for right answers, timing, the cache,
                     and StepThreads (the number of threads while decoding)
    decoding.cpp     RMSNorm, and RoPE with the write into the KV cache, each as one call (native.py builds it
                     with quantized.cpp): a decoding step's small operations without PyTorch's cost per operation
    __init__.py      apply and describe, the attention, the norms and the last position

Nothing here changes what the model computes, except rounding, the 8- or 4-bit weights asked for, and
(kernels w8a8, w8a8-onednn) activations rounded to 8 bits per token. DTYPE and QUANTIZE are never changed.
run_inference.py explains each idea where its story reaches it; benchmarks/bench_kernels.py measures each
kernel on your CPU. With SPEEDUPS=0 neither script calls this package: llama-models' code runs as written.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from llama_models.llama3.model import RMSNorm, apply_rotary_emb
from torch import nn

from speedups.calibration import (SAMPLE_MAX_WEIGHTS, StepThreads, build_layout, copy_in_dtype, kernel_choice,
                                  plan_kernels, vet)
from speedups import native
from speedups.kernels import DEFAULT_KERNEL, KERNELS, base_layout
from speedups.layouts import (FEW_ROWS, FORMATS, ROW_CLASSES, Concatenated, FastLinear, PlainLinear,
                              move_into_weight_memory, row_class, transparent_huge_pages, trim_heap,
                              weights_in_huge_pages)

__all__ = ["FORMATS", "FusedFeedForward", "GroupedQueryAttention", "LastPositionLogits", "OneCallRMSNorm", "apply",
           "describe", "kernel_choice"]


# ---------------------------------------------------------------------------------------------------------
# The one call.
# ---------------------------------------------------------------------------------------------------------
def apply(model, device, dtype, quantize="", kernels="measure", progress=None):
    """Swap the fast modules into a loaded llama-models Transformer whose weights are still on the CPU
    (memory-mapped). kernels: the KERNELS setting (see calibration.py). The KV caches it leaves are shapes
    on the meta device: load_model allocates them."""
    args = model.params
    for layer in model.layers:
        layer.attention = GroupedQueryAttention(layer.attention, args.max_batch_size, args.max_seq_len)
        layer.feed_forward = FusedFeedForward(layer.feed_forward)
    layers = linear_layers(model)
    ours = device.type == "cpu" and kernel_choice(kernels) != "rule" and native.library() is not None
    if ours:  # decoding.cpp's one-call RMSNorm and RoPE
        model.norm = OneCallRMSNorm(model.norm)
        for layer in model.layers:
            layer.attention_norm, layer.ffn_norm = OneCallRMSNorm(layer.attention_norm), OneCallRMSNorm(layer.ffn_norm)
            layer.attention.one_call_rope = True
    base = base_layout(quantize, ours)
    for done, (parent, name, layer) in enumerate(layers):  # the largest first, while little else is converted
        setattr(parent, name, base(layer))
        if isinstance(layer, Concatenated):
            layer.joined = None  # the copy of the weights it joined: the new layer holds what it needs of it
        trim_heap()  # freed temporaries of the conversion go back to the operating system
        if progress:
            progress(done + 1, len(layers))
    in_order = [module for module in model.modules() if isinstance(module, FastLinear)]  # the model's order
    plans, skipped, report, timings_check = plan_kernels(in_order, device, dtype, quantize, args.max_batch_size,
                                                         kernels, ours)
    kept = convert_layers(layers, plans, device, dtype, args.max_batch_size)
    if device.type == "cpu":  # the file's weights a step reads, as they are: into 2 MiB pages too
        for module in model.modules():
            if isinstance(module, PlainLinear) and module.from_file and module.weight.dtype == dtype:
                move_into_weight_memory(module.weight)
    model.kernel_report = report + skipped_report(skipped, kept)
    for module in in_order:
        vars(module).pop("first_rows", None)  # rows of the weight a layout was made from: for choosing only
    threads = torch.get_num_threads()
    choosing = device.type == "cpu" and threads > 1 and kernel_choice(kernels) == "measure"
    watchers = ([StepThreads(threads)] if choosing else []) + ([timings_check] if timings_check else [])
    model.output = LastPositionLogits(model.output, watchers)
    return model


def convert_layers(layers, plans, device, dtype, few_rows):
    """Each layer into its shape's planned layout, with its kernels. On a CPU the first layer of each shape
    tries the plan (calibration.vet: it builds, runs, and is right); where it fails, every layer of that shape
    keeps its base layout and that layout's own kernels. Returns {shape: why its plan was not kept}."""
    kept = {}  # shape: None (the plan holds) or why not
    for parent, name, _ in layers:
        module = getattr(parent, name)
        layout, names = plans[module.shape]
        if module.shape not in kept:
            kept[module.shape] = try_plan(module, layout, names, dtype, few_rows) if device.type == "cpu" else None
        if kept[module.shape]:
            layout, names = type(module), DEFAULT_KERNEL[type(module)]
        if type(module) is not layout:  # another layout measured faster: each layer converted once
            module, _ = build_layout(layout, module, dtype, few_rows)
            setattr(parent, name, module)
            trim_heap()
        module.use({rows: KERNELS[kernel] for rows, kernel in names.items()}, few_rows)
    return kept


def try_plan(module, layout, names, dtype, few_rows):
    """None if `layout` builds from the base-layout module and each planned kernel runs right on it, else why
    not, in a few words."""
    sample = copy_in_dtype(module, dtype)  # the weights are still the file's, in its dtype
    converted, why = sample, None
    if type(module) is not layout:
        converted, why = build_layout(layout, module, dtype, few_rows, release=False)
    rows_count = {"one": 1, "few": few_rows + 1, "chunk": max(few_rows, FEW_ROWS) + 1}
    for rows in ROW_CLASSES:
        if rows != "chunk" or module.shape[0] * module.shape[1] <= SAMPLE_MAX_WEIGHTS:  # the output layer
            why = why or vet(KERNELS[names[rows]], converted, sample, rows_count[rows], dtype)
    return why


def pages_report(model):
    """How many of the weights' bytes are in 2 MiB pages, as a clause ("" where no weight fills one)."""
    total, granted = weights_in_huge_pages(module for module in model.modules() if isinstance(module, FastLinear))
    if not total or granted is None:  # no weight on the CPU fills a huge page, or the system does not say
        return ""
    why = "" if granted else f" (transparent huge pages: {transparent_huge_pages()})"
    return f"{granted / 1e9:.2f} of {total / 1e9:.2f} GB of weights in 2 MiB pages{why}"


def skipped_report(skipped, kept):
    """The kernels this CPU could not build, run, or run right, and the plans dropped, as a clause."""
    parts = [f"{name} ({why})" for name, why in skipped.items()]
    parts += [f"{shape[0]}x{shape[1]}'s plan ({why}: kept the base layout)" for shape, why in kept.items() if why]
    return f"; skipped here: {', '.join(parts)}" if parts else ""


def linear_layers(model):
    """(parent module, attribute name, layer) for every fairscale linear layer and every Concatenated one, the
    largest weight first."""
    found = [(parent, name, child) for parent in model.modules() for name, child in vars(parent).items()
             if isinstance(child, Concatenated)]
    found += [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
              if isinstance(child, (ColumnParallelLinear, RowParallelLinear))]
    return sorted(found, key=lambda item: -(item[2].numel() if isinstance(item[2], Concatenated)
                                            else item[2].weight.numel()))


def describe(model):
    """One line: how many of each fast module the model holds, the error of 8- or 4-bit weights, and which
    kernels run, chosen how (with the measured rates), and which were skipped."""
    counts = {}
    errors = []
    for module in model.modules():
        if isinstance(module, (GroupedQueryAttention, FusedFeedForward, LastPositionLogits, OneCallRMSNorm,
                               FastLinear)):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
        if hasattr(module, "relative_error"):
            errors.append(module.relative_error)
    line = ", ".join(f"{count} x {name}" for name, count in counts.items())
    if errors:
        line += (f"; quantised weights' relative error {sum(errors) / len(errors):.2%} on average, "
                 f"{max(errors):.2%} at most (also each layer's output error on random inputs)")
    for clause in (getattr(model, "kernel_report", ""), pages_report(model)):
        if clause:
            line += "; " + clause
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
        self.wqkv = Concatenated([attention.wq, attention.wk, attention.wv])  # apply() makes it a FastLinear
        self.sizes = self.wqkv.sizes  # rows of wq, wk, wv in wqkv
        self.wo = attention.wo
        cache_shape = (max_batch_size, self.n_local_kv_heads, max_seq_len, self.head_dim)
        self.cache_k = torch.empty(cache_shape, device="meta")  # a shape: load_model allocates it
        self.cache_v = torch.empty(cache_shape, device="meta")
        self.one_call_rope = False  # apply() sets it where decoding.cpp was built (on the CPU)

    wq = property(lambda self: RowsOf(self.wqkv, self.sizes, 0))  # for code that calls them one by one
    wk = property(lambda self: RowsOf(self.wqkv, self.sizes, 1))
    wv = property(lambda self: RowsOf(self.wqkv, self.sizes, 2))

    def forward(self, x, start_pos, freqs_cis, mask):
        batch, seqlen, _ = x.shape
        end = start_pos + seqlen
        if self.one_call_rope and x.device.type == "cpu":  # the same RoPE and cache writes, in one call
            queries = native.rotate_into_cache(self.wqkv(x), torch.view_as_real(freqs_cis), self.cache_k, self.cache_v,
                                               start_pos, self.n_local_heads, self.n_local_kv_heads)
        else:
            xq, xk, xv = self.wqkv(x).split(self.sizes, dim=-1)  # one product for the three projections
            xq = xq.view(batch, seqlen, self.n_local_heads, self.head_dim)
            xk = xk.view(batch, seqlen, self.n_local_kv_heads, self.head_dim)
            xv = xv.view(batch, seqlen, self.n_local_kv_heads, self.head_dim)
            xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)  # llama-models' own RoPE
            self.cache_k[:batch, :, start_pos:end] = xk.transpose(1, 2)  # (batch, kv_heads, seqlen, head_dim)
            self.cache_v[:batch, :, start_pos:end] = xv.transpose(1, 2)
            queries = xq.transpose(1, 2)  # (batch, heads, seqlen, head_dim); head h reads key-value head h // n_rep
        keys, values = self.cache_k[:batch, :, :end], self.cache_v[:batch, :, :end]  # (batch, kv_heads, end, head_dim)
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


class OneCallRMSNorm(RMSNorm):
    """llama-models' RMSNorm (the same weight and epsilon) computed by one call of decoding.cpp's loop: the same
    math and roundings, only the float32 sum of squares added in another order. Where x is not on the CPU or
    not in the weight's dtype, llama-models' own forward."""

    def __init__(self, norm):
        nn.Module.__init__(self)
        self.eps, self.weight = norm.eps, norm.weight

    def forward(self, x):
        if x.device.type == "cpu" and x.dtype == self.weight.dtype:
            return native.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class FusedFeedForward(nn.Module):
    """llama-models' FeedForward, w2(silu(w1(x)) * w3(x)), with w1 and w3 as one weight w13: one product (and,
    for the 8-bit kernels, one rounding of the input) where there were two."""

    def __init__(self, feed_forward):
        super().__init__()
        self.w13 = Concatenated([feed_forward.w1, feed_forward.w3])  # apply() makes it a FastLinear
        self.sizes = self.w13.sizes
        self.w2 = feed_forward.w2

    w1 = property(lambda self: RowsOf(self.w13, self.sizes, 0))  # for code that calls them one by one
    w3 = property(lambda self: RowsOf(self.w13, self.sizes, 1))

    def forward(self, x):
        gate, up = self.w13(x).split(self.sizes, dim=-1)
        return self.w2(F.silu(gate) * up)


class RowsOf(nn.Module):
    """One of the projections a fused layer computes together (wq of wqkv, w1 of w13), as a layer of its own
    for code that calls them one at a time (run_inference.layer_by_hand): the fused layer's kernel on its
    rows only, where the layout can be cut by rows, else the fused product, cut."""

    def __init__(self, fused, sizes, index):
        super().__init__()
        self.fused = fused
        self.start, self.end = sum(sizes[:index]), sum(sizes[: index + 1])

    def forward(self, x):
        view = self.fused.rows_view(self.start, self.end)
        if view is None:
            return self.fused(x)[..., self.start : self.end]
        rows = x.reshape(-1, self.fused.in_features)
        kernel = self.fused.kernels[row_class(rows.shape[0], self.fused.few_rows)]
        return kernel.run(view, rows).view(*x.shape[:-1], -1)  # column-parallel, kept local: no collective


class LastPositionLogits(nn.Module):
    """The output layer applied to the last position only: generation reads no other position's scores.
    It ends every forward pass, so it also tells `watchers` (calibration.StepThreads, which picks the
    number of threads, and calibration.TimingsCheck) when a decode step or a prompt chunk passes."""

    def __init__(self, layer, watchers=()):
        super().__init__()
        self.layer = layer
        self.watchers = list(watchers)
        self.every_position = False  # set by every_position(model)

    def forward(self, h):  # (batch, seqlen, dim) -> (batch, 1, vocab)
        for watcher in self.watchers:
            watcher.step(decoding=h.shape[1] == 1)
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


