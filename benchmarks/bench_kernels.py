"""Where the time of a decode step goes, kernel by kernel, on the Llama 3.2 1B model's shapes.

    python benchmarks/bench_kernels.py                         # 1, 5 and 256 rows; 512 and 4096 cached tokens
    python benchmarks/bench_kernels.py --rows 1,32,64,256      # where one kernel overtakes another
    python benchmarks/bench_kernels.py --dtype float16 --rows 1  # another weight format for the plain kernels
    python benchmarks/bench_kernels.py --threads 1 --rows 1    # one core
    python benchmarks/bench_kernels.py --contexts 128,512,4096 # attention at other context lengths

speedups/ tries and times the kernels briefly at load time and picks for each case (KERNELS=measure); this
script measures every kernel, each variant of ours included, at length on your CPU, so that you can check what
it picked. Models are loaded by the scripts' own load_model from the random 1B checkpoint that
benchmarks/bench_decode.py writes (and this script too).

1. Linear layers: every linear layer of the model once, with each kernel in speedups/kernels.py forced, on
   `rows` random input rows: the weights' share of a decode step with that many
   sequences (256 rows: about a prompt chunk). GB/s is the weights' bytes over the time.
2. Pages: every linear layer on one row with weights in 2 MiB pages (speedups' layouts.weight_memory) against
   the same in 4 KiB pages, taking turns; and our int4 kernel on every 4-bit layer with each weight row in one
   piece (its scales and lows, then its codes: speedups' layout) against three separate tensors.
3. Attention: one layer's attention in a decode step with a number of tokens already cached, without its
   four projections (table 1 has them), as llama-models computes it and as speedups does.
4. A whole decode step at a short context, and the share of it the linear layers take; the rest is
   attention, norms, RoPE and Python. It also counts the step's tensor operations (each one a trip through
   Python and PyTorch's dispatcher), to show what the rest costs per operation.
5. Read-ahead: whole decode steps with our kernels' non-temporal read-ahead of the weights (quantized.cpp's
   kReadAhead) and without it, taking turns in one process; the time in the linear layers and the rest.
"""

import argparse
import copy
import statistics
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests")]  # the scripts, bench_decode, test helpers

import run_inference  # noqa: E402
import speedups  # noqa: E402
from speedups import kernels, layouts, native  # noqa: E402
from support import checkpoint, devices  # noqa: E402
from bench_decode import CHECKPOINT_DIR, CHECKPOINT_NAME, ensure_checkpoint  # noqa: E402

CPU = torch.device("cpu")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PACKED_FOR = 5  # packed weights are laid out for this many rows: a beam search with BEAM_WIDTH = 5
CALLS = 20  # attention and decode steps: the fastest of this many calls counts
FORMAT_NAMES = {"": "plain", "int8": "int8", "int4": "int4"}


def fastest(function, calls):
    best = float("inf")
    for _ in range(calls + 1):  # the first call warms up and is not counted
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def load(model_dir, dtype, max_seq_len, batch, use_speedups=True, quantize="", kernels="rule"):
    with redirect_stdout(sys.stderr):
        return run_inference.load_model(model_dir, checkpoint.read_params(model_dir), CPU, dtype, max_seq_len, batch,
                                        use_speedups, quantize, kernels)


def time_kernels(model_dir, dtype, quantize, rows_list, passes):
    """{kernel: {rows: seconds for one call of every linear layer, or None where it does not serve}}, the
    weight bytes, and speedups' own choice (its describe line), for one format."""
    ours = native.library() is not None
    base = kernels.base_layout(quantize, ours)
    forced = kernels.DEFAULT_KERNEL[base]["one"]  # every layer in the format's base layout, ours where built
    model = load(model_dir, dtype, 8, PACKED_FOR, True, quantize, kernels=forced)
    layers = [m for m in model.modules() if isinstance(m, layouts.FastLinear)]
    results = {}
    for name, kernel in kernels.KERNELS.items():
        if (kernel.layout.FORMAT != quantize or "cpu" not in kernel.devices or (kernel.ours and not ours)
                or dtype not in (kernel.dtypes or (dtype,))):
            continue
        print(f"{name} ...", file=sys.stderr)
        try:
            modules = layers if kernel.layout is base else [kernel.layout(m, dtype, PACKED_FOR, release=False)
                                                            for m in layers]
        except Exception as error:  # a layout this CPU cannot build
            print(f"  not on this CPU: {error}", file=sys.stderr)
            continue
        for module in modules:
            kernels.use(module, dict.fromkeys(layouts.ROW_CLASSES, name), PACKED_FOR)
        results[name] = {}
        with torch.inference_mode():
            for rows in rows_list:
                if layouts.row_class(rows, PACKED_FOR) not in kernel.rows:
                    results[name][rows] = None
                    continue
                xs = {n: torch.randn(rows, 1, n, dtype=dtype) for n in {m.in_features for m in modules}}
                try:
                    results[name][rows] = fastest(lambda: [m(xs[m.in_features]) for m in modules], passes)
                except Exception as error:  # an instruction set this CPU lacks
                    print(f"  not on this CPU: {error}", file=sys.stderr)
                    del results[name]
                    break
        modules = None  # the layout copies go before the next kernel's
    weight_bytes = sum(layer.weight.nbytes for layer in layers)
    del model, layers
    chosen = speedups.describe(load(model_dir, dtype, 8, 1, True, quantize, kernels="measure"))
    return results, weight_bytes, chosen


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
    model = load(model_dir, dtype, 64, 1, True, quantize, kernels="measure")
    layers = [m for m in model.modules() if isinstance(m, layouts.FastLinear)]
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


READ_AHEAD_TURNS, READ_AHEAD_STEPS = 8, 12  # turns of each setting, decode steps per turn (the first 2 not counted)


def time_read_ahead(model_dir, dtype, quantize):
    """{read-ahead bytes: (median decode step, median time in its linear layers)} for our kernels' default
    read-ahead and for none, the two taking turns every READ_AHEAD_STEPS steps of one decode (threads fixed)."""
    model = load(model_dir, dtype, 1024, 1, True, quantize, kernels="measure")
    model.output.watchers = []  # no thread-count trials: both settings run on the same threads
    layers = [m for m in model.modules() if isinstance(m, layouts.FastLinear)]
    inside = [0.0]

    def timed(forward):
        def run(x):
            start = time.perf_counter()
            out = forward(x)
            inside[0] += time.perf_counter() - start
            return out
        return run

    for layer in layers:
        layer.forward = timed(layer.forward)
    default = native.set_read_ahead(0)
    native.set_read_ahead(default)
    steps = {default: [], 0: []}
    with torch.inference_mode():
        logits = run_inference.prefill(model, list(range(1000, 1016)))
        pos = 16
        for turn in range(READ_AHEAD_TURNS):
            for bytes_ahead in (default, 0) if turn % 2 == 0 else (0, default):
                native.set_read_ahead(bytes_ahead)
                for step in range(READ_AHEAD_STEPS):
                    inside[0], start = 0.0, time.perf_counter()
                    logits = run_inference.decode_step(model, [int(logits.argmax())], pos)[0]
                    pos += 1
                    if step >= 2:  # the first steps of a turn still read what the other setting left in the caches
                        steps[bytes_ahead].append((time.perf_counter() - start, inside[0]))
    native.set_read_ahead(default)
    return {bytes_ahead: (statistics.median(s for s, _ in times), statistics.median(i for _, i in times))
            for bytes_ahead, times in steps.items()}


def in_pages(layers, huge):
    """Copies of the layers whose tensors of at least one huge page are in fresh memory: asked for 2 MiB pages
    (layouts.weight_memory) or not (4 KiB pages)."""
    copies = copy.deepcopy(layers)  # fresh memory in small pages
    for layer in copies if huge else ():
        for tensor in [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]:
            if not tensor.is_mkldnn and tensor.nbytes >= layouts.HUGE_PAGE:
                tensor.data = layouts.weight_memory(tensor.shape, tensor.dtype).copy_(tensor)
    return copies


def time_pages(model_dir, dtype, quantize, passes):
    """(seconds for one call of every linear layer on one row, weights in 2 MiB pages; the same in 4 KiB
    pages): the model's layers with speedups' own kernels, copied into each kind of memory, the two taking
    turns pass after pass; the fastest pass of each counts."""
    model = load(model_dir, dtype, 8, 1, True, quantize, kernels="measure")
    layers = [m for m in model.modules() if isinstance(m, layouts.FastLinear)]
    copies = {huge: in_pages(layers, huge) for huge in (True, False)}
    del model, layers
    xs = {layer.in_features: torch.randn(1, 1, layer.in_features, dtype=dtype) for layer in copies[True]}
    seconds = {True: float("inf"), False: float("inf")}
    with torch.inference_mode():
        for _ in range(passes):
            for huge, modules in copies.items():
                seconds[huge] = min(seconds[huge], fastest(lambda: [m(xs[m.in_features]) for m in modules], 1))
    return seconds[True], seconds[False]


def rows_label(rows):
    return "1 row" if rows == 1 else f"{rows} rows"


def main():
    parser = argparse.ArgumentParser(description="Time the 1B model's kernels per number of rows and context.")
    parser.add_argument("--rows", default="1,5,256", help="comma-separated row counts (default %(default)s)")
    parser.add_argument("--passes", type=int, default=3, help="timed passes; the fastest counts (default %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="default %(default)s")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--contexts", default="512,4096",
                        help="cached tokens for the attention table (default %(default)s)")
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
    devices.init_distributed(CPU)
    print(f"Linear layers of the 1B model, activations in {args.dtype}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, oneDNN bfloat16 kernels: "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}; ms per call of every layer (GB/s of weights)\n")
    print("| format | kernel | " + " | ".join(rows_label(rows) for rows in rows_list) + " |")
    print("|---|---|" + "---|" * len(rows_list))
    choices = []
    for quantize in ("", "int8", "int4"):
        results, weight_bytes, chosen = time_kernels(model_dir, dtype, quantize, rows_list, args.passes)
        choices.append(f"{FORMAT_NAMES[quantize]}: {chosen.split('; kernels ', 1)[-1]}")
        for name, seconds in results.items():
            cells = ["—" if s is None else f"{1000 * s:.1f} ({weight_bytes / s / 1e9:.1f})" for s in seconds.values()]
            print(f"| {FORMAT_NAMES[quantize]} | {name} | " + " | ".join(cells) + " |", flush=True)
    print("\nspeedups' own choice at load time (KERNELS=measure, batch 1):\n\n" + "\n".join(f"- {c}" for c in choices))

    print(f"\nEvery linear layer on one row, speedups' choice of kernels, weights in 2 MiB or 4 KiB pages "
          f"({layouts.transparent_huge_pages()} here); ms, the fastest of {CALLS} passes taking turns\n")
    print("| format | 2 MiB pages | 4 KiB pages | 4 KiB / 2 MiB |\n|---|---|---|---|")
    for quantize in ("", "int8", "int4") if layouts.huge_pages_available() else ():
        huge, small = time_pages(model_dir, dtype, quantize, CALLS)
        print(f"| {FORMAT_NAMES[quantize]} | {1000 * huge:.1f} | {1000 * small:.1f} | {small / huge:.2f} |", flush=True)

    print(f"\nAttention of one layer in a decode step, projections excluded; ms, the fastest of {CALLS} calls\n")
    columns = [(rows, context) for rows in (1, PACKED_FOR) for context in contexts]
    print("| attention | " + " | ".join(f"{rows_label(rows)}, {context} cached" for rows, context in columns) + " |")
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
        rest = step - linears
        print(f"| {quantize or args.dtype} | {1000 * step:.1f} | {1000 * linears:.1f} | {1000 * rest:.1f} | "
              f"{operations} ({in_linears}) | {1e6 * rest / (operations - in_linears):.1f} |", flush=True)

    if native.library() is not None:
        print(f"\nDecode steps with our kernels' read-ahead (prefetchnta) and without, taking turns in one decode "
              f"({READ_AHEAD_TURNS} turns of {READ_AHEAD_STEPS} steps); ms, medians\n")
        print("| weights | read-ahead | step | its linear layers | the rest | step without / with |\n"
              "|---|---|---|---|---|---|")
        for quantize in ("", "int8", "int4"):
            seconds = time_read_ahead(model_dir, dtype, quantize)
            on = max(seconds)
            for bytes_ahead, (step, linears) in sorted(seconds.items(), reverse=True):
                label = f"{bytes_ahead} bytes" if bytes_ahead else "off"
                ratio = f"{seconds[0][0] / seconds[on][0]:.2f}" if bytes_ahead == 0 else ""
                print(f"| {quantize or args.dtype} | {label} | {1000 * step:.1f} | {1000 * linears:.1f} | "
                      f"{1000 * (step - linears):.1f} | {ratio} |", flush=True)
    devices.close_distributed()


if __name__ == "__main__":
    main()
