"""Time the matrix products of a decode step, kernel by kernel, on the Llama 3.2 1B model's linear layers.

Run it from the repository root:

    python benchmarks/bench_kernels.py                    # 1, 5 and 256 rows; the fastest of 3 passes counts
    python benchmarks/bench_kernels.py --rows 1,2,4,8 --passes 5
    python benchmarks/bench_kernels.py --dtype float32 --rows 1,5     # float32 weights (5 GB for 1B)
    python benchmarks/bench_kernels.py --threads 1 --rows 1           # one core

run_inference.py picks a kernel for each case (matrix_vector_kernels for one row, pack_linear_layers for beam
search's several rows, int8_matmul for 8-bit weights) from measurements on one 2-core AVX-512 CPU; this
script repeats them on yours. Each kernel's model is loaded by run_inference.load_model from the random 1B
checkpoint that benchmarks/bench_decode.py writes (and this script writes too if it is missing), and one pass
calls every linear layer once, as fairscale's layer with the forward load_model gave it, on `rows` random
input rows: the weights' share of a decode step with that many sequences (256 rows: about what a prefill
chunk of 256 tokens costs, which has the same products but for the output layer's). GB/s is the weights' bytes over the time: how fast the kernel streams them. The rest of a
step (attention, norms, Python) is not in these numbers; bench_decode.py times whole generations.
"""

import argparse
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

from bench_decode import CHECKPOINT_DIR, CHECKPOINT_NAME, ensure_checkpoint  # also puts the scripts on sys.path
import run_inference  # noqa: E402  (after bench_decode, which makes it importable)

PASSES = 3
ROWS = "1,5,256"
PACKED_FOR = 5  # packed weights are laid out for this many rows, as for a beam search with BEAM_WIDTH = 5
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}  # the model's (and the inputs') dtype
CPU = torch.device("cpu")

# name: (load_model's max_batch_size, its quantize argument, oneDNN enabled)
KERNELS = {
    "plain weights, oneDNN (PyTorch's default)": (1, "", True),
    "plain weights, PyTorch's own kernel": (1, "", False),
    f"weights packed for oneDNN ({PACKED_FOR} rows)": (PACKED_FOR, "", True),
    "int8 weights (int8_matmul)": (1, "int8", True),
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


def measure(model_dir, dtype, batch, quantize, onednn, rows_list, passes):
    """(the weights' bytes, {rows: seconds}) for one kernel, or None where load_model would not use it here."""
    if batch > 1 and not run_inference.packs_weights(CPU, dtype, batch):
        return None
    with redirect_stdout(sys.stderr):
        model = run_inference.load_model(model_dir, CPU, dtype, 8, batch, quantize)
    layers = run_inference.linear_layers(model)
    weight_bytes = sum(layer.weight.nbytes for layer in layers)
    with torch.inference_mode(), run_inference.matrix_vector_kernels(enabled=not onednn):  # switches oneDNN off
        return weight_bytes, {rows: time_passes(layers, rows, passes, dtype) for rows in rows_list}


def main():
    parser = argparse.ArgumentParser(description="Time the 1B model's linear layers per kernel and row count.")
    parser.add_argument("--rows", default=ROWS, help="comma-separated row counts (default %(default)s)")
    parser.add_argument("--passes", type=int, default=PASSES, help="timed passes; the fastest counts (default %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="default %(default)s")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--checkpoint-dir", default=CHECKPOINT_DIR, type=Path,
                        help="where the random checkpoint is cached (default %(default)s)")
    args = parser.parse_args()
    try:
        rows_list = [int(rows) for rows in args.rows.split(",")]
    except ValueError:
        parser.error(f"--rows {args.rows!r}: give whole numbers separated by commas, e.g. 1,5,256")
    if min(rows_list) < 1 or args.passes < 1 or args.threads < 0:
        parser.error("--rows and --passes must be at least 1, --threads at least 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.checkpoint_dir / CHECKPOINT_NAME
    ensure_checkpoint(model_dir)
    run_inference.init_distributed(CPU)

    print(f"Linear layers of the 1B model in {args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}; ms per pass (GB/s of weights)\n")
    print("| kernel | " + " | ".join(f"{rows} row{'s' * (rows > 1)}" for rows in rows_list) + " |")
    print("|---|" + "---|" * len(rows_list))
    for name, (batch, quantize, onednn) in KERNELS.items():
        print(f"{name} ...", file=sys.stderr)
        result = measure(model_dir, DTYPES[args.dtype], batch, quantize, onednn, rows_list, args.passes)
        if result is None:
            cells = ["not used on this CPU"] * len(rows_list)
        else:
            weight_bytes, seconds = result
            cells = [f"{1000 * s:.1f} ({weight_bytes / s / 1e9:.1f})" for s in seconds.values()]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    run_inference.close_distributed()


if __name__ == "__main__":
    main()
