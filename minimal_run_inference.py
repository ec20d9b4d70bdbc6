"""Run a Meta Llama 3.x checkpoint with plain PyTorch, fairscale and llama-models: greedy decoding, KV-cached.

Edit the settings below, or override any of them with an environment variable of the same name:

    MODEL_NAME=Llama3.2-1B python minimal_run_inference.py

stdout carries only the generated text; load time, speed and memory go to stderr.
run_inference.py is this script's twin: the same steps under the same names, each one explained,
plus beam search, sampling and 8-bit weights. README.md says where to get the checkpoints.
"""

import codecs
import math
import os
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist
from llama_models.checkpoint import maybe_reshard_state_dict
from llama_models.datatypes import RawMessage
from llama_models.llama3.args import ModelArgs
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.model import Transformer

import support  # settings from the environment, device and dtype, input checks: support.py

MODEL_NAME = "Llama3.2-1B-Instruct"  # a folder in LLAMA_MODELS_DIR: Llama3.2-1B, Llama3.2-3B, Llama3.1-8B, Llama3.3-70B, ... ("-Instruct" in the name: chat format)
LLAMA_MODELS_DIR = "~/.llama/checkpoints"  # where `llama-model download --source meta` puts checkpoints
INPUT_STRING = "The capital of France is"  # the user's message (Instruct models) or the text to continue (base models)
SYSTEM_PROMPT = ""  # Instruct models only: a system message before the user's; "" for none
DEVICE = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "mps", "cuda", "cuda:1"
DTYPE = "auto"  # "auto" (bfloat16; float16 on GPUs without bfloat16), "bfloat16", "float16", "float32"
MAX_NEW_TOKENS = 64  # generation stops here unless a stop token comes first
PREFILL_CHUNK = 256  # prompt tokens per forward call: bounds the memory of a long prompt's attention

# Llama 3.x RoPE scaling (https://github.com/meta-llama/llama-models/issues/166): see run_inference.py.
ROPE_SCALE_FACTOR = 8  # Llama 3.1 and 3.3
ROPE_SCALE_FACTOR_3_2_SMALL = 32  # Llama 3.2 1B and 3B, recognised by (dim, n_layers)
LLAMA_3_2_SMALL_SHAPES = {(2048, 16), (3072, 28)}
ROPE_ORIGINAL_CONTEXT = 8192
ROPE_LOW_FREQ_FACTOR = 1
ROPE_HIGH_FREQ_FACTOR = 4


def encode_prompt(tokenizer, text, system_prompt, instruct):
    if not instruct:
        return tokenizer.encode(text, bos=True, eos=False)
    messages = [RawMessage(role="system", content=system_prompt)] if system_prompt else []
    messages.append(RawMessage(role="user", content=text))
    return ChatFormat(tokenizer).encode_dialog_prompt(messages).tokens


def init_distributed(device):
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ:  # started by torchrun: join its group (its environment says where)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
    else:  # one process: an in-memory store, no launcher, no network port
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    with redirect_stdout(sys.stderr):  # fairscale prints; stdout is for generated text only
        fs_init.initialize_model_parallel(dist.get_world_size())  # model-parallel size = processes


def close_distributed():  # stop the groups' threads before Python exits, or now and then one aborts the process
    fs_init.destroy_model_parallel()  # fairscale's references to its groups
    dist.destroy_process_group()


def rope_scale_factor(args):
    return ROPE_SCALE_FACTOR_3_2_SMALL if (args.dim, args.n_layers) in LLAMA_3_2_SMALL_SHAPES else ROPE_SCALE_FACTOR


def rope_rotations(args, scale_factor):
    head_dim = args.dim // args.n_heads
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    if args.use_scaled_rope:
        wavelengths = 2 * math.pi / freqs
        band = (ROPE_ORIGINAL_CONTEXT / wavelengths - ROPE_LOW_FREQ_FACTOR) / (ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR)
        keep = band.clamp(0, 1)
        freqs = (1 - keep) * freqs / scale_factor + keep * freqs
    angles = torch.outer(torch.arange(args.max_seq_len).float(), freqs)  # (max_seq_len, head_dim // 2)
    return torch.polar(torch.ones_like(angles), angles)


def load_model(model_dir, device, dtype, max_seq_len, max_batch_size):
    params = support.read_params(model_dir)
    args = ModelArgs(**params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    with torch.device("meta"), support.without_weight_init():
        model = Transformer(args)
    with redirect_stdout(sys.stderr), support.reading_checkpoint(model_dir):  # it prints the shard list
        weights = maybe_reshard_state_dict(sorted(model_dir.glob("consolidated.*.pth")), args.n_kv_heads)
    torch.set_default_dtype(torch.float32)  # maybe_reshard_state_dict set it to bfloat16
    support.check_weights(model, weights, model_dir)
    model.load_state_dict(weights, assign=True)
    model.to(device=device, dtype=dtype)
    for layer in model.layers:
        attention = layer.attention
        cache_shape = (max_batch_size, max_seq_len, attention.n_local_kv_heads, attention.head_dim)
        attention.cache_k = torch.zeros(cache_shape, device=device, dtype=dtype)
        attention.cache_v = torch.zeros(cache_shape, device=device, dtype=dtype)
    model.freqs_cis = rope_rotations(args, rope_scale_factor(args)).to(device)
    return model


def prefill(model, prompt_ids, device):
    for start in range(0, len(prompt_ids), PREFILL_CHUNK):
        tokens = torch.tensor([prompt_ids[start : start + PREFILL_CHUNK]], device=device)  # (1, chunk)
        logits = model(tokens, start_pos=start)[0, -1]  # (vocab,)
    return logits


def decode_step(model, token_id, pos, device):
    tokens = torch.tensor([[token_id]], device=device)  # (1, 1)
    return model(tokens, start_pos=pos)[0, -1]  # (vocab,)


def generate(model, prompt_ids, max_new_tokens, stop_tokens, device):
    logits = prefill(model, prompt_ids, device)
    for step in range(max_new_tokens):
        support.check_finite(logits, model.norm.weight.dtype)
        token_id = int(logits.argmax())
        if token_id in stop_tokens:
            return
        yield token_id
        if step + 1 < max_new_tokens:  # no forward pass for a token that would not be used
            logits = decode_step(model, token_id, len(prompt_ids) + step, device)


def stream(token_ids, tokenizer):
    printed = []
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds back a character split across tokens
    for token_id in token_ids:
        print(utf8.decode(tokenizer.model.decode_single_token_bytes(token_id)), end="", flush=True)
        printed.append(token_id)
    print(utf8.decode(b"", final=True), end="", flush=True)
    return printed


def main():
    support.apply_environment(globals())
    support.silence_other_ranks()
    device = support.pick_device(DEVICE)
    dtype = support.pick_dtype(DTYPE, device)
    support.check_range("MAX_NEW_TOKENS", MAX_NEW_TOKENS, 1)
    support.check_range("PREFILL_CHUNK", PREFILL_CHUNK, 1)
    model_dir = support.find_checkpoint(Path(LLAMA_MODELS_DIR).expanduser(), MODEL_NAME)
    params = support.read_params(model_dir)
    tokenizer = support.load_tokenizer(model_dir, params)
    instruct = "instruct" in model_dir.name.lower()
    prompt_ids = encode_prompt(tokenizer, INPUT_STRING, SYSTEM_PROMPT, instruct)
    support.check_length(len(prompt_ids), MAX_NEW_TOKENS, params)
    support.check_shards(model_dir, params)
    support.check_memory(model_dir, dtype, device)

    init_distributed(device)
    start = time.perf_counter()
    model = load_model(model_dir, device, dtype, len(prompt_ids) + MAX_NEW_TOKENS, max_batch_size=1)
    print(f"loaded {model_dir.name} on {device} in {dtype} in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    start = time.perf_counter()
    token_ids = stream(generate(model, prompt_ids, MAX_NEW_TOKENS, tokenizer.stop_tokens, device), tokenizer)
    seconds = time.perf_counter() - start
    print(f"\n{len(prompt_ids)} prompt + {len(token_ids)} new tokens in {seconds:.1f} s ({len(token_ids) / seconds:.2f} tokens/s)", file=sys.stderr)
    print(f"peak memory {support.peak_memory_gib(device):.2f} GiB", file=sys.stderr)
    close_distributed()


if __name__ == "__main__":
    support.run(main)
