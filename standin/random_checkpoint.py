"""Write random-weight Llama 3 checkpoints in Meta's layout: the models of the tests and the benchmarks.

A folder gets what `llama-model download --source meta` puts there: consolidated.00.pth (bf16 tensors
under Meta's names), params.json, tokenizer.model (the real one, shipped inside the llama-models package)
and checklist.chk. Random weights cost exactly what real ones cost to load and run; they only talk nonsense.
"""

import hashlib
import json
import shutil
from pathlib import Path

import llama_models.llama3
import torch

TOKENIZER = Path(llama_models.llama3.__file__).parent / "tokenizer.model"

# Small enough to load and run in a fraction of a second; the real vocabulary, so the real tokenizer works.
EMBEDDING_STD = 0.02

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
            ffn_dim_multiplier=1.0, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True)
# The published shapes of Llama 3.2 1B (its params.json); Llama 3.2 ties the output layer to the embeddings.
LLAMA_3_2_1B = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                    ffn_dim_multiplier=1.5, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True)


def ffn_hidden_dim(params):
    """The SwiGLU width Meta's model code derives from params.json: 2/3 of 4 x dim, scaled, rounded up."""
    hidden = int(params.get("ffn_dim_multiplier", 1.0) * int(2 * 4 * params["dim"] / 3))
    return params["multiple_of"] * -(-hidden // params["multiple_of"])


def random_weights(params, seed=0, tie_embeddings=False):
    """Meta's tensor names and shapes in bf16: N(0, 1/fan_in) linears so activations stay O(1), and small
    embeddings as in trained models (tied to the output layer, large ones would make every logit huge)."""
    generator = torch.Generator().manual_seed(seed)
    dim, head_dim = params["dim"], params["dim"] // params["n_heads"]
    kv_dim, hidden = params["n_kv_heads"] * head_dim, ffn_hidden_dim(params)

    def linear(rows, cols):
        return (torch.randn(rows, cols, generator=generator) / cols**0.5).to(torch.bfloat16)

    embeddings = EMBEDDING_STD * torch.randn(params["vocab_size"], dim, generator=generator)
    weights = {"tok_embeddings.weight": embeddings.to(torch.bfloat16)}
    for i in range(params["n_layers"]):
        layer = f"layers.{i}."
        weights[layer + "attention.wq.weight"] = linear(dim, dim)
        weights[layer + "attention.wk.weight"] = linear(kv_dim, dim)
        weights[layer + "attention.wv.weight"] = linear(kv_dim, dim)
        weights[layer + "attention.wo.weight"] = linear(dim, dim)
        weights[layer + "feed_forward.w1.weight"] = linear(hidden, dim)
        weights[layer + "feed_forward.w2.weight"] = linear(dim, hidden)
        weights[layer + "feed_forward.w3.weight"] = linear(hidden, dim)
        weights[layer + "attention_norm.weight"] = (1 + 0.1 * torch.randn(dim, generator=generator)).to(torch.bfloat16)
        weights[layer + "ffn_norm.weight"] = (1 + 0.1 * torch.randn(dim, generator=generator)).to(torch.bfloat16)
    weights["norm.weight"] = torch.ones(dim, dtype=torch.bfloat16)
    # Tied: the same tensor under both names, which torch.save stores once.
    weights["output.weight"] = weights["tok_embeddings.weight"] if tie_embeddings else linear(params["vocab_size"], dim)
    return weights


# How Meta splits a model across model-parallel shards (llama-models' fairscale layers): column-parallel
# layers and the vocabulary-parallel embedding by rows (dim 0), row-parallel layers by columns (dim 1),
# norms replicated.
SPLIT_BY_ROWS = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3", "output",
                 "tok_embeddings")
SPLIT_BY_COLUMNS = ("attention.wo", "feed_forward.w2")


def split_into_shards(weights, shards):
    """The state dicts of `shards` model-parallel shards, as in Meta's multi-file checkpoints."""
    def split(name, tensor):
        module = name.removesuffix(".weight")  # "layers.3.attention.wq", "output", ...
        if module.endswith(SPLIT_BY_ROWS):
            return tensor.chunk(shards, dim=0)
        if module.endswith(SPLIT_BY_COLUMNS):
            return tensor.chunk(shards, dim=1)
        return [tensor] * shards

    pieces = {name: split(name, tensor) for name, tensor in weights.items()}
    return [{name: pieces[name][i].clone() for name in weights} for i in range(shards)]


def write_checkpoint(folder, params, weights, shards=1):
    """A checkpoint folder in Meta's layout from the given params.json fields and tensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = [f"consolidated.{i:02d}.pth" for i in range(shards)]
    for name, shard in zip(files, [weights] if shards == 1 else split_into_shards(weights, shards)):
        torch.save(shard, folder / name)
    (folder / "params.json").write_text(json.dumps(params))
    shutil.copyfile(TOKENIZER, folder / "tokenizer.model")
    sums = [f"{hashlib.md5((folder / name).read_bytes()).hexdigest()}  {name}"
            for name in files + ["params.json", "tokenizer.model"]]
    (folder / "checklist.chk").write_text("\n".join(sums) + "\n")
    return folder


def fixed_distribution_weights(params, logits, seed=0):
    """Weights whose next-token logits are `logits` ({token id: logit}, 0 for every other token) at every
    position, whatever the text: the blocks add nothing (wo and w2 are zero), every token's embedding is the
    same vector along the first axis, which the final RMSNorm turns into sqrt(dim) along it, and a token's
    output row holds its logit / sqrt(dim) there. A model that rolls the same dice at every step."""
    weights = random_weights(params, seed)
    dim = params["dim"]
    for name in weights:
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            weights[name] = torch.zeros_like(weights[name])
    embeddings = torch.zeros(params["vocab_size"], dim)
    embeddings[:, 0] = dim**0.5
    output = torch.zeros(params["vocab_size"], dim)
    for token_id, logit in logits.items():
        output[token_id, 0] = logit / dim**0.5
    weights["tok_embeddings.weight"] = embeddings.to(torch.bfloat16)
    weights["output.weight"] = output.to(torch.bfloat16)
    return weights
