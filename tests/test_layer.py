"""The tutorial's layer by hand (run_inference.layer_by_hand), on which its look inside is built.

layer_by_hand must compute what llama-models' TransformerBlock computes, from the block's own modules, in
both cache layouts (SPEEDUPS=0 and 1), in float32 and bfloat16, on a chunk at position 0 and on one after
earlier positions, without changing a cache row. The look inside itself (logit lens and attention, its table
and its picture) is checked against transformers in tests/test_look_inside.py.
"""

import pytest
import torch

import run_inference
from conftest import load, run_script

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
