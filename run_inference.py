"""Run a Meta Llama 3.x checkpoint with plain PyTorch, fairscale and llama-models, every step explained.

This is the tutorial twin of minimal_run_inference.py: the same steps, in the same order, under the same
names, with the reasons written next to the code, plus two more ways to choose tokens (beam search and
top-p sampling), optional 8-bit weights, and the speed-ups that make it fast on a CPU. Read it top to
bottom; it follows the data: text, tokens, weights, layers, logits, next token. Both scripts also run
under torchrun, split across processes (see init_distributed).

Run it like its twin: edit the settings below, or override any of them with an environment variable of the
same name, e.g.

    MODEL_NAME=Llama3.2-1B BEAM_WIDTH=4 python run_inference.py

stdout carries only the generated text; everything else (the model, memory, one line per token, speed)
goes to stderr, so `python run_inference.py > answer.txt` keeps just the answer. README.md says where to
get the checkpoints and how to run the tests.
"""

import base64
import codecs
import ctypes
import math
import mmap
import os
import sys
import time
from contextlib import contextmanager, redirect_stdout
from functools import partial
from pathlib import Path

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region, reduce_from_model_parallel_region
from llama_models.checkpoint import maybe_reshard_state_dict
from llama_models.datatypes import RawMessage
from llama_models.llama3.args import ModelArgs
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.model import Transformer, apply_rotary_emb

import support  # settings from the environment, device and dtype, input checks: support.py

# ---------------------------------------------------------------------------------------------------------
# Settings. Each one can also be set by an environment variable of the same name (MAX_NEW_TOKENS=20 ...);
# the text is converted to the type of the default, and a value that does not convert is an error.
# ---------------------------------------------------------------------------------------------------------
MODEL_NAME = "Llama3.2-1B-Instruct"  # a folder in LLAMA_MODELS_DIR: Llama3.2-1B, Llama3.2-3B, Llama3.1-8B, Llama3.3-70B, ... ("-Instruct" in the name: chat format)
LLAMA_MODELS_DIR = "~/.llama/checkpoints"  # where `llama-model download --source meta` puts checkpoints
INPUT_STRING = "The capital of France is"  # the user's message (Instruct models) or the text to continue (base models)
SYSTEM_PROMPT = ""  # Instruct models only: a system message before the user's; "" for none
DEVICE = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "mps", "cuda", "cuda:1"
DTYPE = "auto"  # "auto" (bfloat16; float16 on GPUs without bfloat16), "bfloat16", "float16", "float32"
MAX_NEW_TOKENS = 64  # generation stops here unless a stop token comes first
PREFILL_CHUNK = 256  # prompt tokens per forward call: bounds the memory of a long prompt's attention

# How the next token is chosen. The default is greedy: always the most likely token.
BEAM_WIDTH = 1  # > 1: beam search keeps this many candidate continuations (4 or 5 is usual); 1: greedy
LENGTH_PENALTY = 1.0  # beam search: a finished beam's score is its log-probability / length**LENGTH_PENALTY
NUM_RETURN_SEQUENCES = 1  # beam search: print this many of the best finished beams (at most BEAM_WIDTH)
TEMPERATURE = 0.0  # > 0: sample instead (Meta's own scripts use 0.6); 0: off
TOP_P = 0.9  # sampling: draw only from the most likely tokens that together hold this much probability
SEED = 0  # sampling: the same seed gives the same text
QUANTIZE = ""  # "int8": 8-bit linear weights (half the memory; speed: see the int8 section); "": as stored
SHOW_TOKENS = 1  # 1: one line per generated token on stderr (its id, probability and the runners-up); 0: off

# RoPE scaling constants of Llama 3.1+, explained at rope_rotations() below. Meta's published configs
# (and https://github.com/meta-llama/llama-models/issues/166) give the factor per model.
ROPE_SCALE_FACTOR = 8  # Llama 3.1 and 3.3
ROPE_SCALE_FACTOR_3_2_SMALL = 32  # Llama 3.2 1B and 3B, recognised by (dim, n_layers)
LLAMA_3_2_SMALL_SHAPES = {(2048, 16), (3072, 28)}
ROPE_ORIGINAL_CONTEXT = 8192  # the context length the model was first trained with
ROPE_LOW_FREQ_FACTOR = 1  # frequencies whose wavelength exceeds 8192 / 1 tokens are slowed by the factor
ROPE_HIGH_FREQ_FACTOR = 4  # frequencies whose wavelength is under 8192 / 4 tokens are left alone
SHOWN_ALTERNATIVES = 3  # runners-up printed per token when SHOW_TOKENS is on
MADV_DONTNEED = 4  # madvise() advice: "this process no longer needs these pages" (Linux and macOS)


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
# Which one applies is read from the folder name ("Instruct"): the two kinds have identical shapes.
# ---------------------------------------------------------------------------------------------------------
def encode_prompt(tokenizer, text, system_prompt, instruct):
    if not instruct:
        return tokenizer.encode(text, bos=True, eos=False)
    messages = [RawMessage(role="system", content=system_prompt)] if system_prompt else []
    messages.append(RawMessage(role="user", content=text))
    return ChatFormat(tokenizer).encode_dialog_prompt(messages).tokens


def describe_tokenizer(path, tokenizer, prompt_ids):
    """Show a few lines of tokenizer.model decoded, and the prompt as the model sees it."""
    for line in path.read_text().splitlines()[12366:12368]:  # " Paris" and its neighbour
        token_b64, rank = line.split()
        print(f"tokenizer.model line {line!r}: bytes {base64.b64decode(token_b64)!r}, id {rank}", file=sys.stderr)
    print(f"prompt: {len(prompt_ids)} tokens {tokenizer.decode(prompt_ids)!r}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# torch.distributed and fairscale: one process, or many.
# llama-models builds the model from fairscale's model-parallel layers, written so that a model too big
# for one device is split across N processes (one per GPU, on one or several machines), each holding a
# 1/N slice of every large matrix:
#   ColumnParallelLinear (wq, wk, wv, w1, w3, output): each process holds some output rows and computes
#     those outputs; the attention heads and the feed-forward units are divided among the processes, so
#     each one also keeps only its own key-value heads in its KV cache (n_kv_heads / N of them). The
#     output layer then gathers the pieces (all_gather), so every process sees all the logits.
#   RowParallelLinear (wo, w2): each process holds some input columns, multiplies its slice of the
#     hidden vector, and the partial results are summed across processes (all_reduce).
#   VocabParallelEmbedding: each process holds the embeddings of a range of token ids; a process looks up
#     the ids in its range, zeros for the others, and an all_reduce completes every row.
# So each layer costs two all_reduces and the output one all_gather; everything else is local. Every
# process runs this same script, computes the same logits and so picks the same tokens (greedy, beam
# search, and sampling, whose generators share the seed); only rank 0 prints.
#
# Even with one process those layers ask fairscale for the "model-parallel group", so one must exist. A
# one-process group needs no launcher and no network: its rendezvous store is a dictionary in memory
# (HashStore). Launched by torchrun, PyTorch's distributed launcher, the processes find each other through
# the RANK, WORLD_SIZE and MASTER_ADDR/MASTER_PORT variables it sets, and the model-parallel size is the
# number of processes:
#   torchrun --nproc-per-node 8 run_inference.py                  one machine, 8 GPUs (Llama 3.3 70B)
#   torchrun --nnodes 2 --nproc-per-node 8 --node-rank R --master-addr HOST --master-port 29500 run_inference.py
#                                                                 two machines (405B), R = 0 and 1
#   DEVICE=cpu torchrun --nproc-per-node 2 run_inference.py       two CPU processes, to try it at home
# The backend is nccl for NVIDIA GPUs (one GPU per local rank) and gloo otherwise (gloo runs on CPUs).
# ---------------------------------------------------------------------------------------------------------
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


# Each process group runs its collectives on background threads (gloo: two workers and a network loop per
# group; fairscale makes three groups besides the default one), and they must stop before Python shuts
# down. A worker lets go of a finished all_gather's tensors a moment after the main thread has moved on; if
# that moment falls inside the interpreter's shutdown, freeing a tensor needs the Python lock, Python ends
# the thread instead, and C++ aborts the process ("terminate called without an active exception") after
# everything was printed. One process never gets there (fairscale skips collectives for a group of one);
# under torchrun, 3 runs in 95 did here. destroy_process_group alone is not enough: fairscale keeps its
# own references to its groups, and a group's threads are joined only when its last reference goes.
def close_distributed():
    fs_init.destroy_model_parallel()  # fairscale's references to its groups
    dist.destroy_process_group()  # torch's; the groups are freed now, and their threads joined


# ---------------------------------------------------------------------------------------------------------
# RoPE: how the model knows where each token is.
# Attention compares queries and keys with dot products, which by themselves ignore order. Rotary
# position embedding (RoPE) rotates each pair of numbers (0,1), (2,3), ... of every query and key by an
# angle proportional to the token's position, pair i turning at frequency theta**(-2i/head_dim). The dot
# product of two rotated vectors then depends on how far apart the tokens are.
#
# Llama 3.1 and later stretch the slow pairs so that a model trained on 8,192 tokens works up to 131,072:
# pairs whose wavelength is longer than 8192 / ROPE_LOW_FREQ_FACTOR positions turn FACTOR times slower,
# pairs shorter than 8192 / ROPE_HIGH_FREQ_FACTOR are unchanged, and those in between are blended.
# llama-models 0.3.0 hard-codes FACTOR = 8 (apply_scaling in llama_models/llama3/model.py), right for 3.1
# and 3.3, but Llama 3.2 1B and 3B were trained with 32. With the wrong factor, short prompts look fine
# and long ones slowly degrade. Rather than edit the installed package, we compute the rotation table
# ourselves with the right factor and hand it to the model (model.freqs_cis in load_model). Folder names
# can change, so the 3.2 models are recognised by their shapes, which no other Llama 3.x model has.
# ---------------------------------------------------------------------------------------------------------
def rope_scale_factor(args):
    return ROPE_SCALE_FACTOR_3_2_SMALL if (args.dim, args.n_layers) in LLAMA_3_2_SMALL_SHAPES else ROPE_SCALE_FACTOR


def rope_rotations(args, scale_factor):
    head_dim = args.dim // args.n_heads
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))  # (head_dim // 2,) radians/token
    if args.use_scaled_rope:
        wavelengths = 2 * math.pi / freqs  # tokens per full turn
        # 0 for wavelengths over 8192 tokens, 1 under 2048, a straight line between: the share kept unscaled
        band = (ROPE_ORIGINAL_CONTEXT / wavelengths - ROPE_LOW_FREQ_FACTOR) / (ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR)
        keep = band.clamp(0, 1)
        freqs = (1 - keep) * freqs / scale_factor + keep * freqs
    angles = torch.outer(torch.arange(args.max_seq_len).float(), freqs)  # (max_seq_len, head_dim // 2)
    return torch.polar(torch.ones_like(angles), angles)  # cos + i sin: llama-models rotates with complex numbers


# ---------------------------------------------------------------------------------------------------------
# Weights: from the file to the model without copies.
#
# params.json holds the sizes: dim (width of the hidden vector, 2048 for 1B), n_layers (transformer
# blocks), n_heads (query heads; head_dim = dim / n_heads = 64), n_kv_heads (key/value heads, shared by
# groups of query heads: grouped-query attention), vocab_size (128,256 tokens), ffn_dim_multiplier and
# multiple_of (the feed-forward width, 8192 for 1B), norm_eps (RMSNorm's epsilon), rope_theta and
# use_scaled_rope (see RoPE above). ModelArgs takes them, plus two sizes for the job at hand:
# max_seq_len (prompt + new tokens) and max_batch_size (1, or the beam width).
#
# Three tricks keep memory at the size of the file:
# 1. The meta device. Building Transformer(args) normally allocates every weight and fills it with
#    random numbers, only for the checkpoint to overwrite them. Under torch.device("meta") tensors have a
#    shape but no memory. (fairscale's linear layers allocate their weights with the legacy
#    torch.Tensor(rows, cols), which ignores the meta device: that memory is never written, so the
#    operating system never backs it with RAM, and it is released when the checkpoint replaces it.
#    support.without_weight_init skips fairscale's initialisation of those weights, which would write
#    them, and with several processes would first build each weight at full size.)
# 2. mmap. torch.load(..., mmap=True) maps the file into memory instead of reading it: tensors point into
#    the file, and the OS pages bytes in when they are first used (shared with its file cache).
#    llama-models' maybe_reshard_state_dict does this. A checkpoint comes in as many shards as Meta used
#    processes (8 for 70B); when this run has another number of processes, it merges shards (8 onto 1:
#    torch.cat, a real copy) or splits them (1 onto 2: each process keeps its half), as long as one
#    number divides the other.
# 3. assign=True. load_state_dict normally copies each tensor into the module's existing one; assign
#    makes the module's parameter *be* the loaded tensor. Llama 3.2 stores its output layer and its
#    embedding table as one tensor (tied weights); assign keeps them one, saving 0.5 GB for 1B.
# .to(device, dtype) then copies only if it has to (to a GPU, or to another dtype).
#
# The KV cache. Each new token attends to the keys and values of all tokens before it. Recomputing them
# every step would make step n cost n times a step; instead every attention layer keeps them in
# cache_k and cache_v, one row per sequence in the batch. llama-models allocates them when the model is
# built (on meta here), so we create them ourselves, sized to this job, and in the layout our attention
# reads fastest: (max_batch_size, n_kv_heads, max_seq_len, head_dim), each head's positions one after the
# other (llama-models' own is (max_batch_size, max_seq_len, n_kv_heads, head_dim); see grouped_attention).
# ModelArgs' defaults (32 sequences x 2048 tokens) would take 16 layers x 2 x 32 x 2048 x 8 x 64 x 4 bytes
# = 4.3 GB in float32 for the 1B model, more than its weights: the original version of this project did
# exactly that, which explains its memory use.
# ---------------------------------------------------------------------------------------------------------
def load_model(model_dir, device, dtype, max_seq_len, max_batch_size, quantize=""):
    params = support.read_params(model_dir)  # params.json, checked: a text-only Llama 3.x model
    args = ModelArgs(**params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    with torch.device("meta"), support.without_weight_init():
        model = Transformer(args)  # shapes only
    with redirect_stdout(sys.stderr), support.reading_checkpoint(model_dir):  # it prints the shard list
        weights = maybe_reshard_state_dict(sorted(model_dir.glob("consolidated.*.pth")), args.n_kv_heads)
    torch.set_default_dtype(torch.float32)  # it also called torch.set_default_tensor_type(bfloat16): undo that
    support.check_weights(model, weights, model_dir)  # names and shapes agree with params.json
    model.load_state_dict(weights, assign=True)  # the parameters are now the memory-mapped tensors
    if quantize == "int8":
        quantize_linear_layers(model)  # before moving anything: from the mapped file, layer by layer
    elif packs_weights(device, dtype, max_batch_size):
        pack_linear_layers(model, dtype, max_batch_size)  # CPU, several sequences per step: see below
    model.to(device=device, dtype=dtype)  # floating-point tensors only: int8 weights stay int8
    for layer in model.layers:
        attention = layer.attention
        cache_shape = (max_batch_size, attention.n_local_kv_heads, max_seq_len, attention.head_dim)
        attention.cache_k = torch.zeros(cache_shape, device=device, dtype=dtype)
        attention.cache_v = torch.zeros(cache_shape, device=device, dtype=dtype)
    model.freqs_cis = rope_rotations(args, rope_scale_factor(args)).to(device)
    for layer in model.layers:  # speed-up: see grouped_attention below
        layer.attention.forward = partial(grouped_attention, layer.attention)
    # Speed-up: the output layer turns each position's hidden vector into vocab_size scores (logits), but
    # generation only needs the last position's. Without this, every 256-token prompt chunk would produce
    # a (256, 128256) float32 tensor (131 MB; 0.5 GB for a 1,000-token prompt in one call) and spend 256
    # times the output layer's arithmetic on scores nobody reads.
    model.output.register_forward_pre_hook(lambda output_layer, inputs: (inputs[0][:, -1:],))
    return model


# ---------------------------------------------------------------------------------------------------------
# Storing the linear layers' weights differently. The two sections below (8-bit weights, and weights packed
# for oneDNN) keep llama-models' and fairscale's layers but change what their weight tensor holds, and so
# how a layer multiplies by it: linear_forward is a fairscale linear layer's forward with another product.
# Both convert the largest weight (the output layer, 128256 x 2048 for 1B) first, while nothing else is
# converted yet, so that its temporary memory does not add to everything else's.
# ---------------------------------------------------------------------------------------------------------
def linear_layers(model):
    """Every fairscale linear layer in the model, the largest first."""
    layers = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    return sorted(layers, key=lambda layer: -layer.weight.numel())


def linear_forward(layer, product, x):
    """A fairscale linear layer's forward, with product(layer, x) instead of F.linear(x, layer.weight), then
    the same collective (fairscale's copy_to_model_parallel_region, on the way in, only acts in backward passes)."""
    out = product(layer, x)
    if isinstance(layer, RowParallelLinear):
        return reduce_from_model_parallel_region(out)  # sum the processes' partial products
    return gather_from_model_parallel_region(out) if layer.gather_output else out


# ---------------------------------------------------------------------------------------------------------
# Optional: 8-bit weights (QUANTIZE = "int8").
# Decoding one token reads every weight once, so on a CPU (and a laptop GPU) the time per token is
# mostly the time to stream the weights from memory. Storing the linear layers' weights in 8 bits instead
# of 16 halves both the memory (Llama 3.1 8B: 16 GB -> 8 GB, so it fits a 16 GB laptop) and the bytes
# read per token. Whether it also halves the time depends on the int8 kernel keeping pace with memory:
# it must convert every weight back to a 16-bit number before multiplying. On this project's 2-core
# AVX-512 test machine it does not: torch._weight_int8pack_mm streams 17-19 GB/s of int8 weights,
# while PyTorch's bfloat16 matrix-vector kernel streams 26-34 GB/s of bfloat16 ones, so a step is only a
# little faster in int8 there. The kernel is limited by arithmetic, not memory (10 GB/s on one thread,
# 17-19 on two), so CPUs with more cores get closer to the 2x. Measure yours with
# benchmarks/bench_kernels.py (--threads 1 for one core).
#
# Per-channel symmetric quantisation: each output channel (row) w of a weight matrix gets its own scale
#   scale = max(|w|) / 127,   w_int8 = round(w / scale)  in [-127, 127],   w is approximately w_int8 * scale
# One scale per row keeps a row of small weights from being crushed by another row's large ones. The
# rounding error is at most scale / 2 per weight; the layer's output error is printed below (about 1%).
# Only the weights are quantised: activations (the hidden vectors) stay in bfloat16, so nothing about the
# arithmetic of attention or the norms changes, and no calibration data is needed. The product
# x @ (w_int8 * scale).T is computed as (x @ w_int8.T) * scale, by PyTorch's own int8-weight kernel
# (torch._weight_int8pack_mm) on CPUs and Apple GPUs; elsewhere by converting the weight back for each
# product (correct, not faster).
#
# The embedding table stays in bfloat16: a lookup reads one row per token, not the table, so quantising it
# would save memory but no time; and since it stays memory-mapped, only the rows of tokens actually seen
# are ever read from disk. (Llama 3.2's output layer shares the table's values; it is quantised like any
# other linear layer, into its own int8 copy, because it is read in full for every token.)
#
# Memory during the conversion: each weight is read from the memory-mapped file and converted in blocks
# of rows; once done, release_pages tells the operating system that this process no longer needs the
# weight's pages, so they leave its resident memory (they stay in the file cache, and could be read
# again if something did). So the full bfloat16 model is never resident: peak memory is the int8 model
# plus a block. One more leak to plug: the conversion's float32 temporaries are freed, but glibc's malloc
# keeps freed memory for reuse, in a separate pool for each thread that allocated it, and does not always
# find it again; on the 1B shapes that kept 0 to 0.5 GB in the process, varying from run to run.
# trim_heap hands such memory back after each layer (the 1B load then peaks at 1.42 GiB, every run).
# ---------------------------------------------------------------------------------------------------------
QUANTIZE_BLOCK_ROWS = 4096  # rows converted at a time
# The int8 kernel is built for a few rows (decoding): its time grows with every row. Converting a weight to
# a temporary 16-bit copy costs about the same for any number of rows, and the ordinary matrix product
# then handles many rows cheaply. All the 1B model's linear layers on the 2-core test CPU
# (benchmarks/bench_kernels.py --rows 1,32,64,256, its int8 lines, over several runs): 1 row 64-66 ms with
# the kernel against 0.33-0.96 s through copies (the copies' time varies most); 32 rows 0.62-0.69 s against
# 0.92-1.10 s; 64 rows about even (1.15-1.32 s against 0.70-1.27 s); 256 rows 4.5-4.8 s against 1.8-2.5 s.
INT8_KERNEL_MAX_ROWS = 64
INT8_MAX = 127  # symmetric: -127 .. 127


def quantize_int8(weight):
    """(int8 weight, one float32 scale per row) such that weight ~= int8 * scale[:, None]."""
    scales = torch.empty(weight.shape[0])
    quantized = torch.empty(weight.shape, dtype=torch.int8)
    for start in range(0, weight.shape[0], QUANTIZE_BLOCK_ROWS):
        block = weight[start : start + QUANTIZE_BLOCK_ROWS]
        rows = block.to(torch.float32, copy=True)  # (block, in); a copy even if float32: divided in place below
        block_scales = rows.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / INT8_MAX
        quantized[start : start + QUANTIZE_BLOCK_ROWS] = rows.div_(block_scales[:, None]).round_()  # whole numbers: exact in int8
        scales[start : start + QUANTIZE_BLOCK_ROWS] = block_scales
        release_pages(block)
    return quantized, scales


def c_library():
    """The C library's functions (madvise, malloc_trim), or None where it cannot be opened this way (Windows)."""
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):
        return None


def release_pages(tensor):
    """madvise(MADV_DONTNEED): the memory-mapped pages wholly inside `tensor` leave this process's memory.
    Reading them again would fetch them from the file; nothing does. No-op where libc is not at hand."""
    libc = c_library()
    if libc is None:
        return
    start = -(-tensor.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE  # first whole page
    end = (tensor.data_ptr() + tensor.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


def trim_heap():
    """glibc's malloc_trim(0): freed memory that malloc kept for reuse goes back to the operating system."""
    libc = c_library()
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc (Linux); elsewhere nothing to do
        libc.malloc_trim(0)


def int8_matmul(x, weight, scales):
    """x @ (weight * scales[:, None]).T for an int8 weight (out, in) and x (..., in)."""
    rows = x.reshape(-1, x.shape[-1])  # the kernel takes 2-D input: (tokens, in)
    if x.device.type in ("cpu", "mps") and rows.shape[0] <= INT8_KERNEL_MAX_ROWS:
        out = torch._weight_int8pack_mm(rows, weight, scales)  # reads 1 byte per weight
    else:  # a prompt chunk, or a device without the kernel: a temporary 16-bit copy of the weight
        out = F.linear(rows, weight.to(x.dtype)) * scales
    return out.view(*x.shape[:-1], -1)  # (..., out)


def int8_product(layer, x):
    return int8_matmul(x, layer.weight, layer.scales)


def quantize_linear_layers(model):
    """Every linear layer's weight becomes int8 + per-row scales; its product becomes int8_product."""
    for layer in linear_layers(model):
        bf16_weight = layer.weight
        int8_weight, scales = quantize_int8(bf16_weight.detach())
        layer.weight = torch.nn.Parameter(int8_weight, requires_grad=False)
        layer.register_buffer("scales", scales)  # a buffer: model.to(dtype) converts it with the rest
        layer.forward = partial(linear_forward, layer, int8_product)
        if layer is model.layers[0].attention.wq:
            show_quantization_error(bf16_weight, int8_weight, scales)
        trim_heap()  # the float32 temporaries of this layer's conversion: see the memory note above


def show_quantization_error(weight, int8_weight, scales):
    """The relative error int8 weights add to one layer's output, on random bfloat16 inputs."""
    x = torch.randn(16, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    exact = F.linear(x.float(), weight.float())
    approx = int8_matmul(x, int8_weight, scales.to(torch.bfloat16)).float()
    error = ((approx - exact).norm(dim=1) / exact.norm(dim=1)).mean()
    print(f"int8: layer 0's wq output differs from bfloat16 by {error:.2%} on average (relative)", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# Speed-up (CPU, several sequences per step, i.e. beam search): weights packed for oneDNN.
# With k beams, every decode step multiplies each weight matrix by k rows at once. On CPUs with AVX-512,
# PyTorch hands bfloat16 products to the oneDNN library, whose kernels read the weight in a blocked layout
# of their own (in bfloat16: tiles of 64 output channels x 32 inputs, each pair of neighbouring inputs
# side by side, which is what the CPU's bfloat16 dot-product instruction consumes). Given the plain
# (out, in) weight, the kernel rearranges it block by block inside every call, and on a few rows the
# rearranging takes longer than the multiplying. pack_linear_layers rearranges each weight once, at load time
# (torch.ops.mkldnn._reorder_linear_weight, the op torch.compile's CPU weight-freezing uses), and each
# layer then calls oneDNN's linear on the packed weight. The same holds in float32, where PyTorch's
# default path for a few rows is slower still. Measured with benchmarks/bench_kernels.py on a 2-core
# AVX-512 CPU, all the 1B model's linear layers, 5 rows: bfloat16 135-175 ms plain against 67-86 ms
# packed; float32 746 against 180 ms. In benchmarks/bench_decode.py, beam-5 decoding went from 2.0x
# greedy's time to 1.2x (with the attention below). `rows` tells oneDNN how many rows to expect, and so
# which layout to choose.
#
# Greedy decoding and sampling (one row per step) keep the plain weights: for a single row PyTorch's own
# matrix-vector kernel reads them faster still (see matrix_vector_kernels), and plain weights stay
# memory-mapped, with nothing to copy at load time. A packed weight is a copy in ordinary memory; as in
# the 8-bit conversion, release_pages then lets go of the plain weight's pages, so the model is resident
# once. (Llama 3.2's tied output layer gets its own packed copy; the embedding table stays mapped, and a
# lookup reads only the rows of the tokens it looks up.)
# ---------------------------------------------------------------------------------------------------------
def packs_weights(device, dtype, rows):
    """Whether load_model packs the weights: several rows per step, on an x86 CPU (where oneDNN's fast
    kernels are), in float32, or in bfloat16 where oneDNN has bfloat16 kernels (AVX-512 CPUs)."""
    if device.type != "cpu" or rows == 1 or not torch.backends.mkldnn.is_available():
        return False
    x86 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    if dtype == torch.bfloat16:
        return x86 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return x86 and dtype == torch.float32


def pack_linear_layers(model, dtype, rows):
    """Every linear layer's weight becomes a oneDNN-packed copy in `dtype`; its product becomes onednn_product."""
    for layer in linear_layers(model):
        plain = layer.weight.detach()
        packed = torch.ops.mkldnn._reorder_linear_weight(plain.to(dtype), rows)  # an opaque "mkldnn" tensor
        layer.weight = torch.nn.Parameter(packed, requires_grad=False)
        release_pages(plain)
        layer.forward = partial(linear_forward, layer, onednn_product)


def onednn_product(layer, x):
    return torch.ops.mkldnn._linear_pointwise(x, layer.weight, None, "none", [], "")  # no bias, nothing fused


# ---------------------------------------------------------------------------------------------------------
# Speed-up: attention without copies (grouped-query attention, written out).
# Llama 3 has fewer key-value heads than query heads: in the 1B model, 32 query heads share 8 key-value
# heads, 4 each (n_rep = 4). llama-models' Attention.forward first copies the cached keys and values 4
# times (repeat_kv) so that every query head has its own, then transposes them for the matrix products,
# more copies, growing with the context. grouped_attention below is Attention.forward with the same
# projections, RoPE (llama-models' own apply_rotary_emb) and mask, but it groups the query heads by the
# key-value head they share and multiplies each group by its keys and values where they lie in the cache.
# For that, its cache keeps each head's positions together, (batch, kv_heads, seq, head_dim) (llama-models'
# is (batch, seq, kv_heads, head_dim)): the keys and values of one head are then one block of memory, which
# the matrix products read as they are; in llama-models' layout they are scattered. One layer's attention
# with 512 tokens cached, projections excluded, on the 2-core test CPU (benchmarks/bench_kernels.py, its
# attention table, five runs): llama-models' 2.6-3.4 ms, grouped_attention 0.24-0.31 ms; for beam
# search's 5 sequences, 12.2-12.9 ms against 0.6-1.0 ms. With 16 layers, llama-models' version adds
# 35-50 ms to every 1B decode step, which otherwise takes about 95 ms. Written out, it is also the clearest
# statement of what attention does (PyTorch's fused scaled_dot_product_attention can skip the copies too,
# but hides these steps):
#   scores  = queries @ keys^T / sqrt(head_dim)    how well each query matches each cached position
#   weights = softmax(scores + mask)               mask: -inf where a position lies in the future
#   output  = weights @ values                     a weighted mix of the cached values
# minimal_run_inference.py keeps llama-models' original; the tests check that both give the same text.
# (If you edit Attention.forward in an editable llama-models to experiment, edit or remove this too.)
# ---------------------------------------------------------------------------------------------------------
def grouped_attention(attention, x, start_pos, freqs_cis, mask):
    batch, seqlen, _ = x.shape
    kv_heads, n_rep, head_dim = attention.n_local_kv_heads, attention.n_rep, attention.head_dim
    xq = attention.wq(x).view(batch, seqlen, kv_heads * n_rep, head_dim)
    xk = attention.wk(x).view(batch, seqlen, kv_heads, head_dim)
    xv = attention.wv(x).view(batch, seqlen, kv_heads, head_dim)
    xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)  # rotate by position: see RoPE above
    attention.cache_k[:batch, :, start_pos : start_pos + seqlen] = xk.transpose(1, 2)  # (batch, kv_heads, seqlen, head_dim)
    attention.cache_v[:batch, :, start_pos : start_pos + seqlen] = xv.transpose(1, 2)
    context = start_pos + seqlen
    keys = attention.cache_k[:batch, :, :context]  # (batch, kv_heads, context, head_dim)
    values = attention.cache_v[:batch, :, :context]
    # query head h uses key-value head h // n_rep: group the n_rep heads of each key-value head as rows
    queries = xq.view(batch, seqlen, kv_heads, n_rep, head_dim).permute(0, 2, 3, 1, 4)
    queries = queries.reshape(batch, kv_heads, n_rep * seqlen, head_dim)  # (batch, kv_heads, n_rep * seqlen, head_dim)
    # In float32, like llama-models' softmax; on CPUs this also keeps these small products, whose shape
    # changes with every token, away from oneDNN, which would cache a new kernel for each shape.
    scores = queries.float() @ keys.float().transpose(2, 3) / math.sqrt(head_dim)  # (batch, kv_heads, n_rep * seqlen, context)
    if mask is not None:  # (seqlen, context): broadcast over the batch, the heads and n_rep
        scores = (scores.view(batch, kv_heads, n_rep, seqlen, context) + mask).view_as(scores)
    weights = torch.softmax(scores, dim=-1)
    output = (weights @ values.float()).type_as(xq)  # (batch, kv_heads, n_rep * seqlen, head_dim)
    output = output.view(batch, kv_heads, n_rep, seqlen, head_dim).permute(0, 3, 1, 2, 4)  # back to head order
    return attention.wo(output.reshape(batch, seqlen, -1))  # (batch, seqlen, dim)


def describe_model(model, args):
    """Print what is in memory: the weights, the KV cache, and the RoPE scale factor in use."""
    # Tied weights are one tensor: count it once. (Packed weights have no data pointer; none is shared.)
    tensors = {id(p) if p.is_mkldnn else p.data_ptr(): p for p in model.parameters()}
    gib = {}  # per dtype: int8 weights and the bfloat16 rest, when quantised
    for tensor in tensors.values():
        dtype = str(tensor.dtype).removeprefix("torch.")
        gib[dtype] = gib.get(dtype, 0) + tensor.nbytes / 2**30
    attention = model.layers[0].attention
    cache_bytes = 2 * len(model.layers) * attention.cache_k.numel() * attention.cache_k.element_size()
    print(
        f"{args.n_layers} layers, dim {args.dim}, {args.n_heads} query / {args.n_kv_heads} key-value heads, "
        f"vocab {args.vocab_size}, RoPE scale factor {rope_scale_factor(args) if args.use_scaled_rope else 'none'}; "
        f"weights {' + '.join(f'{size:.2f} GiB {dtype}' for dtype, size in gib.items())}, "
        f"KV cache {cache_bytes / 2**20:.1f} MiB ({args.max_batch_size} x {args.max_seq_len} tokens)",
        file=sys.stderr,
    )


# ---------------------------------------------------------------------------------------------------------
# Tokens to logits: prefill, then one decode step per new token.
#
# model(tokens, start_pos) runs tokens of shape (batch, seqlen), which sit at positions start_pos ...
# start_pos + seqlen - 1, through the network:
#   embedding lookup           (batch, seqlen) -> (batch, seqlen, dim)
#   n_layers x [RMSNorm, attention with RoPE and the KV cache, RMSNorm, SwiGLU feed-forward], each added
#   to the running hidden vector   (batch, seqlen, dim)
#   final RMSNorm and output layer -> (batch, 1, vocab) here, thanks to the hook above: the logits, one
#   unnormalised score per vocabulary token; softmax turns them into probabilities.
# Each call writes the new tokens' keys and values into the cache at their positions and attends over
# everything cached so far.
#
# Prefill runs the prompt through the model in chunks of PREFILL_CHUNK tokens: one pass over the weights
# serves all the tokens of a chunk. (One chunk for the whole prompt would be fastest, but attention
# compares every token of a chunk with every token before it: for a 10,000-token prompt on the 1B model
# the scores alone, 32 heads x 10,000 x 10,000 x 4 bytes, would need 12.8 GB.) Then each decode step
# feeds only the newest token (seqlen 1) at its position. A step's cost is dominated by reading every
# weight once (2.5 GB for 1B in bfloat16), so it stays flat as the text grows.
# ---------------------------------------------------------------------------------------------------------
def prefill(model, prompt_ids, device):
    for start in range(0, len(prompt_ids), PREFILL_CHUNK):
        tokens = torch.tensor([prompt_ids[start : start + PREFILL_CHUNK]], device=device)  # (1, chunk)
        logits = model(tokens, start_pos=start)[0, -1]  # (vocab,)
    return logits


def decode_step(model, token_ids, pos, device):
    """Feed one token per sequence in the batch, all at position `pos`; return each sequence's next logits."""
    tokens = torch.tensor(token_ids, device=device).view(-1, 1)  # (batch, 1)
    with matrix_vector_kernels(enabled=device.type == "cpu" and len(token_ids) == 1):
        return model(tokens, start_pos=pos)[:, -1]  # (batch, vocab)


# Speed-up (CPU, one sequence): a decode step multiplies every weight matrix by a single vector. PyTorch
# sends bfloat16 matrix products on CPUs with AVX-512 to the oneDNN library, whose kernels are built for
# many rows at once; for one row, PyTorch's own matrix-vector code streams the weights faster. Measured
# with benchmarks/bench_kernels.py (2-core AVX-512 machine, all 1B weights, one row): 134-167 ms through
# oneDNN (76-104 ms with packed weights, see pack_linear_layers), 73-96 ms without it. For several rows
# (a prompt chunk, or beam search's k beams) PyTorch's own code is far slower (336-370 ms for 5 rows,
# against 67-86 ms through oneDNN with packed weights), so oneDNN is switched off only around
# single-row steps. Other CPUs may differ: measure yours the same way.
@contextmanager
def matrix_vector_kernels(enabled):
    use_onednn = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = use_onednn and not enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = use_onednn


# ---------------------------------------------------------------------------------------------------------
# Choosing the next token, three ways.
# 1. Greedy: the most likely token. Deterministic, and what the minimal script does.
# 2. Top-p sampling: draw at random, but only among the most likely tokens that together hold TOP_P of
#    the probability, after dividing the logits by TEMPERATURE (< 1 sharpens, > 1 flattens). Varied text,
#    without the long tail of nonsense tokens. The same SEED gives the same draws.
# 3. Beam search (further below): looks ahead over several candidate continuations at once.
# ---------------------------------------------------------------------------------------------------------
def pick_greedy(logits):
    return int(logits.argmax())


def sample_top_p(logits, temperature, top_p, generator):
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (vocab,)
    sorted_probs, order = probs.sort(descending=True)
    outside_nucleus = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before it already reaches top_p
    sorted_probs[outside_nucleus] = 0.0  # the most likely token is always kept
    choice = torch.multinomial(sorted_probs, num_samples=1, generator=generator)  # needs no renormalising
    return int(order[choice])


def show_token(step, token_id, logits, tokenizer):
    """One aligned stderr line: step, id, text, probability, and the runners-up."""
    probs = torch.softmax(logits.float(), dim=-1)
    top_probs, top_ids = probs.topk(SHOWN_ALTERNATIVES + 1)
    others = [f"{tokenizer.decode([i])!r} {p:.3g}" for p, i in zip(top_probs.tolist(), top_ids.tolist()) if i != token_id]
    text = repr(tokenizer.decode([token_id]))
    print(f"{step:>5} {token_id:>7} {text:<20} {probs[token_id]:<9.3g} {' | '.join(others[:SHOWN_ALTERNATIVES])}", file=sys.stderr)


def generate(model, prompt_ids, max_new_tokens, stop_tokens, device, pick=pick_greedy, on_token=None):
    """Greedy (or sampled, with another `pick`) decoding with the KV cache; yields the id of each new token."""
    logits = prefill(model, prompt_ids, device)
    for step in range(max_new_tokens):
        support.check_finite(logits, model.norm.weight.dtype)  # NaN or inf: stop, never print garbage
        token_id = pick(logits)
        if on_token:
            on_token(step, token_id, logits)
        if token_id in stop_tokens:
            return
        yield token_id
        if step + 1 < max_new_tokens:  # no forward pass for a token that would not be used
            logits = decode_step(model, [token_id], len(prompt_ids) + step, device)[0]  # it sits at this position


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
# The original version of this project took the k most likely *first* tokens and then continued each one
# greedily, one after another, recomputing the whole text at every step. That is k greedy runs: they never
# compete after the first token, and they cost k times a greedy run (times the text length, without a cache).
#
# Here the k beams run as one batch: one forward call per step for all of them, through weights that are
# read once for the whole batch, which is why a beam step costs little more than a greedy step.
# Shapes, per step:
#   logits                       (k, vocab)       one row per live beam
#   scores = beam_scores[:, None] + log_softmax(logits)     (k, vocab)  total log-prob of each extension
#   flatten and take the top     (k * vocab,) -> (n_candidates,)
#   parent beam = flat // vocab, new token = flat % vocab
# Then each layer's KV cache rows must follow the parents: row i of the cache holds the keys and values of
# beam i's past tokens, and the new beam i may descend from old beam 3. reorder_cache copies row 3 into
# row i (for all layers, up to the current position) before the next step reads it.
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
def reorder_cache(model, parents, length):
    """Row i of every layer's KV cache becomes a copy of row parents[i], for positions 0 .. length - 1."""
    rows = torch.tensor(parents, device=model.layers[0].attention.cache_k.device)
    for layer in model.layers:
        for cache in (layer.attention.cache_k, layer.attention.cache_v):  # (max_batch, kv_heads, max_seq, head_dim)
            cache[: len(parents), :, :length] = cache[rows, :, :length]  # gathers first, then writes: safe to overlap


def beam_search(model, prompt_ids, max_new_tokens, stop_tokens, device, beam_width, length_penalty, on_step=None):
    """Returns the beam_width best finished hypotheses, best first, as (score, token ids incl. a stop token)."""
    n_candidates = (1 + len(stop_tokens)) * beam_width
    beams, beam_scores = [[]], torch.zeros(1)  # one live beam at first: the bare prompt, log-prob 0
    finished = []  # (score, token_ids), best first
    logits = prefill(model, prompt_ids, device)[None]  # (1, vocab): the prompt once, into cache row 0
    for step in range(max_new_tokens):
        if step > 0:
            logits = decode_step(model, [beam[-1] for beam in beams], len(prompt_ids) + step - 1, device)  # (k, vocab)
        support.check_finite(logits, model.norm.weight.dtype)
        scores = beam_scores[:, None] + F.log_softmax(logits.float(), dim=-1).cpu()  # (beams, vocab)
        top_scores, flat = scores.view(-1).topk(n_candidates)  # best first
        parents, tokens = (flat // scores.shape[1]).tolist(), (flat % scores.shape[1]).tolist()
        length, last_step = step + 1, step + 1 == max_new_tokens  # new tokens per candidate, counting its last
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
        reorder_cache(model, [parent for _, parent, _ in survivors], len(prompt_ids) + step)
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
# Tokens back to text, as they come.
# A token is a sequence of bytes, not always whole characters: an emoji or a CJK character can be split
# across two tokens. Printing each token's bytes decoded on its own would print replacement characters
# (U+FFFD) in the middle of such a character. An incremental UTF-8 decoder holds back an incomplete
# character until its remaining bytes arrive, so the printed text is exactly tokenizer.decode(all ids).
# ---------------------------------------------------------------------------------------------------------
def stream(token_ids, tokenizer):
    printed = []
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds back a character split across tokens
    for token_id in token_ids:
        print(utf8.decode(tokenizer.model.decode_single_token_bytes(token_id)), end="", flush=True)
        printed.append(token_id)
    print(utf8.decode(b"", final=True), end="", flush=True)
    return printed


def token_picker(device):
    """Greedy, or top-p sampling with its own seeded random generator when TEMPERATURE > 0."""
    if TEMPERATURE == 0:
        return pick_greedy
    generator = torch.Generator(device=device).manual_seed(SEED)
    return lambda logits: sample_top_p(logits, TEMPERATURE, TOP_P, generator)


def run_beam_search(model, tokenizer, prompt_ids, device):
    """Beam search, then the best NUM_RETURN_SEQUENCES texts on stdout, best first, a blank line between."""
    finished = beam_search(model, prompt_ids, MAX_NEW_TOKENS, tokenizer.stop_tokens, device, BEAM_WIDTH,
                           LENGTH_PENALTY, partial(show_beams, tokenizer=tokenizer) if SHOW_TOKENS else None)
    for i, (score, token_ids) in enumerate(finished[:NUM_RETURN_SEQUENCES]):
        print(f"beam result {i + 1}: score {score:.4f}, {len(token_ids)} tokens", file=sys.stderr)
        print("\n\n" if i else "", end="")
        stream([t for t in token_ids if t not in tokenizer.stop_tokens], tokenizer)
    return max(len(token_ids) for _, token_ids in finished)


def check_settings():
    """The numeric and named settings of this script, each in its range."""
    support.check_range("MAX_NEW_TOKENS", MAX_NEW_TOKENS, 1)
    support.check_range("PREFILL_CHUNK", PREFILL_CHUNK, 1)
    support.check_range("BEAM_WIDTH", BEAM_WIDTH, 1)
    support.check_range("NUM_RETURN_SEQUENCES", NUM_RETURN_SEQUENCES, 1, BEAM_WIDTH)
    support.check_range("TEMPERATURE", TEMPERATURE, 0.0)
    if not 0 < TOP_P <= 1:
        support.fail(f"TOP_P={TOP_P} is out of range: it must be in (0, 1]")
    if QUANTIZE not in ("", "int8"):
        support.fail(f"QUANTIZE={QUANTIZE!r} is not supported; choose \"int8\" or \"\" (off)")
    if TEMPERATURE > 0 and BEAM_WIDTH > 1:
        support.fail("choose beam search (BEAM_WIDTH > 1) or sampling (TEMPERATURE > 0), not both")


def main():
    # Settings: the globals above, overridden by environment variables, then checked, before any work.
    # Device and number format: nothing here is CUDA-specific; the same code runs on a laptop CPU, an
    # Apple GPU (mps) or an NVIDIA GPU. bfloat16 is the format Meta stores the weights in: 2 bytes per
    # number, float32's range with less precision. Keeping it halves memory and, because generating a
    # token reads every weight once, roughly halves the time per token against float32. float16 is for
    # GPUs without bfloat16 (it overflows more easily). On a CPU, PyTorch uses one thread per physical
    # core; OMP_NUM_THREADS=N python run_inference.py changes that.
    support.apply_environment(globals())
    support.silence_other_ranks()
    device = support.pick_device(DEVICE)
    dtype = support.pick_dtype(DTYPE, device)
    check_settings()

    # The checkpoint folder, as `llama-model download --source meta --model-id NAME` leaves it:
    #   consolidated.00.pth  the weights (one file per model-parallel shard: 1 for 1B to 8B, 8 for 70B)
    #   params.json          the architecture's sizes (read in load_model)
    #   tokenizer.model      the vocabulary (see encode_prompt)
    #   checklist.chk        md5 sums of the other files (`llama-model verify-download` checks them)
    model_dir = support.find_checkpoint(Path(LLAMA_MODELS_DIR).expanduser(), MODEL_NAME)
    params = support.read_params(model_dir)
    tokenizer = support.load_tokenizer(model_dir, params)
    instruct = "instruct" in model_dir.name.lower()
    prompt_ids = encode_prompt(tokenizer, INPUT_STRING, SYSTEM_PROMPT, instruct)
    describe_tokenizer(model_dir / "tokenizer.model", tokenizer, prompt_ids)
    support.check_length(len(prompt_ids), MAX_NEW_TOKENS, params)
    support.check_shards(model_dir, params)
    support.check_memory(model_dir, dtype, device, QUANTIZE)  # before trying: say so if the weights cannot fit

    init_distributed(device)
    start = time.perf_counter()
    model = load_model(model_dir, device, dtype, len(prompt_ids) + MAX_NEW_TOKENS, BEAM_WIDTH, QUANTIZE)
    describe_model(model, model.params)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"loaded {model_dir.name} on {device}{threads} in {dtype} in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    start = time.perf_counter()
    if BEAM_WIDTH > 1:
        new_tokens = run_beam_search(model, tokenizer, prompt_ids, device)
    else:
        on_token = partial(show_token, tokenizer=tokenizer) if SHOW_TOKENS else None
        token_ids = generate(model, prompt_ids, MAX_NEW_TOKENS, tokenizer.stop_tokens, device, token_picker(device), on_token)
        new_tokens = len(stream(token_ids, tokenizer))
    seconds = time.perf_counter() - start
    print(f"\n{len(prompt_ids)} prompt + {new_tokens} new tokens in {seconds:.1f} s ({new_tokens / seconds:.2f} tokens/s)", file=sys.stderr)
    print(f"peak memory {support.peak_memory_gib(device):.2f} GiB", file=sys.stderr)
    close_distributed()


if __name__ == "__main__":
    support.run(main)
