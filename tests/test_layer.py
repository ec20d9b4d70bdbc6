"""The tutorial's layer by hand and its look inside the model (run_inference.layer_by_hand, look_inside).

layer_by_hand must compute what llama-models' TransformerBlock computes, from the block's own modules, in
both cache layouts (SPEEDUPS=0 and 1), in float32 and bfloat16, on a chunk at position 0 and on one after
earlier positions, without changing a cache row. The look inside (logit lens and attention rows) is
checked against transformers' own Llama on the same weights: its hidden states and attention weights.
"""

import pytest
import torch
from llama_models.llama3.tokenizer import Tokenizer

import run_inference
import smollm_witness
from conftest import load, run_script
from hf_reference import transformers_llama
from standin import smollm

FP32_RELATIVE = 1e-5  # float32: max |ours - block| <= this x max |block|
TEXT = "The capital of France is Paris, and the capital of Italy is"
EARLIER = 7  # positions already in the cache before the chunk, for start_pos > 0


def prompt(tokenizer):
    return tokenizer.encode(TEXT, bos=True, eos=False)


def layer_inputs(model, ids, start_pos):
    """The cache filled by the real model with ids[:start_pos]; the hidden input of the block at positions
    start_pos ... : the embeddings of the remaining ids (1, seqlen, dim)."""
    if start_pos:
        run_inference.prefill(model, ids[:start_pos])
    tokens = torch.tensor([ids[start_pos:]])
    return model.tok_embeddings(tokens)


def real_block(model, block, x, start_pos):
    """llama-models' TransformerBlock itself (it writes the chunk's keys and values into its cache)."""
    seqlen = x.shape[1]
    mask = torch.full((seqlen, start_pos + seqlen), float("-inf")).triu(start_pos + 1).type_as(x)
    return block(x, start_pos, model.freqs_cis[start_pos : start_pos + seqlen], mask)


def by_hand_and_block(models_dir, tokenizer, dtype, use_speedups, start_pos, layer=1):
    """(ours, the real block's output, whether the cache was left as it was) for one block of the tiny model."""
    ids = prompt(tokenizer)
    model = load(run_inference, models_dir / "Tiny", len(ids), dtype, use_speedups=use_speedups)
    with torch.inference_mode():
        x = layer_inputs(model, ids, start_pos)
        for block in model.layers[:layer]:  # the input of block `layer`: the real blocks before it
            x = real_block(model, block, x, start_pos)
        block = model.layers[layer]
        cache = block.attention.cache_k.clone(), block.attention.cache_v.clone()
        ours, _ = run_inference.layer_by_hand(block, x, start_pos, model.freqs_cis)
        untouched = torch.equal(cache[0], block.attention.cache_k) and torch.equal(cache[1], block.attention.cache_v)
        return ours.float(), real_block(model, block, x, start_pos).float(), untouched


@pytest.mark.parametrize("start_pos", [0, EARLIER], ids=["start-0", "after-earlier"])
@pytest.mark.parametrize("use_speedups", [True, False], ids=["speedups-on", "speedups-off"])
def test_layer_by_hand_is_the_block_in_float32(use_speedups, start_pos, models_dir, tokenizer, distributed):
    ours, block, untouched = by_hand_and_block(models_dir, tokenizer, torch.float32, use_speedups, start_pos)
    assert (ours - block).abs().max() <= FP32_RELATIVE * block.abs().max()
    assert untouched, "layer_by_hand changed a row of the KV cache"


@pytest.mark.parametrize("start_pos", [0, EARLIER], ids=["start-0", "after-earlier"])
@pytest.mark.parametrize("use_speedups", [True, False], ids=["speedups-on", "speedups-off"])
def test_layer_by_hand_in_bfloat16_is_as_close_to_float32_as_the_block(use_speedups, start_pos, models_dir, tokenizer,
                                                                       distributed):
    """No farther from the float32 block than the bfloat16 block is, plus one bfloat16 step at the largest value."""
    ours, block, untouched = by_hand_and_block(models_dir, tokenizer, torch.bfloat16, use_speedups, start_pos)
    _, exact, _ = by_hand_and_block(models_dir, tokenizer, torch.float32, use_speedups, start_pos)
    largest = exact.abs().max()
    step = 2.0 ** (torch.floor(torch.log2(largest)) - 7)  # bfloat16 keeps 8 significant bits
    assert (ours - exact).abs().max() <= (block - exact).abs().max() + step
    assert untouched


def test_the_tutorial_prints_the_layer_check_and_a_look_inside_that_changes_no_text(models_dir, tokenizer):
    on = run_script("run_inference.py", models_dir, "Tiny", INPUT_STRING=TEXT, DTYPE="float32", MAX_NEW_TOKENS=6)
    off = run_script("run_inference.py", models_dir, "Tiny", INPUT_STRING=TEXT, DTYPE="float32", MAX_NEW_TOKENS=6,
                     LOOK_INSIDE=0)
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert on.stdout == off.stdout and on.stdout
    [check] = [line for line in on.stderr.splitlines() if line.startswith("layer 0 by hand")]
    assert float(check.split("largest difference ")[1].split(",")[0]) < 1e-5
    rows = on.stderr.split("look inside, at the prompt's last token")[1].splitlines()[2:]
    assert [row.split()[0] for row in rows if row.strip()] == ["1", "2"]  # one row per layer of the tiny model
    assert "look inside" not in off.stderr


def lens_and_attention_of_transformers(hf_model, ids):
    """transformers' logit lens (softmax of lm_head(norm(hidden state after each layer))) and each layer's
    attention weights of the last position (n_layers, heads, positions), in float32."""
    hf_model.set_attn_implementation("eager")  # the implementation that returns attention weights
    with torch.no_grad():
        out = hf_model(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
    # hidden_states: the embeddings, then each layer's output; the last one already has the final norm
    after_layers = [hf_model.model.norm(h[0, -1]) for h in out.hidden_states[1:-1]] + [out.hidden_states[-1][0, -1]]
    lens = torch.softmax(hf_model.lm_head(torch.stack(after_layers)).float(), dim=-1)
    attention = torch.stack([a[0, :, -1] for a in out.attentions])
    return lens, attention, torch.softmax(out.logits[0, -1].float(), dim=-1)


@pytest.mark.parametrize("use_speedups", [True, False], ids=["speedups-on", "speedups-off"])
def test_look_inside_is_transformers_lens_and_attention(use_speedups, models_dir, tokenizer, distributed):
    ids = prompt(tokenizer)
    model = load(run_inference, models_dir / "Tiny", len(ids) + 1, use_speedups=use_speedups)
    logits = run_inference.prefill(model, ids)
    lens, attention = run_inference.look_inside(model, ids)
    hf_lens, hf_attention, _ = lens_and_attention_of_transformers(transformers_llama(models_dir / "Tiny"), ids)
    assert (lens - hf_lens).abs().max() < 1e-5
    assert (attention - hf_attention).abs().max() < 1e-5
    assert attention.shape == (2, 4, len(ids))  # every head of every layer, over the prompt's positions
    assert (lens[-1] - torch.softmax(logits.float(), dim=-1)).abs().max() < 1e-6  # the last layer's lens: the logits


def test_look_inside_real_weights_is_transformers_lens_and_attention(smollm_dir, distributed):
    """On SmolLM2's trained weights: every layer's lens and each head's attention row equal transformers', and
    the last layer's lens is the model's own next-token distribution (which says " Paris")."""
    vocab = smollm.vocabulary(smollm_dir)
    model_dir = smollm_dir / smollm.BASE_MODEL
    ids = Tokenizer(model_dir / "tokenizer.model").encode("The capital of France is", bos=True, eos=False)
    model = load(run_inference, model_dir, len(ids) + 1)
    logits = run_inference.prefill(model, ids)
    lens, attention = run_inference.look_inside(model, ids)
    hf_lens, hf_attention, _ = lens_and_attention_of_transformers(smollm_witness.transformers_smollm(),
                                                                  vocab.to_smollm(ids))
    # transformers has SmolLM2's 49,152 tokens; the converted checkpoint's other rows (filler, Llama 3's special
    # tokens) hold no probability after any layer (standin/smollm.py: the away row)
    columns = vocab.from_smollm(list(range(vocab.smollm_size)))
    assert (lens[:, columns] - hf_lens).abs().max() < 1e-4
    assert (attention - hf_attention).abs().max() < 1e-4
    assert attention.shape == (30, 9, len(ids))
    assert (lens[-1] - torch.softmax(logits.float(), dim=-1)).abs().max() < 1e-5
    assert int(lens[-1].argmax()) == Tokenizer(model_dir / "tokenizer.model").encode(" Paris", bos=False, eos=False)[0]
