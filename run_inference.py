"""Run a Meta Llama 3.x checkpoint with plain PyTorch, fairscale and llama-models, every step explained.

This is the tutorial twin of minimal_run_inference.py: the same steps, in the same order, under the same
names, with the reasons written next to the code, plus two more ways to choose tokens (beam search and
top-p sampling), speculative decoding (a proposer drafts tokens, the model checks several in one pass) and a
chat mode that keeps the conversation in the KV cache. Read it top to bottom; it
follows the data: text, tokens, weights and cache, one layer, logits, the next token, text again.

What makes it fast lives in speedups.py, applied by one call in load_model; each idea is explained here,
where the story reaches it. SPEEDUPS=0 runs llama-models' own modules as written instead (in both modes
the RoPE table is ours, with the right factor for Llama 3.2: see rope_rotations).

Run it like its twin: edit the settings below, or override any of them with an environment variable of the
same name, e.g.

    MODEL_NAME=Llama3.2-1B BEAM_WIDTH=4 python run_inference.py
    MODEL_NAME=Llama3.2-1B-Instruct CHAT=1 python run_inference.py

stdout carries only the generated text; everything else (the model, memory, one line per token, speed)
goes to stderr, so `python run_inference.py > answer.txt` keeps just the answer. README.md says where to
get the checkpoints and how to run the tests.
"""

from support import exits  # first: from here on Ctrl-C ends with "interrupted", even during the imports

import base64
import codecs
import math
import os
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from llama_models.checkpoint import maybe_reshard_state_dict
from llama_models.datatypes import RawMessage
from llama_models.llama3.args import ModelArgs
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.model import Transformer

import speedups  # the fast path: speedups/
from support import checkpoint, devices, memory, picture, report, settings, torchrun  # support/: a file a concern

# ---------------------------------------------------------------------------------------------------------
# Settings. Each one can also be set by an environment variable of the same name (MAX_NEW_TOKENS=20 ...);
# the text is converted to the type of the default, and a value that does not convert is an error.
# ---------------------------------------------------------------------------------------------------------
# MODEL_NAME: a folder in LLAMA_MODELS_DIR: Llama3.2-1B, Llama3.2-3B, Llama3.1-8B, Llama3.3-70B, ...
# ("Instruct" in the name: the chat format)
MODEL_NAME = "Llama3.2-1B-Instruct"
LLAMA_MODELS_DIR = "~/.llama/checkpoints"  # where `llama-model download --source meta` puts checkpoints
INPUT_STRING = "The capital of France is"  # the user's message (Instruct) or the text to continue (base); not in CHAT
INPUT_FILE = ""  # a UTF-8 text file to use instead of INPUT_STRING, for long prompts; "" for none
SYSTEM_PROMPT = ""  # Instruct models only: a system message before the user's; "" for none
DEVICE = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "mps", "cuda", "cuda:1"
DTYPE = "auto"  # "auto" (bfloat16; float16 on GPUs without bfloat16), "bfloat16", "float16", "float32"
MAX_NEW_TOKENS = 64  # generation stops here unless a stop token comes first (in chat: per reply)
PREFILL_CHUNK = 256  # prompt tokens per forward call: bounds the memory of a long prompt's attention
QUANTIZE = ""  # "int8", "int4": smaller linear weights, faster decoding (see "8-bit and 4-bit weights"); "": as stored
SPEEDUPS = 1  # 1: the fast path of speedups/; 0: llama-models' Transformer exactly as written
KERNELS = "measure"  # the fast path's kernels: "measure" (timed on this CPU once, cached), "rule", or names

# How the next token is chosen. The default is greedy: always the most likely token.
BEAM_WIDTH = 1  # > 1: beam search keeps this many candidate continuations (4 or 5 is usual); 1: greedy
LENGTH_PENALTY = 1.0  # beam search: a finished beam's score is its log-probability / length**LENGTH_PENALTY
NUM_RETURN_SEQUENCES = 1  # beam search: print this many of the best finished beams (at most BEAM_WIDTH)
TEMPERATURE = 0.0  # > 0: sample instead (Meta's own scripts use 0.6); 0: off
TOP_P = 0.9  # sampling: draw only from the most likely tokens that together hold this much probability
SEED = 0  # sampling: the same seed gives the same text
# Speculative decoding (see "Speculative decoding"): a proposer drafts tokens, the model checks them in one pass.
DRAFT = ""  # "": off; "lookup": tokens copied from the prompt and the text so far; "self-int4": this model in int4;
# or a smaller model's folder in LLAMA_MODELS_DIR with the same tokenizer (Llama3.2-1B drafting for Llama3.1-8B)
DRAFT_TOKENS = 3  # drafts per round (k), chosen by measuring: see "What the numbers say" under "Speculative decoding"
DRAFT_MEASURE = 1  # 1: after the text, decode the same tokens again one per step, to report the measured speedup

CHAT = 0  # 1: a conversation with an Instruct model: your messages on stdin, one per line; the replies on stdout
CHAT_CONTEXT = 4096  # chat: tokens the KV cache holds for the whole conversation (at most the model's context)
SHOW_TOKENS = 1  # 1: a stderr line per new token (id, probability, runners-up); 0: off (always off in chat)
SHOWN_ALTERNATIVES = 3  # runners-up printed per token when SHOW_TOKENS is on
LOOK_INSIDE = 1  # 1: after the text, a table of what each layer predicts and reads at the prompt's last token; 0: off
LOOK_INSIDE_PNG = ""  # a .png file: the look inside also drawn as a picture (needs matplotlib); "": none
LOOK_INSIDE_LAYER = 0  # the layer whose heads the picture shows, 1 .. n_layers; 0: three quarters of the way up


# ---------------------------------------------------------------------------------------------------------
# Text to tokens.
# tokenizer.model is a text file with one line per token: the token's bytes in base64, then its rank (its
# id). The line "IFBhcmlz 12366" is the 6 bytes " Paris" with id 12366. There are 128,000 such byte
# sequences; the tokenizer (tiktoken, a byte-pair encoder) splits text into the longest ones it knows.
# After them come 256 special tokens that never appear in text, such as <|begin_of_text|> (128000).
#
# Base models continue text: the prompt is <|begin_of_text|> and the text. Instruct models were trained
# on dialogs, each message wrapped in special tokens, and answer when the prompt ends with an open
# assistant header:
#   <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM_PROMPT}<|eot_id|>
#   <|start_header_id|>user<|end_header_id|>\n\n{INPUT_STRING}<|eot_id|>
#   <|start_header_id|>assistant<|end_header_id|>\n\n
# llama-models' ChatFormat builds exactly this; the model's reply then ends with <|eot_id|>.
# Which one applies is read from the model's name ("Instruct"): the two kinds have identical shapes.
# ---------------------------------------------------------------------------------------------------------
def encode_prompt(tokenizer, text, system_prompt, instruct):
    if not instruct:
        return tokenizer.encode(text, bos=True, eos=False)
    messages = [RawMessage(role="system", content=system_prompt)] if system_prompt else []
    messages.append(RawMessage(role="user", content=text))
    return ChatFormat(tokenizer).encode_dialog_prompt(messages).tokens


def describe_tokenizer(path, tokenizer, prompt_ids):
    """Show a few lines of tokenizer.model decoded, and the prompt as the model sees it."""
    [paris] = tokenizer.encode(" Paris", bos=False, eos=False)  # its id is its line number in the file
    for line in path.read_text().splitlines()[paris : paris + 2]:  # " Paris" and its neighbour
        token_b64, rank = line.split()
        print(f"tokenizer.model line {line!r}: bytes {base64.b64decode(token_b64)!r}, id {rank}", file=sys.stderr)
    print(f"prompt: {len(prompt_ids)} tokens {tokenizer.decode(prompt_ids)!r}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# Weights and the KV cache: from the file to the model without copies.
#
# params.json holds the sizes: dim (width of the hidden vector, 2048 for 1B), n_layers (transformer
# blocks), n_heads (query heads; head_dim = dim / n_heads = 64), n_kv_heads (key/value heads, shared by
# groups of query heads: grouped-query attention), vocab_size (128,256 tokens), ffn_dim_multiplier and
# multiple_of (the feed-forward width, 8192 for 1B), norm_eps (RMSNorm's epsilon), rope_theta and
# use_scaled_rope (see RoPE below). ModelArgs takes them, plus two sizes for the job at hand:
# max_seq_len (prompt + new tokens) and max_batch_size (1, or the beam width).
#
# Three tricks keep memory at the size of the file:
# 1. The meta device. Building Transformer(args) normally allocates every weight and fills it with
#    random numbers, only for the checkpoint to overwrite them. Under torch.device("meta") tensors have a
#    shape but no memory. (checkpoint.without_weight_init also covers fairscale's layers, which allocate
#    their weights with a legacy constructor that ignores the meta device, and skips their initialisation.)
# 2. mmap. torch.load(..., mmap=True) maps the file into memory instead of reading it: tensors point into
#    the file, and the OS pages bytes in when they are first used. llama-models' maybe_reshard_state_dict
#    does this; when this run has another number of processes than the checkpoint has shards, it merges
#    or splits them (a real copy), as long as one number divides the other.
# 3. assign=True. load_state_dict normally copies each tensor into the module's existing one; assign
#    makes the module's parameter *be* the loaded tensor. Llama 3.2 stores its output layer and its
#    embedding table once (tied weights); checkpoint.tie_weights keeps them one parameter, so that
#    model.to() below, which copies only if it has to (to a GPU, or to another dtype), copies it once.
# Then the one call that makes decoding fast, speedups.apply: it swaps named modules into the model
# (print(model) shows them) while the weights are still the mapped file. Each of its ideas is explained
# below, after the part of the model it speeds up ("Making the layer fast").
#
# The KV cache. Each new token attends to the keys and values of all tokens before it. Recomputing them
# every step would make step n cost n times a step; instead every attention layer keeps them in
# cache_k and cache_v, one row per sequence in the batch, sized to this job by ModelArgs (max_batch_size
# x max_seq_len positions). ModelArgs' defaults (32 sequences x 2048 tokens) would take 4.3 GB in float32
# for the 1B model, more than its weights: the original version of this project did exactly that.
# ---------------------------------------------------------------------------------------------------------
def load_model(model_dir, params, device, dtype, max_seq_len, max_batch_size, use_speedups=True, quantize="",
               kernels="measure"):
    args = ModelArgs(**params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    with torch.device("meta"), checkpoint.without_weight_init():
        model = Transformer(args)  # shapes only
    with checkpoint.reading_checkpoint(model_dir):  # quiet; a damaged file becomes a one-line error
        weights = maybe_reshard_state_dict(checkpoint.weight_files(model_dir), args.n_kv_heads)
    checkpoint.check_weights(model, weights, model_dir)  # names and shapes agree with params.json
    model.load_state_dict(weights, assign=True)  # the parameters are now the memory-mapped tensors
    checkpoint.tie_weights(model)
    if use_speedups:
        speedups.apply(model, device, dtype, quantize, kernels, report.Progress("preparing weights"))
    model.to(device=device, dtype=dtype)  # floating-point tensors only: 8- and 4-bit weights stay as they are
    for layer in model.layers:  # the KV cache, sized to this job (its shape was set on the meta device)
        layer.attention.cache_k = torch.zeros_like(layer.attention.cache_k, device=device, dtype=dtype)
        layer.attention.cache_v = torch.zeros_like(layer.attention.cache_v, device=device, dtype=dtype)
    model.freqs_cis = rope_rotations(args, rope_scale_factor(args)).to(device)
    return model


def model_device(model):
    """Where the model's tensors are: token ids go there."""
    return model.tok_embeddings.weight.device


# ---------------------------------------------------------------------------------------------------------
# RoPE: how the model knows where each token is.
# Attention compares queries and keys with dot products, which by themselves ignore order. Rotary
# position embedding (RoPE) rotates each pair of numbers (0,1), (2,3), ... of every query and key by an
# angle proportional to the token's position, pair i turning at frequency theta**(-2i/head_dim) radians
# per token. The dot product of two rotated vectors then depends on how far apart the tokens are.
#
# Llama 3.1 and later stretch the slow pairs so that a model trained on 8,192 tokens works up to 131,072.
# Count how many full turns a pair makes over the original context (ROPE_ORIGINAL_CONTEXT): pairs that
# turn fewer than ROPE_LOW_FREQ_FACTOR times turn FACTOR times slower, pairs that turn more than
# ROPE_HIGH_FREQ_FACTOR times are unchanged, and those in between are blended linearly.
# llama-models 0.3.0 hard-codes FACTOR = 8 (apply_scaling in llama_models/llama3/model.py), right for 3.1
# and 3.3, but Llama 3.2 1B and 3B were trained with 32 (Meta's published configs; meta-llama/llama-models
# issue 166). With the wrong factor, short prompts look fine and long ones slowly degrade. Rather than edit
# the installed package, we compute the rotation table ourselves with the right factor and hand it to the
# model (model.freqs_cis in load_model). Folder names can change, so the 3.2 models are recognised by
# their shapes (dim, n_layers), which no other Llama 3.x model has.
# ---------------------------------------------------------------------------------------------------------
ROPE_SCALE_FACTOR = 8  # Llama 3.1 and 3.3
ROPE_SCALE_FACTORS = {(2048, 16): 32, (3072, 28): 32}  # Llama 3.2 1B and 3B
ROPE_ORIGINAL_CONTEXT = 8192  # the context length the model was first trained with
ROPE_LOW_FREQ_FACTOR = 1  # pairs turning fewer times than this over the original context: slowed by the factor
ROPE_HIGH_FREQ_FACTOR = 4  # pairs turning more times than this: unchanged; in between: blended


def rope_scale_factor(args):
    return ROPE_SCALE_FACTORS.get((args.dim, args.n_layers), ROPE_SCALE_FACTOR)


def rope_rotations(args, scale_factor):
    head_dim = args.dim // args.n_heads
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))  # (head_dim // 2,) rad/token
    if args.use_scaled_rope:
        turns = ROPE_ORIGINAL_CONTEXT * freqs / (2 * torch.pi)  # turns over the original context
        # the share kept unscaled: 0 at or below ROPE_LOW_FREQ_FACTOR turns, 1 at or above ROPE_HIGH_FREQ_FACTOR
        band = (turns - ROPE_LOW_FREQ_FACTOR) / (ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR)
        keep = band.clamp(0, 1)
        freqs = (1 - keep) * freqs / scale_factor + keep * freqs
    angles = torch.outer(torch.arange(args.max_seq_len).float(), freqs)  # (max_seq_len, head_dim // 2)
    return torch.polar(torch.ones_like(angles), angles)  # cos + i sin: llama-models rotates with complex numbers


# ---------------------------------------------------------------------------------------------------------
# One layer, step by step.
# Each of the n_layers TransformerBlocks (llama_models/llama3/model.py) adds two things to the hidden
# vector x of every position: what attention finds in the positions so far, then what the feed-forward
# network makes of it. layer_by_hand computes one block the long way. It calls the block's own norms and
# linear layers (so 8- and 4-bit weights, the fast path's kernels and torchrun's slices of the heads all
# apply) and writes out everything between them. The shapes in the comments are the 1B model's (dim
# 2048, 32 query heads sharing 8 key-value heads, head_dim 64, feed-forward width 8192) for `seqlen` new
# positions starting at start_pos.
# The real block writes its new keys and values into the KV cache; layer_by_hand only reads the cache's
# earlier positions, so running it changes nothing the model generates. main runs it on the prompt beside
# the real block and prints how far apart the two are; "A look inside" below runs it through every layer.
# ---------------------------------------------------------------------------------------------------------
def layer_by_hand(block, x, start_pos, rotations):
    """One TransformerBlock on x (batch, seqlen, dim) at positions start_pos ... start_pos + seqlen - 1, with
    the KV cache's positions before start_pos as context. Returns the block's output (batch, seqlen, dim) and
    the attention weights (batch, heads, seqlen, start_pos + seqlen)."""
    attention, feed_forward = block.attention, block.feed_forward
    batch, seqlen, _ = x.shape
    heads, kv_heads, head_dim = attention.n_local_heads, attention.n_local_kv_heads, attention.head_dim
    end = start_pos + seqlen
    h = block.attention_norm(x)  # (batch, seqlen, 2048)  RMSNorm: x / sqrt(mean(x**2) + eps) * weight
    q = attention.wq(h).view(batch, seqlen, heads, head_dim)  # (batch, seqlen, 32, 64)  a query per head
    k = attention.wk(h).view(batch, seqlen, kv_heads, head_dim)  # (batch, seqlen, 8, 64)  a key and a value
    v = attention.wv(h).view(batch, seqlen, kv_heads, head_dim)  # (batch, seqlen, 8, 64)  per key-value head
    q, k = rotate(q, rotations[start_pos:end]), rotate(k, rotations[start_pos:end])  # RoPE
    past_keys, past_values = cached_keys_values(attention, batch, start_pos)  # (batch, start_pos, 8, 64) each
    keys = torch.cat([past_keys, k], dim=1).float()  # (batch, end, 8, 64)  every position so far
    values = torch.cat([past_values, v], dim=1).float()
    # Query head i reads key-value head i // 4: group the 32 query heads as 8 groups of 4 (no copies).
    q = q.float().view(batch, seqlen, kv_heads, heads // kv_heads, head_dim)  # (batch, seqlen, 8, 4, 64)
    # einsum letters: b batch, s new position, k key-value head, g query head in its group, p any position, d 64
    scores = torch.einsum("bskgd,bpkd->bkgsp", q, keys) / math.sqrt(head_dim)  # (batch, 8, 4, seqlen, end)
    causal = torch.arange(end, device=x.device) <= torch.arange(start_pos, end, device=x.device)[:, None]
    scores = scores.masked_fill(~causal, float("-inf"))  # (seqlen, end) mask: no position sees a later one
    weights = torch.softmax(scores, dim=-1)  # (batch, 8, 4, seqlen, end)  each row sums to 1
    mixed = torch.einsum("bkgsp,bpkd->bskgd", weights, values)  # (batch, seqlen, 8, 4, 64)  weighted values
    x = x + attention.wo(mixed.reshape(batch, seqlen, heads * head_dim).type_as(x))  # (batch, seqlen, 2048)
    h = block.ffn_norm(x)  # (batch, seqlen, 2048)
    gate = F.silu(feed_forward.w1(h))  # (batch, seqlen, 8192)  SwiGLU: silu(a) = a * sigmoid(a) gates ...
    x = x + feed_forward.w2(gate * feed_forward.w3(h))  # ... w3's features; w2 mixes them back to 2048
    return x, weights.reshape(batch, heads, seqlen, end)


def rotate(x, rotations):
    """RoPE by hand: pair (2i, 2i + 1) of every head turned by the angle of its position and frequency i.
    x: (batch, seqlen, heads, head_dim); rotations: (seqlen, head_dim // 2) complex numbers cos + i sin."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (batch, seqlen, heads, head_dim // 2, 2)
    first, second = pairs[..., 0], pairs[..., 1]
    cos, sin = rotations.real[:, None], rotations.imag[:, None]  # (seqlen, 1, head_dim // 2): the same for all heads
    turned = torch.stack([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return turned.flatten(-2).type_as(x)


LLAMA_MODELS_CACHE_POSITIONS_DIM = 1  # llama-models' Attention caches (batch, seq, kv_heads, head_dim)


def cached_keys_values(attention, batch, end):
    """The keys and values an attention layer's KV cache holds for positions 0 .. end - 1, each as
    (batch, end, kv_heads, head_dim). The module says which dimension of its cache counts positions."""
    positions = getattr(attention, "cache_positions_dim", LLAMA_MODELS_CACHE_POSITIONS_DIM)
    keys = attention.cache_k[:batch].narrow(positions, 0, end).movedim(positions, 1)
    values = attention.cache_v[:batch].narrow(positions, 0, end).movedim(positions, 1)
    return keys, values


@torch.inference_mode()  # no autograd bookkeeping: nothing here is trained
def compare_layer_by_hand(model, prompt_ids):
    """Run the first block on the prompt's first chunk, by hand and as llama-models' TransformerBlock, and
    print the largest difference. The real block rewrites the cache rows prefill will write; they are kept."""
    block = model.layers[0]
    tokens = torch.tensor([prompt_ids[:PREFILL_CHUNK]], device=model_device(model))  # (1, seqlen)
    x = model.tok_embeddings(tokens)  # (1, seqlen, dim)
    seqlen = x.shape[1]
    ours, _ = layer_by_hand(block, x, 0, model.freqs_cis)
    # the causal mask, as llama-models' Transformer.forward builds it for a chunk at position 0
    mask = torch.full((seqlen, seqlen), float("-inf"), device=x.device).triu(1).type_as(x) if seqlen > 1 else None
    saved_keys, saved_values = block.attention.cache_k.clone(), block.attention.cache_v.clone()
    real = block(x, 0, model.freqs_cis[:seqlen], mask)  # writes keys and values for positions 0 .. seqlen - 1
    block.attention.cache_k.copy_(saved_keys)
    block.attention.cache_v.copy_(saved_values)
    gap = (ours.float() - real.float()).abs().max().item()
    print(f"layer 0 by hand (layer_by_hand) against llama-models' TransformerBlock, {seqlen} prompt tokens: "
          f"largest difference {gap:.2g}, {gap / real.float().abs().max().item():.2g} of the largest value",
          file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# Making the layer fast (speedups/; its docstrings have the details, `python benchmarks/bench_kernels.py`
# measures every kernel on your machine).
# The linear layers: most of the time, and most of the bytes. Decoding one token multiplies every weight
# matrix by one vector: each weight is read from memory once for one multiply-add, so the time per token is
# about the bytes of the weights over the memory bandwidth. wq, wk and wv read the same input, and so do w1
# and w3: each group becomes one matrix (wqkv, w13), one product that reads its input once. A prompt chunk
# is the other way round: each weight serves hundreds of rows, arithmetic sets the pace, and on a CPU
# without bfloat16 instructions float32's products are several times faster, so the weights are widened to
# float32 a block at a time there (8- and 4-bit weights too; to bfloat16 where the CPU has bfloat16
# instructions, whose products are then the fastest). The fastest kernel depends on the CPU, the number
# format and the rows per product (one, a few, a chunk); the fastest on one CPU was the slowest on another,
# and some were wrong on some CPUs. So speedups/ first tries every candidate here (it must build, run, and
# give the float32 product of the same weights to within rounding), times the survivors on the model's own
# weights once, caches the timings, and keeps the fastest: the "fast path" line says which, and what it
# skipped.
#
# 8-bit and 4-bit weights (QUANTIZE): fewer bytes to stream per token, and less memory.
#   int8: each output row w gets a scale, scale = max(|w|) / 127, w_int8 = round(w / scale): w ~ w_int8 *
#     scale, at most scale / 2 off per weight. The product is x @ w_int8.T * scale.
#   int4: each run of 32 weights in a row gets a scale = (max - min) / 15 and an offset min; q = round((w -
#     min) / scale) in 0 .. 15, w ~ q * scale + min; two weights per byte. The rows are kept in tiles of 16,
#     side by side: a kernel multiplies 16 rows at once, one per slot of a 512-bit register, so the work of
#     applying each run's scale serves 16 rows, and a tile is read front to back in one stream
#     (speedups/quantized.cpp draws the layout; `python benchmarks/bench_kernels.py` times it).
# Integers times integers: PyTorch's stock kernels widen each weight to a float and spend a float
# multiply-add on it, so on a few cores they run out of instructions before memory runs out of bytes.
# speedups/quantized.cpp rounds x to 8 bits too (a scale per 32 inputs) and multiplies bytes by bytes: one
# AVX-512 VNNI instruction makes 64 byte products and adds them into 16 sums. The same kernels take a prompt
# chunk too, each weight block read once for several rows: where the CPU has no bfloat16 instructions, bytes
# times bytes can beat widening to float32 (`python benchmarks/bench_kernels.py --rows 256`). Integer sums are
# exact; the new error is x's rounding (`python benchmarks/bench_accuracy.py`: what each format costs real text).
# The embedding table stays in bfloat16, memory-mapped; each weight is converted a block of rows at a
# time, and the block's pages of the mapped file released, so the bfloat16 model is never resident beside it.
#
# Pages. Memory is handed out in pages, 4 KiB each by default, and before reading a byte the CPU looks up
# which physical page holds it. It caches a few thousand such translations (the TLB); a decoding step
# streams through all the weights, 600,000 pages for the 1B model in bfloat16, so nearly every page costs
# a lookup. Linux can back memory with 2 MiB pages instead ("transparent huge pages", asked for with
# madvise): 512 times fewer lookups. So on a CPU speedups/ builds the weights it makes (wqkv, w13, 8- and
# 4-bit weights) in memory asked for 2 MiB pages, and copies there the file's own weights that a step reads
# as they are (wo, w2 and the output table in bfloat16), 2 MiB at a time, each piece's file pages let go once
# copied; the "fast path" line says how many GB of the weights Linux backed with them (`python
# benchmarks/bench_kernels.py` and `python benchmarks/bench_decode.py --only minimal,minimal-small-pages`
# measure what it buys).
#
# Reading ahead. A step reads each weight once, but the CPU keeps every line it loads in its caches, so the
# weights flowing through (0.8 GB a step in int4, 2.5 GB in bfloat16) push out what the step does reuse: the
# activations, the KV cache, Python's and PyTorch's own data; every small operation between two products then
# starts with cache misses. speedups/quantized.cpp's products ask for the weight a few KB ahead of where they
# read, with non-temporal prefetches (prefetchnta: a hint that a line is used once, which the CPU keeps out of
# the caches' long-lived part): each line arrives before it is needed, and the rest of the step keeps its
# caches (`python benchmarks/bench_kernels.py` times decode steps with it and without, taking turns).
#
# Attention. llama-models' Attention copies each key-value head's cached keys and values 4 times
# (repeat_kv), so that every query head has its own: copies that grow with the context, at every step.
# speedups.GroupedQueryAttention lays its cache out (batch, kv_heads, seq, head_dim) and hands it to
# PyTorch's fused attention, which reads each key-value head in place for the 4 query heads that share
# it, as layer_by_hand's grouping does. If you edit Attention.forward in an editable llama-models (README:
# "Hacking the architecture"), run with SPEEDUPS=0: with SPEEDUPS=1 speedups' attention replaces it.
#
# The small steps. With one token per step, RMSNorm and RoPE each touch a few thousand numbers, under a
# microsecond of arithmetic, but llama-models writes each as several PyTorch operations (RMSNorm: widen,
# square, mean, add, rsqrt, multiply, round, multiply by the weight), and every operation costs microseconds
# to dispatch and allocate: a step of the 1B model runs 33 norms, 16 RoPEs and 32 cache writes. Where
# speedups/ built its C++, speedups/decoding.cpp does each as one loop, with the same math and roundings
# (speedups.OneCallRMSNorm; GroupedQueryAttention rotates and writes the cache in one call; benchmarks/README.md,
# "One call each", has what it saved).
# ---------------------------------------------------------------------------------------------------------


def describe_model(model, args):
    """Print what is in memory: the weights per dtype, the KV cache, the RoPE factor, and the fast path."""
    gib = {}  # per dtype: 8- or 4-bit weights and the 16-bit rest, when quantised
    for tensor in report.distinct_tensors(model):  # tied weights are one tensor: counted once
        dtype = devices.dtype_name(tensor.dtype)
        gib[dtype] = gib.get(dtype, 0) + tensor.nbytes / memory.GIB
    attention = model.layers[0].attention
    cache_bytes = 2 * len(model.layers) * attention.cache_k.numel() * attention.cache_k.element_size()
    print(
        f"{args.n_layers} layers, dim {args.dim}, {args.n_heads} query / {args.n_kv_heads} key-value heads, "
        f"vocab {args.vocab_size}, RoPE scale factor {rope_scale_factor(args) if args.use_scaled_rope else 'none'}; "
        f"weights {' + '.join(f'{size:.2f} GiB {dtype}' for dtype, size in gib.items())}, "
        f"KV cache {cache_bytes / 2**20:.1f} MiB ({args.max_batch_size} x {args.max_seq_len} tokens)",
        file=sys.stderr,
    )
    print(f"fast path: {speedups.describe(model) or 'off (SPEEDUPS=0): llama-models as written'}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# Tokens to logits: prefill, then one decode step per new token.
#
# model(tokens, start_pos) runs tokens of shape (batch, seqlen), which sit at positions start_pos ...
# start_pos + seqlen - 1, through the network:
#   embedding lookup                   (batch, seqlen) -> (batch, seqlen, dim)
#   n_layers x the block above         (batch, seqlen, dim), writing the new keys and values into the cache
#   final RMSNorm and output layer     -> (batch, seqlen, vocab) logits: one unnormalised score per
#                                      vocabulary token; softmax turns them into probabilities.
# Generation only reads the last position's logits. speedups.LastPositionLogits applies the output layer
# to the last position alone, (batch, 1, vocab): the output layer is the largest matrix (vocab x dim),
# and a 256-token prompt chunk would otherwise produce a (256, 128256) float32 tensor (131 MB) and spend
# 256 times its arithmetic on scores nobody reads. (The peak memory of a long prompt shows it:
# `python benchmarks/bench_decode.py --only minimal,minimal-speedups-off --depths 0,4096`.)
#
# Prefill runs the prompt through the model in chunks of PREFILL_CHUNK tokens: one pass over the weights
# serves all the tokens of a chunk. (One chunk for the whole prompt would be fastest, but attention
# compares every token of a chunk with every token before it: for a 10,000-token prompt on the 1B model
# the scores alone, 32 heads x 10,000 x 10,000 x 4 bytes, would need 12.8 GB.) Then each decode step
# feeds only the newest token (seqlen 1) at its position. A step's cost is dominated by reading every
# weight once (2.5 GB for 1B in bfloat16), so it stays nearly flat as the text grows; what does grow is
# attention's reading of the cache, one key and one value per cached position.
# start_pos lets a chat feed a new turn after the tokens already in the cache.
# No gradients are tracked: llama-models decorates Transformer.forward with @torch.inference_mode(),
# so PyTorch keeps no record of the operations for training, and no activations are held for it.
# ---------------------------------------------------------------------------------------------------------
def prefill(model, prompt_ids, start_pos=0):
    for start in range(0, len(prompt_ids), PREFILL_CHUNK):
        tokens = torch.tensor([prompt_ids[start : start + PREFILL_CHUNK]], device=model_device(model))  # (1, chunk)
        logits = model(tokens, start_pos=start_pos + start)[0, -1]  # (vocab,): the chunk's last position
    return logits


def decode_step(model, token_ids, pos):
    """Feed one token per sequence in the batch, all at position `pos`; return each sequence's next logits."""
    tokens = torch.tensor(token_ids, device=model_device(model)).view(-1, 1)  # (batch, 1)
    return model(tokens, start_pos=pos)[:, -1]  # (batch, vocab)


# ---------------------------------------------------------------------------------------------------------
# A look inside: what each layer would predict at each position, and where each head looks.
# The hidden vector that flows from layer to layer (the "residual stream") is in the same space at every
# depth: each layer adds to it. So the final RMSNorm and the output layer, which turn the last layer's
# vector into logits, can be applied after any layer, as if the model stopped there. This "logit lens"
# shows the prediction forming: early layers often propose frequent tokens, later ones the answer.
# Beside it, each layer's attention weights say which earlier tokens a position read. Many heads park
# their weight on the first token when nothing else is relevant (an "attention sink").
#
# look_inside runs prompt positions again through every layer with layer_by_hand, PREFILL_CHUNK positions
# at a time, reading the keys and values that the prompt's pass left in the cache for the positions before
# each chunk, and writing nothing. After each layer the chunk's vectors go through the final norm and the
# output layer, and only the LOOK_INSIDE_TOP most likely tokens at each position are kept: the logits of
# one chunk after one layer exist for a moment, never those of every layer and position at once (for
# 4,096 positions of the 1B model, 16 layers x 4,096 x 128,256 float32 numbers would be 33.6 GB).
# The output layer is the largest matrix, and the lens applies it once per layer and position, n_layers
# times what the model's own pass spends on it: so the script looks only at the positions it shows, the
# prompt's last LOOK_INSIDE_POSITIONS, which bounds its cost whatever the prompt's length, and
# look_inside(..., first=0) looks at every position. `python benchmarks/bench_look_inside.py` measures both
# against a prefill of the same prompt (benchmarks/README.md).
#
# What is shown comes from that one pass. On stderr, a table for the prompt's last position, a row per
# layer: the lens's top tokens, and the prompt tokens read most (the mean of the heads). With
# LOOK_INSIDE_PNG=look.png, also a picture of the same numbers (matplotlib, imported only then):
#   top     the logit-lens grid: layers (rows, 1 at the top as in the table) by positions (columns,
#           labelled with the token at that position); each cell is the most likely next token after that
#           layer, coloured by its probability. The last column is the table's first lens column. Read a
#           column downwards to watch one prediction form.
#   bottom  one heat map per head of layer LOOK_INSIDE_LAYER: row i holds position i's weights over the
#           positions it reads (columns; the upper triangle is empty, no position reads a later one). A bright
#           first column is the sink; a bright line just below the diagonal, a head that reads the previous
#           token. Why one layer, head by head, rather than the heads' mean for every layer: the table
#           already gives that mean, and a mean blurs what the heads do apart (one reads the previous token,
#           another the subject, the rest the sink). The default layer is three quarters of the way up: in
#           the last layers most heads read only the sink, and the first ones read what is near; between,
#           heads read the facts the answer needs (README's picture: in layer 23 of 30, two heads at "of"
#           read "iffel" of "The Eiffel Tower is in the city of"). When the prompt is longer than the
#           picture, the heat maps keep two more columns at the left, the first token and the sum over the
#           positions between it and the picture's, so that every row still sums to 1.
# ---------------------------------------------------------------------------------------------------------
LOOK_INSIDE_TOP = 3  # tokens shown per layer, for the lens and for attention
LOOK_INSIDE_POSITIONS = 32  # the picture's columns at most: the prompt's last positions, each cell still readable


class Look(NamedTuple):
    """What look_inside finds at positions first ... len(prompt_ids) - 1 (`positions` of them)."""
    probs: torch.Tensor  # (n_layers, positions, LOOK_INSIDE_TOP) the lens's top probabilities, best first
    token_ids: torch.Tensor  # (n_layers, positions, LOOK_INSIDE_TOP) their token ids
    last_attention: torch.Tensor  # (n_layers, heads, len(prompt_ids)) every layer's weights at the last position
    head_maps: torch.Tensor  # (heads, positions, len(prompt_ids)) one layer's weights at each position looked at
    first: int


def lens_top(model, x):
    """The logit lens's LOOK_INSIDE_TOP tokens at each of x's vectors (positions, dim): (probabilities, ids),
    each (positions, LOOK_INSIDE_TOP). Each position goes through the output layer as a sequence of its own,
    (positions, 1, dim), since the fast path's output layer keeps only a sequence's last position."""
    logits = model.output(model.norm(x)[:, None])[:, -1].float()  # (positions, vocab)
    top_logits, top_ids = logits.topk(LOOK_INSIDE_TOP, dim=-1)  # (positions, LOOK_INSIDE_TOP)
    # softmax for the top tokens only: exp(logit - log of the sum of exp(every logit of the position))
    return (top_logits - logits.logsumexp(dim=-1, keepdim=True)).exp(), top_ids


def look_at_chunk(model, prompt_ids, start, end, layer):
    """Positions start ... end - 1 through every layer by hand: the lens's top probabilities and ids after
    each layer (n_layers, chunk, LOOK_INSIDE_TOP) each, every layer's attention weights at the chunk's last
    position (n_layers, heads, end) and layer `layer`'s (1 = the first) at every position (heads, chunk, end)."""
    tokens = torch.tensor([prompt_ids[start:end]], device=model_device(model))  # (1, chunk)
    x = model.tok_embeddings(tokens)  # (1, chunk, dim)
    probs, ids, last_rows = [], [], []
    for number, block in enumerate(model.layers, start=1):
        x, weights = layer_by_hand(block, x, start, model.freqs_cis)  # (1, chunk, dim), (1, heads, chunk, end)
        top_probs, top_ids = lens_top(model, x[0])
        probs.append(top_probs)
        ids.append(top_ids)
        last_rows.append(weights[0, :, -1])  # (heads, end)
        if number == layer:
            maps = weights[0]  # (heads, chunk, end)
    return torch.stack(probs), torch.stack(ids), torch.stack(last_rows), maps


@torch.inference_mode()
def look_inside(model, prompt_ids, layer, first=0):
    """The logit lens and attention at positions first ... len(prompt_ids) - 1, in one pass that reads the
    prompt's keys and values in the cache (row 0, as the prompt's pass leaves them) and writes nothing.
    Memory: the head maps hold heads x positions x len(prompt_ids) numbers, the rest far less."""
    end = len(prompt_ids)
    probs, ids, maps = [], [], []
    for start in range(first, end, PREFILL_CHUNK):
        chunk_probs, chunk_ids, last_attention, chunk_maps = look_at_chunk(
            model, prompt_ids, start, min(start + PREFILL_CHUNK, end), layer)
        probs.append(chunk_probs)
        ids.append(chunk_ids)
        maps.append(F.pad(chunk_maps, (0, end - chunk_maps.shape[-1])))  # 0 for the positions after the chunk
    return Look(torch.cat(probs, dim=1), torch.cat(ids, dim=1), last_attention, torch.cat(maps, dim=1), first)


def shown_layer(n_layers):
    """The layer whose heads the picture shows (1 = the first): LOOK_INSIDE_LAYER, or the one three quarters of
    the way up (rounded up)."""
    return LOOK_INSIDE_LAYER or -(-3 * n_layers // 4)


def check_look_inside(params):
    """LOOK_INSIDE_LAYER and LOOK_INSIDE_PNG, checked before the model loads; matplotlib imported here, only
    when there is a picture to draw."""
    settings.check_range("LOOK_INSIDE_LAYER", LOOK_INSIDE_LAYER, 0, params["n_layers"])
    if not LOOK_INSIDE_PNG:
        return
    if not LOOK_INSIDE or CHAT or torchrun.processes()[0] > 1:
        exits.fail(f"LOOK_INSIDE_PNG={LOOK_INSIDE_PNG!r} draws the look inside of a single run in one process: it "
                   "needs LOOK_INSIDE=1, and no CHAT or torchrun")
    path = Path(LOOK_INSIDE_PNG).expanduser()
    if path.suffix.lower() != ".png" or path.is_dir() or not os.access(path.parent, os.W_OK):
        exits.fail(f"LOOK_INSIDE_PNG={LOOK_INSIDE_PNG!r}: give a .png file name in a folder you can write to")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        exits.fail("LOOK_INSIDE_PNG needs matplotlib, which is not installed: pip install -r requirements.txt "
                   "(it pins the version), or leave LOOK_INSIDE_PNG empty")


def show_look_inside(model, tokenizer, prompt_ids):
    """The table for the prompt's last position on stderr and, with LOOK_INSIDE_PNG, the picture."""
    if torchrun.processes()[0] > 1:
        print("(LOOK_INSIDE needs one process: under torchrun each process holds only some heads)", file=sys.stderr)
        return
    layer = shown_layer(len(model.layers))
    look = look_inside(model, prompt_ids, layer, max(0, len(prompt_ids) - LOOK_INSIDE_POSITIONS))
    print_look_table(look, tokenizer, prompt_ids)
    if LOOK_INSIDE_PNG:
        drawn = picture.draw_look_inside(look, tokenizer, prompt_ids, layer)
        picture.save(drawn, Path(LOOK_INSIDE_PNG).expanduser())


def print_look_table(look, tokenizer, prompt_ids):
    """One aligned stderr table: per layer, the logit lens's top tokens and the most attended prompt tokens,
    at the prompt's last position."""
    top_probs, top_ids = look.probs[:, -1], look.token_ids[:, -1]  # (n_layers, LOOK_INSIDE_TOP) each
    mean_weights = look.last_attention.mean(dim=1)  # (n_layers, positions): the heads' mean
    top_weights, top_positions = mean_weights.topk(min(LOOK_INSIDE_TOP, len(prompt_ids)))
    print(f"\nlook inside, at the prompt's last token {tokenizer.decode(prompt_ids[-1:])!r}:\n"
          f"{'layer':>5}  {'logit lens: the next token if the model stopped here':<54}"
          f"attention: the prompt tokens read most (mean of {look.last_attention.shape[1]} heads)", file=sys.stderr)
    for layer in range(len(top_probs)):
        predicted = "  ".join(f"{tokenizer.decode([i])!r} {p:.2f}"
                              for p, i in zip(top_probs[layer].tolist(), top_ids[layer].tolist()))
        read = "  ".join(f"{tokenizer.decode([prompt_ids[i]])!r} {w:.2f}"
                         for w, i in zip(top_weights[layer].tolist(), top_positions[layer].tolist()))
        print(f"{layer + 1:>5}  {predicted:<54}{read}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# Choosing the next token, three ways.
# 1. Greedy: the most likely token. Deterministic, and what the minimal script does.
# 2. Top-p sampling: draw at random, but only among the most likely tokens that together hold TOP_P of
#    the probability, after dividing the logits by TEMPERATURE (< 1 sharpens, > 1 flattens). Varied text,
#    without the long tail of nonsense tokens. The same SEED gives the same draws.
# 3. Beam search (further below): looks ahead over several candidate continuations at once.
# Every token generate yields is fed back to the model before the next is chosen, except the last of
# MAX_NEW_TOKENS, which no forward pass needs: when generation ends on a stop token, the cache holds the
# prompt and every yielded token (the stop token itself is chosen, never fed); a chat continues from there.
# ---------------------------------------------------------------------------------------------------------
def pick_greedy(logits):
    return int(logits.argmax())


def top_p_probabilities(logits, temperature, top_p):
    """The distribution sampling draws from, for each row of logits (..., vocab): the softmax at `temperature`,
    cut to the nucleus and renormalised."""
    logits = logits.float()
    # shifted so that the largest is 0: a tiny temperature then sends the others to -inf, never inf - inf
    probs = torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / temperature, dim=-1)  # (..., vocab)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside_nucleus = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before it already reaches top_p
    sorted_probs[outside_nucleus] = 0.0  # the most likely token is always kept
    nucleus = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)  # back in vocabulary order
    return nucleus / nucleus.sum(dim=-1, keepdim=True)


def sample_top_p(logits, temperature, top_p, generator):
    probs = top_p_probabilities(logits, temperature, top_p)  # (vocab,)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))


def show_token(step, token_id, logits, tokenizer, note=""):
    """One aligned stderr line: step, id, text, probability, and the runners-up (then a note: speculative
    decoding says whether the token was drafted)."""
    probs = torch.softmax(logits.float(), dim=-1)
    top_probs, top_ids = probs.topk(SHOWN_ALTERNATIVES + 1)
    others = [f"{tokenizer.decode([i])!r} {p:.3g}" for p, i in zip(top_probs.tolist(), top_ids.tolist())
              if i != token_id][:SHOWN_ALTERNATIVES]
    text = repr(tokenizer.decode([token_id]))
    print(f"{step:>5} {token_id:>7} {text:<20} {probs[token_id]:<9.3g} {' | '.join(others)}{note}", file=sys.stderr)


def generate(model, prompt_ids, max_new_tokens, stop_tokens, start_pos=0, *, pick=pick_greedy, on_token=None):
    """Greedy (or sampled, with another `pick`) decoding with the KV cache; yields the id of each new token.
    (The minimal script's generate, plus two options: how to pick a token, and a look at each pick.)"""
    logits = prefill(model, prompt_ids, start_pos)
    for step in range(max_new_tokens):
        report.check_finite(logits, model.norm.weight.dtype)  # NaN or inf: stop, never print garbage
        token_id = pick(logits)
        if on_token:
            on_token(step, token_id, logits)
        if token_id in stop_tokens:
            return
        yield token_id
        if step + 1 < max_new_tokens:  # no forward pass for a token that would not be used
            logits = decode_step(model, [token_id], start_pos + len(prompt_ids) + step)[0]  # it sits at this position


# ---------------------------------------------------------------------------------------------------------
# Tokens back to text, as they come.
# A token is a sequence of bytes, not always whole characters: an emoji or a CJK character can be split
# across two tokens. Printing each token's bytes decoded on its own would print replacement characters
# (U+FFFD) in the middle of such a character. An incremental UTF-8 decoder holds back an incomplete
# character until its remaining bytes arrive, so the printed text is exactly tokenizer.decode(all ids).
# stream passes the ids on as it prints them.
# ---------------------------------------------------------------------------------------------------------
def stream(token_ids, tokenizer):
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds back a character split across tokens
    for token_id in token_ids:
        print(utf8.decode(tokenizer.model.decode_single_token_bytes(token_id)), end="", flush=True)
        yield token_id
    print(utf8.decode(b"", final=True), end="", flush=True)


# ---------------------------------------------------------------------------------------------------------
# Speculative decoding: several tokens for one pass over the weights (DRAFT, DRAFT_TOKENS).
# A decode step feeds one token and reads every weight once: its time is the weights' bytes over the
# memory bandwidth, and the arithmetic is nearly free. A pass that feeds k + 1 tokens reads each weight
# once too, multiplying it by k + 1 vectors while it is at hand, and returns k + 1 rows of logits, row i
# for the text up to its token i. For small k it costs about one step where the kernels for a few rows
# stream the weights as fast as the one-row kernel does (a GPU's); on a CPU it costs more (`python
# benchmarks/bench_decode.py --only verify-cost` measures it). The catch: to feed a token, we must know it.
# So a cheap proposer guesses k tokens (drafts), and one pass of the model checks them all: it feeds the
# last token chosen and the k drafts at their positions,
#     fed:         last   d1   d2   d3   d4        positions pos .. pos + 4, one forward pass
#     logits row:   0     1    2    3    4         row i: what the model would choose after d1 .. di
# The rows of positions after a wrong draft read a text that will not be, and are dropped; their keys and
# values stay in the cache past the text, where nothing reads them (attention looks back only), until the
# next pass writes over them. speedups' output layer computes the last position only; every_position asks
# it for all (llama-models' own, with SPEEDUPS=0, always computes all).
# ---------------------------------------------------------------------------------------------------------
def verify(model, token_ids, pos):
    """One forward pass over token_ids at positions pos, pos + 1, ...; returns every position's logits."""
    tokens = torch.tensor([token_ids], device=model_device(model))  # (1, k + 1)
    with speedups.every_position(model):
        return model(tokens, start_pos=pos)[0]  # (k + 1, vocab)


# Greedy: the drafts are kept up to the first one that differs from its row's argmax, and that row's
# argmax follows them: between 1 and k + 1 tokens a pass, never fewer than a plain step gives.
# Why the text stays exactly plain greedy's: each token kept is the argmax of a row whose input is the text
# so far, all of it kept tokens; which is how plain greedy picks it. Only the rounding can differ: k + 1
# rows may be summed in another order than one. In float32 the texts are identical; in bfloat16 they can
# part where two tokens are nearly tied (tests/test_speculative.py measures how near).
def accept_greedy(drafts, logits):
    """The drafts the model agrees with, then the model's own token: 1 .. len(drafts) + 1 token ids."""
    choices = logits.argmax(dim=-1).tolist()  # (k + 1,): the model's choice after each prefix
    kept = 0
    while kept < len(drafts) and drafts[kept] == choices[kept]:
        kept += 1
    return drafts[:kept] + [choices[kept]]


# Sampling (TEMPERATURE > 0): the text must be drawn from the model's distribution p (after temperature and
# top-p), whatever the proposer, which drew draft d from its own q (the same temperature and top-p;
# prompt lookup's q is all on its token). Draft d is kept with probability min(1, p(d) / q(d)); at the
# first draft rejected, the token is drawn from max(0, p - q) renormalised instead, and the round ends.
# Every token x then has probability p(x). Proposed and kept: q(x) min(1, p(x) / q(x)) = min(p(x), q(x)).
# Drawn after a rejection: the rejection's probability, r = sum over y of q(y) - min(p(y), q(y)), which
# is the sum of max(0, p(y) - q(y)) (p and q both sum to 1), times max(0, p(x) - q(x)) / r. Together,
# min(p(x), q(x)) + max(0, p(x) - q(x)) = p(x). When every draft is kept, one more token is drawn from the
# last row's p. (The rule of Leviathan et al. and of Chen et al., 2023.)
def accept_sampled(drafts, draft_probs, logits, sampling):
    """The accept/reject rule; draft_probs (k, vocab) is q for each draft, None for point masses."""
    temperature, top_p, generator = sampling
    p = top_p_probabilities(logits, temperature, top_p)  # (k + 1, vocab)
    for i, draft in enumerate(drafts):
        q = draft_probs[i] if draft_probs is not None else F.one_hot(torch.tensor(draft), p.shape[-1]).to(p)
        if torch.rand(1, generator=generator, device=p.device).item() < p[i, draft] / q[draft]:
            continue  # kept (always, where p(d) >= q(d))
        residual = (p[i] - q).clamp(min=0)  # (vocab,): where the model wants more than the proposer offered
        return drafts[:i] + [draw(residual / residual.sum(), generator)]
    return drafts + [draw(p[-1], generator)]


def draw(probs, generator):
    return int(torch.multinomial(probs, num_samples=1, generator=generator))


def sampling_rule(device):
    """None for greedy; else (TEMPERATURE, TOP_P, a random generator seeded with SEED)."""
    if TEMPERATURE == 0:
        return None
    return TEMPERATURE, TOP_P, torch.Generator(device=device).manual_seed(SEED)


# The proposers (DRAFT). Each drafts up to k tokens from the whole text so far, and chooses them the way the
# model does (greedy, or sampled with the same rule: then it returns q too).
#   lookup     no second model: the text's last LOOKUP_NGRAM tokens (then fewer) are looked up in the
#              prompt and the text so far, and the tokens that followed their most recent earlier
#              occurrence are proposed. Free to run; right where the text repeats what it read
#              (summarising, quoting, editing code), wrong elsewhere, where it costs a pass of k + 1 rows.
#   self-int4  the same checkpoint loaded again with 4-bit weights (QUANTIZE=int4): a step reads about a
#              third of the bytes, and its choices mostly agree with the model's.
#   a folder   a smaller model of the same family: Llama3.2-1B drafting for Llama3.1-8B or 70B.
# A draft model keeps a KV cache of its own. Each round it compares the text with the tokens its cache
# holds, keeps the common part and feeds the rest (the model's own token, a rejected draft's replacement,
# a chat's new turn), writing over what it held past the common part; then it drafts, one step a token.
LOOKUP_NGRAM = 3  # the longest run of last tokens prompt lookup searches for


class Proposer:
    """What every proposer holds: k (DRAFT_TOKENS), how tokens are chosen (sampling_rule), and the counts of
    verify passes, drafted and accepted tokens (tally)."""

    def __init__(self, draft_tokens, sampling):
        self.draft_tokens = draft_tokens
        self.sampling = sampling
        self.tally = Counter()


class PromptLookup(Proposer):
    def propose(self, token_ids, k):
        """(up to k token ids, None: each a point mass)."""
        for n in range(min(LOOKUP_NGRAM, len(token_ids) - 1), 0, -1):  # the longest match first
            tail = token_ids[-n:]
            for start in range(len(token_ids) - n - 1, -1, -1):  # the most recent occurrence first
                if token_ids[start : start + n] == tail:
                    return token_ids[start + n : start + n + k], None
        return [], None


class DraftModel(Proposer):
    def __init__(self, model, draft_tokens, sampling):
        super().__init__(draft_tokens, sampling)
        self.model = model
        self.cached = []  # the token ids whose keys and values its cache holds, at positions 0, 1, ...

    def propose(self, token_ids, k):
        """(k token ids, their q (k, vocab), or None when greedy)."""
        agreed = common_prefix_length(self.cached, token_ids[:-1])  # the last token is fed: its logits are needed
        del self.cached[agreed:]  # written over from here (a Ctrl-C in the middle leaves this list true)
        logits = prefill(self.model, token_ids[agreed:], agreed)  # catching up: (vocab,) after the last token
        self.cached = list(token_ids)
        drafts, probs = [], []
        for _ in range(k):
            if self.sampling:
                temperature, top_p, generator = self.sampling
                probs.append(top_p_probabilities(logits, temperature, top_p))  # q: (vocab,)
                drafts.append(draw(probs[-1], generator))
            else:
                drafts.append(pick_greedy(logits))
            if len(drafts) < k:  # the last draft needs no pass
                logits = decode_step(self.model, drafts[-1:], len(self.cached))[0]
                self.cached.append(drafts[-1])
        return drafts, torch.stack(probs) if probs else None


def common_prefix_length(a, b):
    length = 0
    while length < min(len(a), len(b)) and a[length] == b[length]:
        length += 1
    return length


# The loop: generate's contract (see "Choosing the next token"), in rounds. All but the last token of the
# prompt go through prefill; then each round feeds the last token chosen (at first the prompt's last) with
# the drafts, so every new token, the first included, comes out of a verify pass and its acceptance rule.
# A round drafts at most the tokens still wanted minus one, so that no pass runs past MAX_NEW_TOKENS.
# When a stop token ends the text, the cache holds every token before it, as generate leaves it.
def speculative_generate(model, proposer, token_ids, max_new_tokens, stop_tokens, cached=0, *, on_token=None):
    """Yields the id of each new token. token_ids: the whole text so far, of which the model's KV cache holds
    the first `cached`. on_token(step, token_id, logits, draft) sees each token and the draft for its position
    (None: nothing was drafted there; the token itself: the draft was accepted)."""
    token_ids = list(token_ids)
    pos = len(token_ids) - 1  # the last token's position: each round feeds it first
    if pos > cached:
        prefill(model, token_ids[cached:pos], cached)
    new = 0
    while new < max_new_tokens:
        k = min(proposer.draft_tokens, max_new_tokens - new - 1)
        drafts, draft_probs = proposer.propose(token_ids, k) if k else ([], None)
        logits = verify(model, [token_ids[-1], *drafts], pos)  # (len(drafts) + 1, vocab)
        report.check_finite(logits, model.norm.weight.dtype)
        if proposer.sampling:
            kept = accept_sampled(drafts, draft_probs, logits, proposer.sampling)
        else:
            kept = accept_greedy(drafts, logits)
        proposer.tally.update(passes=1, drafted=len(drafts), accepted=len(kept) - 1)
        for i, token_id in enumerate(kept):
            if on_token:
                on_token(new, token_id, logits[i], drafts[i] if i < len(drafts) else None)
            if token_id in stop_tokens:
                return
            yield token_id
            new += 1
        token_ids += kept
        pos += len(kept)


def show_drafted_token(step, token_id, logits, draft, tokenizer):
    """show_token's line, marked: a draft accepted, or the model's own token (and the draft it replaced)."""
    if draft is None:
        note = "  [the model's]"
    elif draft == token_id:
        note = "  [draft accepted]"
    else:
        note = f"  [the model's; draft {tokenizer.decode([draft])!r} rejected]"
    show_token(step, token_id, logits, tokenizer, note)


# What the numbers say. A round costs a verify pass (k + 1 rows) plus the proposer's k steps, and yields one
# token plus the drafts accepted: with a share a of drafts accepted, independently, (1 - a**(k + 1)) / (1 - a)
# tokens a pass on average, which grows ever slower with k. Whether that beats one token a step is a
# measurement: the acceptance rate depends on the text and the proposer, the cost of a pass on the hardware.
#   python benchmarks/bench_decode.py --only verify-cost              a pass of k + 1 tokens against one step
#   python benchmarks/bench_decode.py --only stand-in-summary,stand-in-summary-lookup,...   each proposer
# benchmarks/README.md has the tables. On the CPU measured there, a verify pass costs more than a step (the
# kernels for a few rows read the weights slower than the one-row kernel): in bfloat16 about the same for
# any k from 1 to 8, in 8 and 4 bits growing with k and jumping once a pass has more than 4 rows. So prompt
# lookup, whose drafts cost nothing, pays where the text repeats its prompt and costs where it does not; a
# draft model also pays a step of its own for each draft, and its later drafts are accepted less often.
# DRAFT_TOKENS = 3 (4 rows a pass) is the largest k before the 8- and 4-bit jump, and close to the best the
# tables give for every proposer and text.
# Each run reports its acceptance rate and tokens per pass; with DRAFT_MEASURE=1 it then decodes the same
# tokens again, one step a token as plain decoding would, and reports both times: the speedup, or the
# slowdown, measured.
def run_speculative(model, tokenizer, prompt_ids, timer, proposer):
    """Speculative decoding streamed to stdout, the usual report, then what the drafts did."""
    on_token = partial(show_drafted_token, tokenizer=tokenizer) if SHOW_TOKENS else None
    token_ids = speculative_generate(model, proposer, prompt_ids, MAX_NEW_TOKENS, tokenizer.stop_tokens,
                                     on_token=on_token)
    new_ids = list(stream(timer.tokens(token_ids), tokenizer))
    seconds = time.perf_counter() - timer.start
    timer.report(len(prompt_ids), len(new_ids), model, tokens_per_pass(proposer.tally))
    line = speculation_line(proposer.tally)
    if DRAFT_MEASURE and new_ids:
        plain_seconds, same = plain_decode(model, prompt_ids, new_ids)
        line += (f"; the same {len(new_ids)} tokens decoded one per step took {plain_seconds:.4g} s against "
                 f"{seconds:.4g} s: {plain_seconds / seconds:.2f}x (measured)")
        if not proposer.sampling:
            line += ", the same choices" if same else ", other choices (a near tie rounded otherwise)"
    print(line, file=sys.stderr)


def tokens_per_pass(tally):
    return (tally["passes"] + tally["accepted"]) / max(tally["passes"], 1)  # each pass: its drafts kept and one more


def speculation_line(tally):
    accepted = tally["accepted"] / tally["drafted"] if tally["drafted"] else 0.0
    return (f"speculative decoding (DRAFT={DRAFT}, DRAFT_TOKENS={DRAFT_TOKENS}): {tally['accepted']} of "
            f"{tally['drafted']} drafted tokens accepted ({accepted:.0%}), {tokens_per_pass(tally):.2f} tokens per "
            f"verify pass ({tally['passes']} passes)")


def plain_decode(model, prompt_ids, new_ids):
    """Time what plain decoding of new_ids costs: the prompt's pass, then a step for each token but the last.
    Returns (seconds, whether greedy picks each token of new_ids)."""
    start = time.perf_counter()
    choices = [pick_greedy(prefill(model, prompt_ids))]
    for step, token_id in enumerate(new_ids[:-1]):
        choices.append(pick_greedy(decode_step(model, [token_id], len(prompt_ids) + step)[0]))
    return time.perf_counter() - start, choices == new_ids


def draft_checkpoint(model_dir, params, device, dtype, max_seq_len):
    """DRAFT's folder and params.json, checked against the model and for its fit in memory (on its own: the two
    together are not checked) before any weights load: (None, None) for lookup or no draft."""
    if DRAFT in ("", "lookup"):
        return None, None
    if DRAFT == "self-int4":
        if not SPEEDUPS or device.type not in speedups.FORMATS["int4"].devices:
            exits.fail(f"DRAFT=self-int4 needs SPEEDUPS=1 and a CPU (4-bit weights live in speedups' CPU kernels); "
                       f"on {device.type} use DRAFT=lookup, or a smaller model's folder")
        draft_dir, draft_params = model_dir, params
    else:
        draft_dir = checkpoint.find_checkpoint(LLAMA_MODELS_DIR, DRAFT)
        draft_params = checkpoint.read_params(draft_dir)
        checkpoint.load_tokenizer(draft_dir, draft_params)
        checkpoint.check_draft(draft_dir, draft_params, model_dir, params)
    quantize, draft_dtype = draft_format(dtype)
    memory.check_job(draft_dir, draft_params, max_seq_len - MAX_NEW_TOKENS, MAX_NEW_TOKENS, draft_dtype, device,
                     quantize)
    return draft_dir, draft_params


def draft_format(dtype):
    """The draft model's QUANTIZE and dtype: self-int4's 4-bit weights compute in bfloat16 (PyTorch's CPU kernel
    for them, in float32, was slower than the float32 model itself); a folder's, the model's."""
    return ("int4", torch.bfloat16) if DRAFT == "self-int4" else (QUANTIZE, dtype)


def load_proposer(draft_dir, draft_params, device, dtype, max_seq_len):
    """The proposer DRAFT names, or None; a draft model is loaded like the model (self-int4: in 4 bits)."""
    if not DRAFT:
        return None
    if DRAFT == "lookup":
        return PromptLookup(DRAFT_TOKENS, sampling_rule(device))
    start = time.perf_counter()
    quantize, draft_dtype = draft_format(dtype)
    draft = load_model(draft_dir, draft_params, device, draft_dtype, max_seq_len, 1, SPEEDUPS, quantize, KERNELS)
    form = quantize or devices.dtype_name(draft_dtype)
    print(f"loaded the draft model {checkpoint.model_name_of(draft_dir)} ({form}) in {time.perf_counter() - start:.1f} "
          f"s; fast path: {speedups.describe(draft) or 'off'}", file=sys.stderr)
    return DraftModel(draft, DRAFT_TOKENS, sampling_rule(device))


# ---------------------------------------------------------------------------------------------------------
# Beam search: keep the BEAM_WIDTH most probable continuations, not just the single best next token.
#
# Greedy decoding can walk into a dead end: the best first token may lead to poor continuations while the
# second best leads to much better ones. Beam search keeps k = BEAM_WIDTH partial sequences ("beams") and
# at every step extends all of them by every vocabulary token, scores each extension by its total
# log-probability (the sum of the log-probabilities of its tokens), and keeps the k best extensions,
# whichever beams they came from. A beam that was best can be dropped a step later, and one beam can
# spawn several survivors.
#
# Here the k beams run as one batch: one forward call per step for all of them, through weights that are
# read once for the whole batch, which is why a beam step costs little more than a greedy step (on CPUs,
# with the weights packed for several rows: see the linear layers above).
# Shapes, per step:
#   logits                       (k, vocab)       one row per live beam
#   scores = beam_scores[:, None] + log_softmax(logits)     (k, vocab)  total log-prob of each extension
#   flatten and take the top     (k * vocab,) -> (n_candidates,)
#   parent beam = flat // vocab, new token = flat % vocab
# Then each layer's KV cache rows must follow the parents: row i of the cache holds the keys and values of
# beam i's past tokens, and the new beam i may descend from old beam 3. reorder_cache copies row 3 into
# row i (for all layers) before the next step reads it: the generated positions only, since every beam
# shares the prompt (copied from row 0 to every row once, after the first step).
#
# Finishing: an extension ending in a stop token is a finished hypothesis, not a live beam. Its score is
# its total log-probability divided by length**LENGTH_PENALTY (length = its new tokens, the stop token
# included). Log-probabilities only go down as tokens are added, so the raw sum favours short answers;
# LENGTH_PENALTY = 1 compares average log-probability per token, 0 the raw sum, > 1 favours longer ones.
# We keep the k best finished hypotheses and stop when a full set of k can no longer be beaten, using
# transformers' default rule (early_stopping=False): stop once the best live beam's score at its current
# length, length-penalised, is no better than the worst finished one. (With LENGTH_PENALTY > 0 a live beam
# could in principle still climb by growing longer; this rule, like transformers', does not wait for that.)
# At MAX_NEW_TOKENS, the k best extensions of the last step are finished as they are.
# Candidates per step: (1 + number of stop tokens) x k, so that k live beams remain even if every stop
# token is among each beam's best; finished hypotheses are taken only from the first k candidates.
# These are the rules of transformers' generate(num_beams=k, do_sample=False), which the tests check.
# ---------------------------------------------------------------------------------------------------------
def reorder_cache(model, parents, start, end):
    """Row i of every layer's KV cache becomes a copy of row parents[i], for positions start .. end - 1."""
    rows = torch.tensor(parents, device=model.layers[0].attention.cache_k.device)
    for layer in model.layers:
        positions = getattr(layer.attention, "cache_positions_dim", LLAMA_MODELS_CACHE_POSITIONS_DIM)
        for cache in (layer.attention.cache_k, layer.attention.cache_v):
            span = cache.narrow(positions, start, end - start)
            span[: len(parents)] = span[rows]  # gathers first, then writes: safe when rows overlap


def beam_search(model, prompt_ids, max_new_tokens, stop_tokens, beam_width, length_penalty, on_step=None):
    """Returns the beam_width best finished hypotheses, best first, as (score, token ids incl. a stop token)."""
    n_candidates = (1 + len(stop_tokens)) * beam_width
    beams, beam_scores = [[]], torch.zeros(1)  # one live beam at first: the bare prompt, log-prob 0
    finished = []  # (score, token_ids), best first
    logits = prefill(model, prompt_ids)[None]  # (1, vocab): the prompt once, into cache row 0
    for step in range(max_new_tokens):
        if step > 0:
            logits = decode_step(model, [beam[-1] for beam in beams], len(prompt_ids) + step - 1)  # (k, vocab)
        report.check_finite(logits, model.norm.weight.dtype)
        scores = beam_scores[:, None] + F.log_softmax(logits.float(), dim=-1).cpu()  # (beams, vocab)
        top_scores, flat = scores.view(-1).topk(n_candidates)  # best first
        parents, tokens = (flat // scores.shape[1]).tolist(), (flat % scores.shape[1]).tolist()
        length = step + 1  # new tokens per candidate, counting its last
        last_step = length == max_new_tokens
        survivors = []  # (score, parent, token) of the next live beams
        for rank, (score, parent, token) in enumerate(zip(top_scores.tolist(), parents, tokens)):
            ends = last_step or token in stop_tokens
            if ends and rank < beam_width:
                finished.append((score / length**length_penalty, beams[parent] + [token]))
            elif not ends and len(survivors) < beam_width:
                survivors.append((score, parent, token))
        finished = sorted(finished, key=lambda hypothesis: hypothesis[0], reverse=True)[:beam_width]
        if last_step or not survivors:
            break
        beams = [beams[parent] + [token] for _, parent, token in survivors]
        beam_scores = torch.tensor([score for score, _, _ in survivors])
        # after the prompt's pass only row 0 holds the prompt; from then on every row holds it
        reorder_cache(model, [parent for _, parent, _ in survivors], 0 if step == 0 else len(prompt_ids),
                      len(prompt_ids) + step)
        if on_step:
            on_step(step, beams, beam_scores, finished)
        best_live = beam_scores[0].item() / length**length_penalty
        if len(finished) == beam_width and best_live <= finished[-1][0]:
            break  # transformers' early_stopping=False rule, see above
    return finished


def show_beams(step, beams, beam_scores, finished, tokenizer):
    """One compact stderr line per step: each live beam's total log-prob and its last few words."""
    tails = [f"{score:7.2f} {tokenizer.decode(beam[-4:])!r:<24.24}" for score, beam in zip(beam_scores.tolist(), beams)]
    print(f"{step:>4} {len(finished)} done | " + " | ".join(tails), file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# Chat: a conversation, the KV cache kept across turns.
# A dialog is encoded like the single prompt above, message after message, each closed by <|eot_id|>:
#   <|begin_of_text|> [system message] user message  <|start_header_id|>assistant<|end_header_id|>\n\n
#   reply <|eot_id|>  user message  <|start_header_id|>assistant<|end_header_id|>\n\n  reply <|eot_id|> ...
# Without a cache, every turn would feed the whole conversation again: turn n would cost all the tokens
# of turns 1 .. n. With it, the keys and values of everything said so far stay in the cache, and a turn
# feeds only what is new since the last forward pass: the <|eot_id|> that closes the previous reply (the
# model chose it, which ended generation, but it was never fed), the user's new message with its
# headers, and the open assistant header; then the reply is generated as usual. The stderr line after
# each turn shows both counts. The cache holds the reply as the model's own tokens, which may differ
# from how the reply's text would be re-encoded; a chat that re-encodes the text must recompute it.
# The cache is sized for the whole session (CHAT_CONTEXT tokens). When a turn and its longest reply
# would not fit, the conversation starts over from the system prompt and the latest message (said on
# stderr): dropping only the oldest turns would change every later position, so the cache would have to
# be recomputed anyway. Ctrl-C during a reply stops that reply and keeps the session; the reply so far
# stays in the conversation. Ctrl-C at the prompt, or end of input (Ctrl-D), ends it.
# With DRAFT, replies are decoded speculatively; a draft model's cache is kept across turns too, and each
# round it catches up on what it has not seen (the user's turn, the model's own tokens).
# ---------------------------------------------------------------------------------------------------------
def user_messages(first_message):
    """The user's messages: `first_message` if any (INPUT_FILE), then stdin's lines, with a prompt on stderr
    when stdin is a terminal. Blank messages are skipped; end of input ends the conversation."""
    if first_message.strip():
        yield first_message
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\r\n")


def encode_turn(tokenizer, message, system_prompt, first):
    """What a user's turn adds to the conversation: the message with its headers and the open assistant
    header; the first turn also starts the conversation (<|begin_of_text|> and the system message)."""
    ids = encode_prompt(tokenizer, message, system_prompt if first else "", instruct=True)
    return ids if first else ids[1:]  # ids[0] is <|begin_of_text|>


def chat(model, tokenizer, pick, first_message="", proposer=None):
    """The conversation loop; returns the number of turns. With a proposer, replies are decoded speculatively."""
    dialog = []  # every token of the conversation so far
    cached = 0  # the cache holds dialog[:cached] (a draft model's cache keeps its own account)
    turns = 0
    for message in user_messages(first_message):
        turn, start_over = fit_turn(tokenizer, message, dialog, model.params.max_seq_len)
        if not turn:
            continue
        if start_over:
            dialog, cached = [], 0
        dialog += turn
        fed = len(dialog) - cached
        start = time.perf_counter()
        chosen, interrupted = generate_reply(model, tokenizer, dialog, cached, pick, proposer)
        reply = [token_id for token_id in chosen if token_id not in tokenizer.stop_tokens]
        cached = cache_after_reply(dialog, reply, cached, interrupted)
        dialog += reply + [closing_token(tokenizer, chosen)]  # fed with the next turn
        turns += 1
        show_turn(turns, fed, len(dialog) - len(reply) - 1, len(reply), time.perf_counter() - start, interrupted,
                  proposer)
    return turns


def fit_turn(tokenizer, message, dialog, context):
    """(the user's turn, whether the conversation starts over with it) so that it and its longest reply fit
    the cache's `context` tokens; (None, False) when even the message alone does not (said on stderr)."""
    turn = encode_turn(tokenizer, message, SYSTEM_PROMPT, first=not dialog)
    if len(dialog) + len(turn) + MAX_NEW_TOKENS <= context:
        return turn, False
    turn = encode_turn(tokenizer, message, SYSTEM_PROMPT, first=True)
    if len(turn) + MAX_NEW_TOKENS > context:
        print(f"(this message is {len(turn)} tokens: with MAX_NEW_TOKENS={MAX_NEW_TOKENS} it does not fit "
              f"CHAT_CONTEXT={context}; skipped)", file=sys.stderr)
        return None, False
    print(f"(the conversation would exceed CHAT_CONTEXT={context} tokens: starting over from the system "
          "prompt and this message)", file=sys.stderr)
    return turn, True


def generate_reply(model, tokenizer, dialog, cached, pick, proposer):
    """The reply to `dialog` (whose first `cached` tokens the cache holds), streamed to stdout until a stop
    token, MAX_NEW_TOKENS or Ctrl-C. Returns (the token ids chosen, a stop token included; whether Ctrl-C
    stopped it)."""
    chosen = []
    on_token = lambda step, token_id, *_: chosen.append(token_id)  # as soon as it is chosen
    if proposer:
        proposer.tally.clear()  # counted per turn
        token_ids = speculative_generate(model, proposer, dialog, MAX_NEW_TOKENS, tokenizer.stop_tokens, cached,
                                         on_token=on_token)
    else:
        token_ids = generate(model, dialog[cached:], MAX_NEW_TOKENS, tokenizer.stop_tokens, cached, pick=pick,
                             on_token=on_token)
    interrupted = False
    try:
        for _ in stream(token_ids, tokenizer):
            pass
    except KeyboardInterrupt:
        interrupted = True
    print(flush=True)  # the reply's line ends
    return chosen, interrupted


def cache_after_reply(dialog, reply, cached, interrupted):
    """How many tokens of dialog + reply the cache holds after the reply. generate (and speculative_generate)
    feed each token they yield before choosing the next: the whole reply is in the cache, except its last
    token when no stop token ended it (MAX_NEW_TOKENS, or Ctrl-C, which may also have come before any token:
    then nothing new is known to be there)."""
    if reply and (interrupted or len(reply) == MAX_NEW_TOKENS):
        return len(dialog) + len(reply) - 1
    if not interrupted:
        return len(dialog) + len(reply)
    return cached


def show_turn(turns, fed, without_cache, new_tokens, seconds, interrupted, proposer):
    """The stderr line after a turn: tokens fed with the cache and without it, and what the drafts did."""
    stopped = " (stopped)" if interrupted else ""
    drafts = f"; {speculation_line(proposer.tally)}" if proposer else ""
    print(f"turn {turns}: {fed} prompt tokens fed (without the cache: {without_cache}), {new_tokens} new tokens "
          f"in {seconds:.1f} s{stopped}{drafts}", file=sys.stderr)


def closing_token(tokenizer, chosen):
    """What closes the reply in the conversation: the model's own <|eom_id|> if it ended with one (a tool
    call: ChatFormat writes it so), else <|eot_id|> (also after a reply cut short)."""
    eom = tokenizer.special_tokens["<|eom_id|>"]
    return eom if chosen and chosen[-1] == eom else tokenizer.special_tokens["<|eot_id|>"]


def token_picker(device):
    """Greedy, or top-p sampling with its own seeded random generator when TEMPERATURE > 0."""
    rule = sampling_rule(device)
    return (lambda logits: sample_top_p(logits, *rule)) if rule else pick_greedy


def run_generate(model, tokenizer, prompt_ids, timer):
    """Greedy decoding or sampling, streamed to stdout; returns the number of new tokens. With the token
    lines on and stdout and stderr on one terminal, streamed text would land inside the token lines: the
    table's text column shows each token as it comes, and the whole text follows the table, once."""
    on_token = partial(show_token, tokenizer=tokenizer) if SHOW_TOKENS else None
    pick = token_picker(model_device(model))
    token_ids = generate(model, prompt_ids, MAX_NEW_TOKENS, tokenizer.stop_tokens, pick=pick, on_token=on_token)
    if not (SHOW_TOKENS and report.one_terminal()):
        return len(list(stream(timer.tokens(token_ids), tokenizer)))
    chosen = []
    try:
        chosen.extend(timer.tokens(token_ids))
    finally:  # also after Ctrl-C: the text so far
        list(stream(chosen, tokenizer))
        print()  # the text's last line ends
    return len(chosen)


def run_beam_search(model, tokenizer, prompt_ids, timer):
    """Beam search, then the best NUM_RETURN_SEQUENCES texts on stdout, best first, a blank line between."""
    finished = beam_search(model, prompt_ids, MAX_NEW_TOKENS, tokenizer.stop_tokens, BEAM_WIDTH,
                           LENGTH_PENALTY, partial(show_beams, tokenizer=tokenizer) if SHOW_TOKENS else None)
    for i, (score, token_ids) in enumerate(finished[:NUM_RETURN_SEQUENCES]):
        print(f"beam result {i + 1}: score {score:.4f}, {len(token_ids)} tokens", file=sys.stderr)
        print("\n\n" if i else "", end="")
        list(stream([t for t in token_ids if t not in tokenizer.stop_tokens], tokenizer))
    return max(len(token_ids) for _, token_ids in finished)


def check_settings(tokenizer, params, instruct):
    """The rules that tie settings together or to the model (each setting's own range is checked by
    settings.apply_settings)."""
    # beam search's candidates, (1 + stop tokens) x BEAM_WIDTH, come from the first step's vocabulary
    settings.check_range("BEAM_WIDTH", BEAM_WIDTH, 1, params["vocab_size"] // (1 + len(tokenizer.stop_tokens)))
    settings.check_range("NUM_RETURN_SEQUENCES", NUM_RETURN_SEQUENCES, 1, BEAM_WIDTH)
    if not 0 < TOP_P <= 1:
        exits.fail(f"TOP_P={TOP_P} is out of range: it must be in (0, 1]")
    if TEMPERATURE > 0 and BEAM_WIDTH > 1:
        exits.fail("choose beam search (BEAM_WIDTH > 1) or sampling (TEMPERATURE > 0), not both")
    if CHAT and BEAM_WIDTH > 1:
        exits.fail("beam search is for single runs: with CHAT=1 use greedy (the default) or sampling "
                     "(TEMPERATURE > 0)")
    if CHAT and not instruct:
        exits.fail(f"CHAT=1 needs an Instruct model (a base model does not know the chat format); {MODEL_NAME} "
                     "has no \"Instruct\" in its name")
    if CHAT:
        settings.check_range("CHAT_CONTEXT", CHAT_CONTEXT, MAX_NEW_TOKENS + 1, checkpoint.context_length(params))
    if CHAT and torchrun.processes()[0] > 1:
        exits.fail("CHAT=1 runs in one process: under torchrun every process would read stdin on its own")
    if CHAT:
        settings.check_chat_input()  # stdin is open for reading: checked now, not after the model has loaded
    if DRAFT:  # a verify pass feeds k + 1 tokens at once, like a prompt chunk
        settings.check_range("DRAFT_TOKENS", DRAFT_TOKENS, 1, PREFILL_CHUNK - 1)
    if DRAFT and BEAM_WIDTH > 1:
        exits.fail(f"DRAFT={DRAFT!r} speeds up greedy decoding and sampling, not beam search: set BEAM_WIDTH=1, "
                   "or DRAFT=\"\"")


def main():
    # Settings: the globals above, overridden by environment variables, then checked, before any work.
    # Device and number format: nothing here is CUDA-specific; the same code runs on a laptop CPU, an
    # Apple GPU (mps) or an NVIDIA GPU. bfloat16 is the format Meta stores the weights in: 2 bytes per
    # number, float32's range with less precision. Keeping it halves memory and, because generating a
    # token reads every weight once, roughly halves the time per token against float32. float16 is for
    # GPUs without bfloat16 (it overflows more easily). On a CPU, PyTorch uses one thread per physical
    # core; OMP_NUM_THREADS=N python run_inference.py changes that.
    settings.apply_settings(globals())
    device = devices.pick_device(DEVICE)
    dtype = devices.pick_dtype(DTYPE, device)

    # The checkpoint folder, as `llama-model download --source meta --model-id NAME` leaves it (or in its
    # original/ subfolder, as the Hugging Face Hub has it):
    #   consolidated.00.pth  the weights (one file per model-parallel shard: 1 for 1B to 8B, 8 for 70B)
    #   params.json          the architecture's sizes (see load_model)
    #   tokenizer.model      the vocabulary (see encode_prompt)
    #   checklist.chk        md5 sums of the other files (`llama-model verify-download` checks them)
    model_dir = checkpoint.find_checkpoint(LLAMA_MODELS_DIR, MODEL_NAME)
    params = checkpoint.read_params(model_dir)
    tokenizer = checkpoint.load_tokenizer(model_dir, params)
    instruct = "instruct" in MODEL_NAME.lower()
    check_settings(tokenizer, params, instruct)
    check_look_inside(params)
    prompt = settings.read_prompt(INPUT_STRING, INPUT_FILE, tokenizer, params)
    prompt_ids = encode_prompt(tokenizer, prompt, SYSTEM_PROMPT, instruct)
    if not CHAT:
        describe_tokenizer(model_dir / "tokenizer.model", tokenizer, prompt_ids)
    max_seq_len = CHAT_CONTEXT if CHAT else len(prompt_ids) + MAX_NEW_TOKENS
    memory.check_job(model_dir, params, max_seq_len - MAX_NEW_TOKENS, MAX_NEW_TOKENS, dtype, device, QUANTIZE,
                      BEAM_WIDTH)
    draft_dir, draft_params = draft_checkpoint(model_dir, params, device, dtype, max_seq_len)  # DRAFT's, checked too

    # One process, or many. llama-models builds the model from fairscale's model-parallel layers, written
    # so that a model too big for one device is split across N processes (one per GPU), each holding a
    # 1/N slice of every large matrix: ColumnParallelLinear (wq, wk, wv, w1, w3, output) splits the output
    # rows, so each process computes some heads and feed-forward units and caches only its own key-value
    # heads; RowParallelLinear (wo, w2) splits the input columns and sums the processes' partial results
    # (all_reduce); the output layer gathers the processes' logits (all_gather). Every process computes the
    # same logits and picks the same tokens; only rank 0 prints. Even one process needs the model-parallel
    # group those layers ask for: init_distributed starts it (in memory, no network). torchrun starts
    # several and tells them where the others are:
    #   torchrun --nproc-per-node 8 run_inference.py              one machine, 8 GPUs (Llama 3.3 70B)
    #   DEVICE=cpu torchrun --nproc-per-node 2 run_inference.py   two CPU processes, to try it at home
    # The backend is nccl between NVIDIA GPUs and gloo between CPUs; Apple GPUs have none (one process).
    # close_distributed, at the end, stops the groups' threads while Python is still whole.
    devices.init_distributed(device)
    start = time.perf_counter()
    model = load_model(model_dir, params, device, dtype, max_seq_len, BEAM_WIDTH, SPEEDUPS, QUANTIZE, KERNELS)
    describe_model(model, model.params)
    threads = f" with {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    seconds = time.perf_counter() - start
    print(f"loaded {MODEL_NAME} on {device}{threads} in {dtype} in {seconds:.1f} s", file=sys.stderr)
    proposer = load_proposer(draft_dir, draft_params, device, dtype, max_seq_len)
    compare_layer_by_hand(model, prompt_ids)

    timer = report.Timer()
    if CHAT:
        chat(model, tokenizer, token_picker(device), prompt if INPUT_FILE else "", proposer)
    elif proposer:
        run_speculative(model, tokenizer, prompt_ids, timer, proposer)
    else:
        run = run_beam_search if BEAM_WIDTH > 1 else run_generate
        timer.report(len(prompt_ids), run(model, tokenizer, prompt_ids, timer), model)
    if LOOK_INSIDE and not CHAT:
        show_look_inside(model, tokenizer, prompt_ids)
    devices.close_distributed()


if __name__ == "__main__":
    exits.run(main)
