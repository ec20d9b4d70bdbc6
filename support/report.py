"""During and after generation: the check that the scores are numbers, a progress line for long work, and
the closing report on stderr: the time of the prompt and of the decoding, tokens/s, the bandwidth that
rate means (weights read per second), and the peak memory.
"""

import os
import sys
import time

import torch

from support.devices import dtype_name
from support.exits import fail
from support.memory import GIB, peak_resident_bytes


def check_finite(logits, dtype):
    # one float32 sum is NaN or infinite where any logit is, and costs far less than isfinite(logits).all()
    # (a pass that writes a mask); finite logits cannot overflow it: they would need |logit| > 1e33
    if not torch.isfinite(logits.float().sum()):
        if dtype == torch.float16:
            hint = "float16 overflows on Llama: use DTYPE=bfloat16 or float32"
        else:
            hint = "the weights may be damaged: re-download them, or try DTYPE=float32"
        fail(f"the model produced NaN or infinite scores in {dtype_name(dtype)} on {logits.device}; {hint}")


def distinct_tensors(model):
    """The model's parameters and buffers, each tensor once: tied weights share their memory (the same data
    pointer); packed oneDNN weights have no data pointer, and none of them is shared."""
    tensors = [*model.parameters(), *model.buffers()]
    return list({id(t) if t.is_mkldnn else t.data_ptr(): t for t in tensors}.values())


def weight_bytes_per_step(model):
    """Bytes of weights one decode step reads (this process's slice): every tensor of the model once, but of
    the embedding table only the row of the token fed, unless the output layer shares the table's memory
    (tied weights), which it then reads whole. (The KV cache is not a parameter: its reads, which grow
    with the context, are not counted.)"""
    total = sum(tensor.nbytes for tensor in distinct_tensors(model))
    embeddings = model.tok_embeddings.weight
    tied = any(tensor is embeddings or (not tensor.is_mkldnn and tensor.data_ptr() == embeddings.data_ptr())
               for tensor in model.output.parameters())
    if not tied:
        total -= embeddings.nbytes - embeddings.nbytes // embeddings.shape[0]
    return total


class Timer:
    """When generation started and when each new token came, so that the prompt's pass and the decoding
    are reported apart (one rate for both would hide a slow long prompt or a fast decoder)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.marks = []

    def tokens(self, token_ids):
        """The token ids, passed on as each one's time is noted."""
        for token_id in token_ids:
            self.marks.append(time.perf_counter())
            yield token_id

    def report(self, prompt_tokens, new_tokens, model, tokens_per_pass=1.0):
        """The speed and the memory, on stderr. Decoding reads every weight once per step, so tokens/s times
        the bytes of weights a step reads is the memory bandwidth the decoding achieved (as gpt-fast reports).
        Speculative decoding makes tokens_per_pass tokens per pass over the weights, on average."""
        device = model.tok_embeddings.weight.device
        line = f"\n{prompt_tokens} prompt + {new_tokens} new tokens in {time.perf_counter() - self.start:.1f} s"
        if len(self.marks) > 1:
            decoding = (len(self.marks) - 1) / (self.marks[-1] - self.marks[0])  # tokens/s after the first
            step_bytes = weight_bytes_per_step(model)
            per_pass = f" / {tokens_per_pass:.2f} tokens a pass" if tokens_per_pass != 1 else ""
            line += (f" (the prompt and the first token {self.marks[0] - self.start:.1f} s, then {decoding:.2f} "
                     f"tokens/s{per_pass} x {step_bytes / 1e9:.3g} GB of weights a step = "
                     f"{decoding / tokens_per_pass * step_bytes / 1e9:.2f} GB/s; weights only: reading the KV cache "
                     "adds more as the context grows)")
        print(line, file=sys.stderr)
        print(memory_line(device), file=sys.stderr)


def memory_line(device):
    """Peak memory of this process: resident memory on a CPU, allocated tensors on a GPU."""
    if device.type == "cuda":
        return f"peak memory {torch.cuda.max_memory_allocated(device) / GIB:.2f} GiB (CUDA tensors)"
    if device.type == "mps":  # resident memory there is mostly the mapped checkpoint; Metal keeps no peak
        return f"memory {torch.mps.driver_allocated_memory() / GIB:.2f} GiB (allocated by Metal, now)"
    peak = peak_resident_bytes()
    if peak is None:
        return "peak memory not measured on this system"
    return f"peak memory {peak / GIB:.2f} GiB"


class Progress:
    """One updating line on stderr for long work (converting weights), shown only when stderr is a
    terminal; it is erased when the work is done."""

    def __init__(self, label):
        self.label = label
        self.start = time.perf_counter()
        self.width = 0
        self.shown = sys.stderr.isatty()

    def __call__(self, done, total):
        if not self.shown:
            return
        line = f"{self.label} {done}/{total} ({time.perf_counter() - self.start:.0f} s)" if done < total else ""
        print(f"\r{line.ljust(self.width)}\r{line}", end="", file=sys.stderr, flush=True)  # spaces erase the last
        self.width = len(line)


def one_terminal():
    """Whether stdout and stderr are the same terminal (the same device, as in an interactive shell), where
    text streamed to stdout and lines printed to stderr interleave on the screen."""
    try:
        out, err = os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())
        terminals = sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, OSError, ValueError):  # closed, or not a file (a test's capture)
        return False
    return terminals and (out.st_rdev, out.st_ino) == (err.st_rdev, err.st_ino)
