"""The same weights in transformers: a Meta-layout Llama 3 checkpoint folder as a `LlamaForCausalLM`, in memory.

An independent witness for the scripts. transformers implements Llama with its own code (its own attention,
RoPE and RMSNorm), so a model built here and the scripts' llama-models model agree only if both read the
checkpoint the same way. Used by tests/test_independent.py (fp32), by the look inside's tests
(lens_and_attention) and by the benchmark (bf16):

    model = transformers_llama(model_dir, dtype=torch.bfloat16)
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=64, do_sample=False,
                         eos_token_id=tokenizer.stop_tokens, pad_token_id=tokenizer.stop_tokens[0])

The model's config sets no token ids (no bos, eos or pad): pass the stop tokens to `generate` yourself.
Only single-shard checkpoints (consolidated.00.pth: Llama 3.2 1B and 3B, Llama 3.1 8B) are supported.

The conversion, tensor by tensor (Meta name -> transformers name):
    tok_embeddings.weight                 -> model.embed_tokens.weight
    layers.N.attention.wq / wk.weight     -> model.layers.N.self_attn.q_proj / k_proj.weight, rows permuted
    layers.N.attention.wv / wo.weight     -> model.layers.N.self_attn.v_proj / o_proj.weight
    layers.N.feed_forward.w1 / w3 / w2    -> model.layers.N.mlp.gate_proj / up_proj / down_proj.weight
    layers.N.attention_norm / ffn_norm    -> model.layers.N.input_layernorm / post_attention_layernorm.weight
    norm.weight                           -> model.norm.weight
    output.weight                         -> lm_head.weight
The row permutation: Meta's RoPE rotates interleaved pairs (0,1), (2,3), ... of each head; transformers'
rotates the halves (i, i + head_dim/2). Row 2i of a head goes to row i, row 2i+1 to row i + head_dim/2.
"""

import json
from pathlib import Path

import torch
from llama_models.llama3.args import ModelArgs
from transformers import LlamaConfig, LlamaForCausalLM

import run_inference
from standin.random_checkpoint import ffn_hidden_dim

ROPE_LOW_FREQ_FACTOR = 1.0
ROPE_HIGH_FREQ_FACTOR = 4.0
ROPE_ORIGINAL_CONTEXT = 8192
MAX_CONTEXT = 131072  # Llama 3.1+ context length (max_position_embeddings in Meta's published HF configs)

LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def interleaved_to_half_split(weight, n_heads):
    """Permute the rows of a wq / wk matrix, per head, from Meta's rotary pair layout to transformers'."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    pairs = weight.view(n_heads, head_dim // 2, 2, cols)  # (head, pair i, member of the pair, cols)
    return pairs.transpose(1, 2).reshape(rows, cols)  # (head, member, pair i, cols): evens first, then odds


def llama_config(params, rope_factor):
    """A transformers LlamaConfig with the sizes of params.json (Meta's) and the given RoPE scale factor."""
    rope = {"rope_type": "default", "rope_theta": float(params["rope_theta"])}
    if params.get("use_scaled_rope", False):
        rope.update(rope_type="llama3", factor=float(rope_factor), low_freq_factor=ROPE_LOW_FREQ_FACTOR,
                    high_freq_factor=ROPE_HIGH_FREQ_FACTOR, original_max_position_embeddings=ROPE_ORIGINAL_CONTEXT)
    return LlamaConfig(
        vocab_size=params["vocab_size"],
        hidden_size=params["dim"],
        intermediate_size=ffn_hidden_dim(params),
        num_hidden_layers=params["n_layers"],
        num_attention_heads=params["n_heads"],
        num_key_value_heads=params.get("n_kv_heads") or params["n_heads"],
        rms_norm_eps=params["norm_eps"],
        max_position_embeddings=MAX_CONTEXT,
        rope_parameters=rope,
        tie_word_embeddings=False,  # two tensors, even where a Llama 3.2 file stores them once
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def transformers_state_dict(meta_weights, params, dtype):
    """Meta's tensors under transformers' names, in `dtype`, with wq / wk rows permuted."""
    n_kv_heads = params.get("n_kv_heads") or params["n_heads"]
    converted = {}
    for name, tensor in meta_weights.items():
        if name in TOP_NAMES:
            converted[TOP_NAMES[name]] = tensor.to(dtype)
            continue
        _, index, suffix = name.split(".", 2)  # "layers", "3", "attention.wq.weight"
        if suffix == "attention.wq.weight":
            tensor = interleaved_to_half_split(tensor, params["n_heads"])
        elif suffix == "attention.wk.weight":
            tensor = interleaved_to_half_split(tensor, n_kv_heads)
        converted[f"model.layers.{index}.{LAYER_NAMES[suffix]}"] = tensor.to(dtype)
    return converted


def transformers_llama(model_dir, dtype=torch.float32, rope_factor=None):
    """The checkpoint in `model_dir` (Meta's layout) as a transformers LlamaForCausalLM on the CPU, in `dtype`.

    rope_factor: the Llama 3 RoPE scale factor; None takes the one the scripts pick for these shapes
    (run_inference.rope_scale_factor: 32 for Llama 3.2 1B / 3B, else 8). Pass another to build a
    deliberately wrong model. The model is in eval mode; move it with .to(device) if needed.
    """
    model_dir = Path(model_dir)
    params = json.loads((model_dir / "params.json").read_text())
    shards = sorted(model_dir.glob("consolidated.*.pth"))
    if len(shards) != 1:
        raise ValueError(f"{model_dir} has {len(shards)} consolidated.*.pth files; only single-shard checkpoints "
                         "(Llama 3.2 1B / 3B, Llama 3.1 8B) are supported")
    if rope_factor is None:
        rope_factor = run_inference.rope_scale_factor(ModelArgs(**params))
    config = llama_config(params, rope_factor)
    config.dtype = dtype
    meta_weights = torch.load(shards[0], map_location="cpu", mmap=True, weights_only=True)
    weights = transformers_state_dict(meta_weights, params, dtype)
    with torch.device("meta"):  # shapes only: the weights below replace every parameter
        model = LlamaForCausalLM(config)
    model.load_state_dict(weights, strict=True, assign=True)
    # Non-persistent buffers (RoPE's inverse frequencies) are not in a state dict: compute them for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    leftover = [name for name, tensor in model.state_dict(keep_vars=True).items() if tensor.is_meta]
    leftover += [name for name, tensor in model.named_buffers() if tensor.is_meta]
    if leftover:
        raise RuntimeError(f"not loaded from the checkpoint: {leftover}")
    return model.eval()


def lens_and_attention(model, ids):
    """transformers' own look inside a LlamaForCausalLM, float32: the logit lens after each layer at every
    position, softmax(lm_head(norm(hidden state))) (n_layers, positions, vocab), and every layer's attention
    weights (n_layers, heads, positions, positions). Switches the model to eager attention, the
    implementation that returns its weights."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
        # hidden_states: the embeddings, then each layer's output; the last one has been through the final norm
        after_layers = [model.model.norm(h[0]) for h in out.hidden_states[1:-1]] + [out.hidden_states[-1][0]]
        lens = torch.softmax(model.lm_head(torch.stack(after_layers)).float(), dim=-1)
    return lens, torch.stack([weights[0] for weights in out.attentions]).float()
