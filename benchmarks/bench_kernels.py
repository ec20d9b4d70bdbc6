"""Where the time of a decode step goes, kernel by kernel, on the Llama 3.2 1B model's shapes.

    python benchmarks/bench_kernels.py                         # 1, 5 and 256 rows; 512 and 4096 cached tokens
    python benchmarks/bench_kernels.py --rows 1,32,64,256      # around where Int8Linear switches paths
    python benchmarks/bench_kernels.py --dtype float16 --rows 1  # another weight format for the plain kernels
    python benchmarks/bench_kernels.py --threads 1 --rows 1    # one core
    python benchmarks/bench_kernels.py --contexts 128,512,4096 # attention at other context lengths

speedups.py picks a kernel for each case by the rules that run_inference.py explains; this script measures
every candidate on your CPU, so that you can check the rules hold here. Models are loaded by the scripts'
own load_model from the random 1B checkpoint that benchmarks/bench_decode.py writes (and this script too).

1. Linear layers: every linear layer of the model once, as the module speedups.apply gives it (or
   fairscale's plain one), on `rows` random input rows: the weights' share of a decode step with that many
   sequences (256 rows: about a prompt chunk). GB/s is the weights' bytes over the time.
2. Attention: one layer's attention in a decode step with a number of tokens already cached, without its
   four projections (table 1 has them), as llama-models computes it and as speedups does.
3. A whole decode step at a short context, and the share of it the linear layers take; the rest is
   attention, norms, RoPE and Python. It also counts the step's tensor operations (each one a trip through
   Python and PyTorch's dispatcher), to show what the rest costs per operation.
"""

import argparse
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench_decode import CHECKPOINT_DIR, CHECKPOINT_NAME, ensure_checkpoint  # also puts the scripts on sys.path
import run_inference  # noqa: E402  (after bench_decode, which makes it importable)
import speedups  # noqa: E402
import support  # noqa: E402

CPU = torch.device("cpu")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PACKED_FOR = 5  # packed weights are laid out for this many rows: a beam search with BEAM_WIDTH = 5
CALLS = 20  # attention and decode steps: the fastest of this many calls counts
# name: (load_model's max_batch_size, use_speedups, quantize, Int8Linear's row limit or None for its own)
KERNELS = {
    "fairscale's layers, F.linear (oneDNN where PyTorch sends it)": (1, False, "", None),
    "MatVecLinear (one row: PyTorch's own kernel)": (1, True, "", None),
    f"PackedLinear (laid out for {PACKED_FOR} rows)": (PACKED_FOR, True, "", None),
    "Int8Linear (as speedups uses it)": (1, True, "int8", None),
    "Int8Linear, always the int8 kernel": (1, True, "int8", 1 << 30),
    "Int8Linear, always a 16-bit copy": (1, True, "int8", 0),
    "int8 weights and int8 activations (torch._int_mm; not used)": (1, True, "int8", "int_mm"),
    "Int4Linear": (1, True, "int4", None),
}


def fastest(function, calls):
    best = float("inf")
    for _ in range(calls + 1):  # the first call warms up and is not counted
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def load(model_dir, dtype, max_seq_len, batch, use_speedups=True, quantize=""):
    with redirect_stdout(sys.stderr):
        return run_inference.load_model(model_dir, support.read_params(model_dir), CPU, dtype, max_seq_len, batch,
                                        use_speedups, quantize)


def int_mm_product(layer):
    """x @ (int8 weight * scales).T with x quantised per row to int8 too, multiplied by torch._int_mm."""
    def product(x):
        rows = x.reshape(-1, x.shape[-1])
        x_scales = rows.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-12) / speedups.INT8_MAX
        x_int8 = (rows / x_scales).round_().to(torch.int8)
        return (torch._int_mm(x_int8, layer.weight.t()) * x_scales * layer.scales).to(x.dtype)
    return product


def time_linears(model_dir, dtype, batch, use_speedups, quantize, int8_rows, rows_list, passes):
    """(weight bytes, {rows: seconds for one call of every linear layer}), or None where not used here."""
    if batch > 1 and not speedups.packs_weights(CPU, dtype, batch):
        return None
    model = load(model_dir, dtype, 8, batch, use_speedups, quantize)
    layers = [m for m in model.modules() if isinstance(m, speedups.FastLinear)] if use_speedups else \
        [layer for _, _, layer in speedups.linear_layers(model)]
    products = [int_mm_product(layer) if int8_rows == "int_mm" else layer for layer in layers]
    sizes = [layer.in_features if use_speedups else layer.weight.shape[1] for layer in layers]
    default_rows = speedups.INT8_KERNEL_MAX_ROWS
    speedups.INT8_KERNEL_MAX_ROWS = default_rows if int8_rows in (None, "int_mm") else int8_rows
    seconds = {}
    try:
        with torch.inference_mode():
            for rows in rows_list:
                xs = {size: torch.randn(rows, 1, size, dtype=dtype) for size in set(sizes)}
                seconds[rows] = fastest(lambda: [p(xs[size]) for p, size in zip(products, sizes)], passes)
    finally:
        speedups.INT8_KERNEL_MAX_ROWS = default_rows
    return sum(layer.weight.nbytes for layer in layers), seconds


def time_attention(model_dir, dtype, use_speedups, rows, contexts):
    """{context: seconds} of layer 0's attention in a decode step of `rows` sequences with `context` tokens
    cached, minus its four projections timed alone on the same input."""
    model = load(model_dir, dtype, max(contexts) + 1, rows, use_speedups)
    attention = model.layers[0].attention
    x = torch.randn(rows, 1, model.params.dim, dtype=dtype)
    with torch.inference_mode():
        projections = fastest(lambda: (attention.wo(attention.wq(x)), attention.wk(x), attention.wv(x)), CALLS)
        return {context: fastest(lambda: attention(x, context, model.freqs_cis[context : context + 1], None), CALLS)
                - projections for context in contexts}


class OperationCount(TorchDispatchMode):
    """Counts the tensor operations that reach PyTorch's kernels while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def time_step(model_dir, dtype, quantize):
    """(seconds of a whole decode step after a short prompt, seconds of its linear layers alone,
    tensor operations in the step, of which in the linear layers)."""
    model = load(model_dir, dtype, 64, 1, True, quantize)
    layers = [m for m in model.modules() if isinstance(m, speedups.FastLinear)]
    xs = {layer.in_features: torch.randn(1, 1, layer.in_features, dtype=dtype) for layer in layers}
    with torch.inference_mode():
        run_inference.prefill(model, list(range(1000, 1016)))
        step = fastest(lambda: run_inference.decode_step(model, [5], 16), CALLS)
        linears = fastest(lambda: [layer(xs[layer.in_features]) for layer in layers], CALLS)
        with OperationCount() as in_step:
            run_inference.decode_step(model, [5], 16)
        with OperationCount() as in_linears:
            [layer(xs[layer.in_features]) for layer in layers]
    return step, linears, in_step.count, in_linears.count


def main():
    parser = argparse.ArgumentParser(description="Time the 1B model's kernels per number of rows and context.")
    parser.add_argument("--rows", default="1,5,256", help="comma-separated row counts (default %(default)s)")
    parser.add_argument("--passes", type=int, default=3, help="timed passes; the fastest counts (default %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="default %(default)s")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--contexts", default="512,4096", help="cached tokens for the attention table (default %(default)s)")
    parser.add_argument("--checkpoint-dir", default=CHECKPOINT_DIR, type=Path, help="default %(default)s")
    args = parser.parse_args()
    try:
        rows_list = [int(rows) for rows in args.rows.split(",")]
        contexts = [int(context) for context in args.contexts.split(",")]
    except ValueError:
        parser.error("--rows and --contexts take whole numbers separated by commas, e.g. 1,5,256")
    if min(rows_list) < 1 or min(contexts) < 1 or args.passes < 1 or args.threads < 0:
        parser.error("--rows, --contexts and --passes must be at least 1, --threads at least 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, model_dir = DTYPES[args.dtype], args.checkpoint_dir / CHECKPOINT_NAME
    ensure_checkpoint(model_dir)
    support.init_distributed(CPU)
    print(f"Linear layers of the 1B model, activations in {args.dtype}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, oneDNN bfloat16 kernels: "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}; ms per call of every layer (GB/s of weights)\n")
    print("| kernel | " + " | ".join(f"{rows} row{'s' * (rows > 1)}" for rows in rows_list) + " |")
    print("|---|" + "---|" * len(rows_list))
    for name, (batch, use_speedups, quantize, int8_rows) in KERNELS.items():
        print(f"{name} ...", file=sys.stderr)
        result = time_linears(model_dir, dtype, batch, use_speedups, quantize, int8_rows, rows_list, args.passes)
        cells = ["not used here"] * len(rows_list) if result is None else \
            [f"{1000 * s:.1f} ({result[0] / s / 1e9:.1f})" for s in result[1].values()]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)

    print(f"\nAttention of one layer in a decode step, projections excluded; ms, the fastest of {CALLS} calls\n")
    columns = [(rows, context) for rows in (1, PACKED_FOR) for context in contexts]
    print("| attention | " + " | ".join(f"{rows} row{'s' * (rows > 1)}, {context} cached" for rows, context in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, use_speedups in (("llama-models' Attention (SPEEDUPS=0)", False), ("GroupedQueryAttention", True)):
        print(f"{name} ...", file=sys.stderr)
        seconds = {rows: time_attention(model_dir, dtype, use_speedups, rows, contexts) for rows in (1, PACKED_FOR)}
        print(f"| {name} | " + " | ".join(f"{1000 * seconds[rows][context]:.2f}" for rows, context in columns) + " |",
              flush=True)

    print(f"\nA whole decode step after a 16-token prompt, one sequence; ms, the fastest of {CALLS}\n")
    print("| weights | decode step | its linear layers | the rest | operations in the step (in linear layers) "
          "| µs per operation of the rest |\n|---|---|---|---|---|---|")
    for quantize in ("", "int8", "int4"):
        step, linears, operations, in_linears = time_step(model_dir, dtype, quantize)
        print(f"| {quantize or args.dtype} | {1000 * step:.1f} | {1000 * linears:.1f} | {1000 * (step - linears):.1f} | "
              f"{operations} ({in_linears}) | {1e6 * (step - linears) / (operations - in_linears):.1f} |", flush=True)
    support.close_distributed()


if __name__ == "__main__":
    main()
