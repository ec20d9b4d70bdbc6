"""Run a Meta Llama 3.x checkpoint with plain PyTorch, fairscale and llama-models: greedy decoding, KV-cached.

Edit the settings below, or override any of them with an environment variable of the same name:

    MODEL_NAME=Llama3.2-1B python minimal_run_inference.py

stdout carries only the generated text; load time, speed and memory go to stderr.
run_inference.py is this script's twin: the same steps under the same names, each one explained, plus
beam search, sampling and chat. speedups.py holds what makes both fast. README.md says where to get the
checkpoints.
"""

from support import exits  # first: from here on Ctrl-C ends with "interrupted", even during the imports

import codecs
import sys
import time

import torch
from llama_models.checkpoint import maybe_reshard_state_dict
from llama_models.datatypes import RawMessage
from llama_models.llama3.args import ModelArgs
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.model import Transformer

import speedups  # the fast path: speedups/
from support import checkpoint, devices, memory, report, settings  # support/: one file per concern

# MODEL_NAME: a folder in LLAMA_MODELS_DIR: Llama3.2-1B, Llama3.2-3B, Llama3.1-8B, Llama3.3-70B, ...
# ("Instruct" in the name: the chat format)
MODEL_NAME = "Llama3.2-1B-Instruct"
LLAMA_MODELS_DIR = "~/.llama/checkpoints"  # where `llama-model download --source meta` puts checkpoints
INPUT_STRING = "The capital of France is"  # the user's message (Instruct models) or the text to continue (base models)
INPUT_FILE = ""  # a UTF-8 text file to use instead of INPUT_STRING, for long prompts; "" for none
SYSTEM_PROMPT = ""  # Instruct models only: a system message before the user's; "" for none
DEVICE = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "mps", "cuda", "cuda:1"
DTYPE = "auto"  # "auto" (bfloat16; float16 on GPUs without bfloat16), "bfloat16", "float16", "float32"
MAX_NEW_TOKENS = 64  # generation stops here unless a stop token comes first
PREFILL_CHUNK = 256  # prompt tokens per forward call: bounds the memory of a long prompt's attention
QUANTIZE = ""  # "int8" or "int4": smaller linear weights, faster decoding (run_inference.py explains); "": as stored
SPEEDUPS = 1  # 1: the fast path of speedups/; 0: llama-models' Transformer exactly as written
KERNELS = "measure"  # the fast path's kernels: "measure" (timed on this CPU once, cached), "rule", or names

def encode_prompt(tokenizer, text, system_prompt, instruct):
    if not instruct:
        return tokenizer.encode(text, bos=True, eos=False)
    messages = [RawMessage(role="system", content=system_prompt)] if system_prompt else []
    messages.append(RawMessage(role="user", content=text))
    return ChatFormat(tokenizer).encode_dialog_prompt(messages).tokens


def load_model(model_dir, params, device, dtype, max_seq_len, max_batch_size, use_speedups=True, quantize="",
               kernels="measure"):
    args = ModelArgs(**params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    with torch.device("meta"), checkpoint.without_weight_init():
        model = Transformer(args)
    with checkpoint.reading_checkpoint(model_dir):
        weights = maybe_reshard_state_dict(checkpoint.weight_files(model_dir), args.n_kv_heads)
    checkpoint.check_weights(model, weights, model_dir)
    model.load_state_dict(weights, assign=True)
    checkpoint.tie_weights(model)
    if use_speedups:
        speedups.apply(model, device, dtype, quantize, kernels, report.Progress("preparing weights"))
    model.to(device=device, dtype=dtype)
    for layer in model.layers:  # the KV cache, sized to this job (its shape was set on the meta device)
        layer.attention.cache_k = torch.zeros_like(layer.attention.cache_k, device=device, dtype=dtype)
        layer.attention.cache_v = torch.zeros_like(layer.attention.cache_v, device=device, dtype=dtype)
    model.freqs_cis = rope_rotations(args, rope_scale_factor(args)).to(device)
    return model


def model_device(model):
    return model.tok_embeddings.weight.device


# RoPE's position angles, with Llama 3.1's stretch of the slow frequencies (run_inference.py explains them)
ROPE_SCALE_FACTOR = 8  # Llama 3.1 and 3.3
ROPE_SCALE_FACTORS = {(2048, 16): 32, (3072, 28): 32}  # Llama 3.2 1B and 3B, recognised by (dim, n_layers)
ROPE_ORIGINAL_CONTEXT = 8192
ROPE_LOW_FREQ_FACTOR = 1
ROPE_HIGH_FREQ_FACTOR = 4


def rope_scale_factor(args):
    return ROPE_SCALE_FACTORS.get((args.dim, args.n_layers), ROPE_SCALE_FACTOR)


def rope_rotations(args, scale_factor):
    head_dim = args.dim // args.n_heads
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    if args.use_scaled_rope:
        turns = ROPE_ORIGINAL_CONTEXT * freqs / (2 * torch.pi)  # turns over the original context
        band = (turns - ROPE_LOW_FREQ_FACTOR) / (ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR)
        keep = band.clamp(0, 1)
        freqs = (1 - keep) * freqs / scale_factor + keep * freqs
    angles = torch.outer(torch.arange(args.max_seq_len).float(), freqs)  # (max_seq_len, head_dim // 2)
    return torch.polar(torch.ones_like(angles), angles)


def prefill(model, prompt_ids, start_pos=0):
    for start in range(0, len(prompt_ids), PREFILL_CHUNK):
        tokens = torch.tensor([prompt_ids[start : start + PREFILL_CHUNK]], device=model_device(model))  # (1, chunk)
        logits = model(tokens, start_pos=start_pos + start)[0, -1]  # (vocab,)
    return logits


def decode_step(model, token_ids, pos):
    tokens = torch.tensor(token_ids, device=model_device(model)).view(-1, 1)  # (batch, 1)
    return model(tokens, start_pos=pos)[:, -1]  # (batch, vocab)


def generate(model, prompt_ids, max_new_tokens, stop_tokens, start_pos=0):
    logits = prefill(model, prompt_ids, start_pos)
    for step in range(max_new_tokens):
        report.check_finite(logits, model.norm.weight.dtype)
        token_id = int(logits.argmax())
        if token_id in stop_tokens:
            return
        yield token_id
        if step + 1 < max_new_tokens:  # no forward pass for a token that would not be used
            logits = decode_step(model, [token_id], start_pos + len(prompt_ids) + step)[0]


def stream(token_ids, tokenizer):
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds back a character split across tokens
    for token_id in token_ids:
        print(utf8.decode(tokenizer.model.decode_single_token_bytes(token_id)), end="", flush=True)
        yield token_id
    print(utf8.decode(b"", final=True), end="", flush=True)


def main():
    settings.apply_settings(globals())
    device = devices.pick_device(DEVICE)
    dtype = devices.pick_dtype(DTYPE, device)
    model_dir = checkpoint.find_checkpoint(LLAMA_MODELS_DIR, MODEL_NAME)
    params = checkpoint.read_params(model_dir)
    tokenizer = checkpoint.load_tokenizer(model_dir, params)
    prompt = settings.read_prompt(INPUT_STRING, INPUT_FILE, tokenizer, params)
    prompt_ids = encode_prompt(tokenizer, prompt, SYSTEM_PROMPT, "instruct" in MODEL_NAME.lower())
    memory.check_job(model_dir, params, len(prompt_ids), MAX_NEW_TOKENS, dtype, device, QUANTIZE)

    devices.init_distributed(device)
    start = time.perf_counter()
    max_seq_len = len(prompt_ids) + MAX_NEW_TOKENS
    model = load_model(model_dir, params, device, dtype, max_seq_len, 1, SPEEDUPS, QUANTIZE, KERNELS)
    print(f"loaded {MODEL_NAME} on {device} in {dtype} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    timer = report.Timer()
    token_ids = generate(model, prompt_ids, MAX_NEW_TOKENS, tokenizer.stop_tokens)
    timed_ids = timer.tokens(token_ids)
    printed_ids = list(stream(timed_ids, tokenizer))
    timer.report(len(prompt_ids), len(printed_ids), model)
    devices.close_distributed()


if __name__ == "__main__":
    exits.run(main)
