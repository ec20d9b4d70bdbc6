"""Time the parts of a decode step, kernel by kernel, on the Llama 3.2 1B model's shapes.

Run it from the repository root:

    python benchmarks/bench_kernels.py                    # 1, 5 and 256 rows; the fastest of 3 passes counts
    python benchmarks/bench_kernels.py --rows 1,2,4,8 --passes 5
    python benchmarks/bench_kernels.py --rows 1,32,64,256  # around where int8_matmul switches paths
    python benchmarks/bench_kernels.py --dtype float32 --rows 1,5     # float32 weights (5 GB for 1B)
    python benchmarks/bench_kernels.py --threads 1 --rows 1           # one core
    python benchmarks/bench_kernels.py --contexts 128,512,4096        # attention with other context lengths

run_inference.py picks a kernel for each case (matrix_vector_kernels for one row, pack_linear_layers for beam
search's several rows, int8_matmul for 8-bit weights, grouped_attention for attention) from measurements on
one 2-core AVX-512 CPU; this script repeats them on yours. Each model is loaded by the scripts' own load_model
from the random 1B checkpoint that benchmarks/bench_decode.py writes (and this script writes too if it is
missing).

The first table: one pass calls every linear layer once, as fairscale's layer with the forward load_model
gave it, on `rows` random input rows: the weights' share of a decode step with that many sequences (256 rows:
about what a prefill chunk of 256 tokens costs, which has the same products but for the output layer's).
GB/s is the weights' bytes over the time: how fast the kernel streams them. The int8 rows show int8_matmul
as it is, then forced to one of its two paths at every row count.

The second table: one layer's attention in a decode step with `rows` sequences and a given number of tokens
already cached, as each script computes it (llama-models' own in minimal_run_inference.py), without its four
projections, which the first table covers. The rest of a step (norms, Python) is in neither table;
bench_decode.py times whole generations.
"""

import argparse
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

from bench_decode import CHECKPOINT_DIR, CHECKPOINT_NAME, ensure_checkpoint  # also puts the scripts on sys.path
import minimal_run_inference  # noqa: E402  (after bench_decode, which makes it importable)
import run_inference  # noqa: E402

PASSES = 3
ROWS = "1,5,256"
PACKED_FOR = 5  # packed weights are laid out for this many rows, as for a beam search with BEAM_WIDTH = 5
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}  # the model's (and the inputs') dtype
CPU = torch.device("cpu")

NO_LIMIT = 1 << 30
# name: (load_model's max_batch_size, its quantize argument, oneDNN enabled, int8 kernel up to this many rows)
KERNELS = {
    "plain weights, oneDNN (PyTorch's default)": (1, "", True, None),
    "plain weights, PyTorch's own kernel": (1, "", False, None),
    f"weights packed for oneDNN ({PACKED_FOR} rows)": (PACKED_FOR, "", True, None),
    f"int8 weights (int8_matmul: int8 kernel up to {run_inference.INT8_KERNEL_MAX_ROWS} rows)": (1, "int8", True, None),
    "int8 weights, always the int8 kernel": (1, "int8", True, NO_LIMIT),
    "int8 weights, always a bfloat16 copy": (1, "int8", True, 0),
}
ATTENTION_CONTEXTS = "512,2048"
ATTENTION_ROWS = (1, 5)  # greedy decoding; beam search with BEAM_WIDTH = 5
ATTENTION_CALLS = 20  # the fastest call counts
# name: the script whose load_model builds the model, with its attention
ATTENTIONS = {
    "llama-models' Attention.forward (minimal_run_inference.py)": minimal_run_inference,
    "grouped_attention (run_inference.py)": run_inference,
}


def time_passes(layers, rows, passes, dtype):
    """The fastest of `passes` passes, each calling every layer once on `rows` random rows, in seconds.
    The input is (rows, 1, in): `rows` sequences of one token each, the shape of a decode step."""
    inputs = {layer.weight.shape[1]: torch.randn(rows, 1, layer.weight.shape[1], dtype=dtype) for layer in layers}
    best = float("inf")
    for _ in range(passes + 1):  # the first pass warms up (oneDNN builds its kernels) and is not counted
        start = time.perf_counter()
        for layer in layers:
            layer(inputs[layer.weight.shape[1]])
        best = min(best, time.perf_counter() - start)
    return best


def measure(model_dir, dtype, batch, quantize, onednn, int8_max_rows, rows_list, passes):
    """(the weights' bytes, {rows: seconds}) for one kernel, or None where load_model would not use it here."""
    if batch > 1 and not run_inference.packs_weights(CPU, dtype, batch):
        return None
    with redirect_stdout(sys.stderr):
        model = run_inference.load_model(model_dir, CPU, dtype, 8, batch, quantize)
    layers = run_inference.linear_layers(model)
    weight_bytes = sum(layer.weight.nbytes for layer in layers)
    default_max_rows = run_inference.INT8_KERNEL_MAX_ROWS
    run_inference.INT8_KERNEL_MAX_ROWS = default_max_rows if int8_max_rows is None else int8_max_rows
    try:
        with torch.inference_mode(), run_inference.matrix_vector_kernels(enabled=not onednn):  # switches oneDNN off
            return weight_bytes, {rows: time_passes(layers, rows, passes, dtype) for rows in rows_list}
    finally:
        run_inference.INT8_KERNEL_MAX_ROWS = default_max_rows


def fastest_call(function, calls=ATTENTION_CALLS):
    best = float("inf")
    for _ in range(calls + 1):  # the first call warms up and is not counted
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def time_attention(script, model_dir, dtype, rows, contexts):
    """{context: seconds} for layer 0's attention in a decode step of `rows` sequences with `context` tokens
    already cached, minus the time of its four projections (wq, wk, wv, wo), timed alone on the same input:
    what is left is the attention itself (RoPE, the cache, scores, softmax, the weighted sum)."""
    with redirect_stdout(sys.stderr):
        model = script.load_model(model_dir, CPU, dtype, max(contexts) + 1, rows)
    attention = model.layers[0].attention
    x = torch.randn(rows, 1, model.params.dim, dtype=dtype)

    def projections():
        return attention.wo(attention.wq(x)), attention.wk(x), attention.wv(x)

    # As each script runs a decode step: run_inference.py switches oneDNN off for one row (decode_step).
    switch = script is run_inference and rows == 1
    with torch.inference_mode(), run_inference.matrix_vector_kernels(enabled=switch):
        projections_s = fastest_call(projections)
        return {context: fastest_call(lambda: attention(x, context, model.freqs_cis[context : context + 1], None))
                - projections_s for context in contexts}


def main():
    parser = argparse.ArgumentParser(description="Time the 1B model's linear layers per kernel and row count.")
    parser.add_argument("--rows", default=ROWS, help="comma-separated row counts (default %(default)s)")
    parser.add_argument("--passes", type=int, default=PASSES, help="timed passes; the fastest counts (default %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="default %(default)s")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--contexts", default=ATTENTION_CONTEXTS,
                        help="comma-separated cached token counts for the attention table (default %(default)s)")
    parser.add_argument("--checkpoint-dir", default=CHECKPOINT_DIR, type=Path,
                        help="where the random checkpoint is cached (default %(default)s)")
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
    model_dir = args.checkpoint_dir / CHECKPOINT_NAME
    ensure_checkpoint(model_dir)
    run_inference.init_distributed(CPU)

    print(f"Linear layers of the 1B model in {args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}; ms per pass (GB/s of weights)\n")
    print("| kernel | " + " | ".join(f"{rows} row{'s' * (rows > 1)}" for rows in rows_list) + " |")
    print("|---|" + "---|" * len(rows_list))
    for name, (batch, quantize, onednn, int8_max_rows) in KERNELS.items():
        print(f"{name} ...", file=sys.stderr)
        result = measure(model_dir, DTYPES[args.dtype], batch, quantize, onednn, int8_max_rows, rows_list, args.passes)
        if result is None:
            cells = ["not used on this CPU"] * len(rows_list)
        else:
            weight_bytes, seconds = result
            cells = [f"{1000 * s:.1f} ({weight_bytes / s / 1e9:.1f})" for s in seconds.values()]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)

    print(f"\nAttention of one layer in a decode step, projections excluded; ms, the fastest of {ATTENTION_CALLS} calls\n")
    columns = [(rows, context) for rows in ATTENTION_ROWS for context in contexts]
    print("| attention | " + " | ".join(f"{rows} row{'s' * (rows > 1)}, {context} cached" for rows, context in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, script in ATTENTIONS.items():
        print(f"{name} ...", file=sys.stderr)
        seconds = {rows: time_attention(script, model_dir, DTYPES[args.dtype], rows, contexts) for rows in ATTENTION_ROWS}
        print(f"| {name} | " + " | ".join(f"{1000 * seconds[rows][context]:.2f}" for rows, context in columns) + " |",
              flush=True)
    run_inference.close_distributed()


if __name__ == "__main__":
    main()
