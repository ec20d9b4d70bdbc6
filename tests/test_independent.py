"""An independent witness: the scripts against transformers' Llama, run on the same weights, in float32.

transformers shares no model code with llama-models: its own attention, RoPE (rotating halves, not pairs),
RMSNorm, KV cache and beam search. tests/hf_reference.py loads a Meta-layout checkpoint into its
LlamaForCausalLM; every test here feeds both the same token ids and expects the same numbers:
logits within float32 rounding, identical greedy and beam search tokens, identical chat prompts.
"""

import gc

import pytest
import torch
from llama_models.llama3.args import ModelArgs
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import run_inference
from conftest import load, run_script
from hf_reference import llama_config, transformers_llama
from standin.random_checkpoint import LLAMA_3_2_1B, TINY, write_checkpoint

FP32_TOLERANCE = 1e-4  # max abs logit difference between two float32 implementations (tiny logits are O(5))
PROMPT_TEXT = "The capital of France is"
SYSTEM_TEXT = "You are a concise assistant."
USER_TEXT = "Name three rivers in Europe."
NEW_TOKENS = 64

# Published shapes (params.json) of the other Llama 3.x models, for the RoPE table test; no weights needed.
LLAMA_3_2_3B = dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                    ffn_dim_multiplier=1.0, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True)
LLAMA_3_1_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                    ffn_dim_multiplier=1.3, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True)
LLAMA_3_3_70B = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, multiple_of=4096,
                     ffn_dim_multiplier=1.3, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True)
# The RoPE scale factor of each, from Meta's published configs (llama-models issues 166 and 241).
PUBLISHED_ROPE_FACTORS = {"Llama3.2-1B": (LLAMA_3_2_1B, 32), "Llama3.2-3B": (LLAMA_3_2_3B, 32),
                          "Llama3.1-8B": (LLAMA_3_1_8B, 8), "Llama3.3-70B": (LLAMA_3_3_70B, 8), "Tiny": (TINY, 8)}
OTHER_FACTOR = {8: 32, 32: 8}  # the wrong one, for each

# The stop-prone variant of the tiny model (beam search and greedy stopping): on the plain model's greedy path,
# <|eot_id|> would have been the top token at this share of the positions.
EOT_SHARE = 0.2


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------
def random_prompt(tokenizer, length, seed):
    """<|begin_of_text|> and length - 1 ordinary tokens drawn at random (ordinary ids come before the specials)."""
    bos = tokenizer.special_tokens["<|begin_of_text|>"]
    generator = torch.Generator().manual_seed(seed)
    return [bos] + torch.randint(0, min(tokenizer.special_tokens.values()), (length - 1,), generator=generator).tolist()


@torch.inference_mode()
def transformers_logits(hf_model, ids):
    """transformers' logits for every position of `ids` in one pass: (len(ids), vocab)."""
    return hf_model(torch.tensor([ids])).logits[0].float()


def logits_by_position(model, ids, cuts):
    """Feed `ids` to a scripts' model in chunks split at `cuts`, each at its start_pos, through its KV cache.

    Returns (positions, logits) for the positions the model returns logits for: llama-models' Transformer
    returns one row per position of the chunk; run_inference's returns only the chunk's last one."""
    bounds = [0, *cuts, len(ids)]
    positions, rows = [], []
    for start, end in zip(bounds, bounds[1:]):
        logits = model(torch.tensor([ids[start:end]]), start_pos=start)[0]  # (n, vocab): the chunk's last n
        positions += range(end - logits.shape[0], end)
        rows.append(logits.float())
    return positions, torch.cat(rows)


def max_diff(a, b):
    return (a - b).abs().max().item()


def up_to_stop(ids, stop_tokens):
    """The ids up to and including the first stop token (transformers pads after it)."""
    for i, token_id in enumerate(ids):
        if token_id in stop_tokens:
            return ids[: i + 1]
    return ids


def transformers_greedy(hf_model, prompt_ids, max_new_tokens, stop_tokens):
    """transformers' greedy generate; the new ids, without the stop token (the scripts do not yield it)."""
    out = hf_model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_tokens,
                            pad_token_id=stop_tokens[0])
    new_ids = out[0, len(prompt_ids):].tolist()
    return [token_id for token_id in new_ids if token_id not in stop_tokens], new_ids


def meta_chat_prompt(tokenizer, messages):
    """Meta's Llama 3 prompt format, spelled out from the special tokens' names:
    <|begin_of_text|>, per message <|start_header_id|>ROLE<|end_header_id|> "\\n\\n" CONTENT <|eot_id|>,
    then <|start_header_id|>assistant<|end_header_id|> "\\n\\n" for the model to answer."""
    special = tokenizer.special_tokens

    def text(s):
        return tokenizer.encode(s, bos=False, eos=False)

    def header(role):
        return [special["<|start_header_id|>"], *text(role), special["<|end_header_id|>"], *text("\n\n")]

    ids = [special["<|begin_of_text|>"]]
    for role, content in messages:
        ids += header(role) + text(content) + [special["<|eot_id|>"]]
    return ids + header("assistant")


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_hf(models_dir):
    return transformers_llama(models_dir / "Tiny")


@pytest.fixture(scope="module")
def stop_prone_dir(tmp_path_factory, tiny_weights, tiny_hf, tokenizer):
    """A copy of the tiny checkpoint in which <|eot_id|> wins now and then; a random model almost never picks it.

    After the final RMSNorm, the hidden states share a common direction (their mean). <|eot_id|>'s output row
    becomes that direction, scaled so that on the plain model's greedy path <|eot_id|> would have been the top
    token at EOT_SHARE of the positions. Only that row changes: until <|eot_id|> is chosen, both models
    compute the same thing."""
    prompt_ids = run_inference.encode_prompt(tokenizer, PROMPT_TEXT, "", instruct=False)
    _, new_ids = transformers_greedy(tiny_hf, prompt_ids, NEW_TOKENS, tokenizer.stop_tokens)
    with torch.inference_mode():
        out = tiny_hf(torch.tensor([prompt_ids + new_ids]), output_hidden_states=True)
    predicting = slice(len(prompt_ids) - 1, None)  # the positions whose logits chose the new tokens
    hidden = out.hidden_states[-1][0, predicting]  # (positions, dim), after the final RMSNorm
    top_logits = out.logits[0, predicting].max(dim=-1).values  # (positions,)
    direction = hidden.mean(dim=0) / hidden.mean(dim=0).norm()
    along = hidden @ direction  # (positions,)
    # per position, the scale at which <|eot_id|> would tie the top logit (never, where along <= 0)
    needed = torch.where(along > 0, top_logits / along, torch.inf).sort().values
    i = int(EOT_SHARE * len(needed))
    scale = (needed[i - 1] + needed[i]) / 2  # between two positions' thresholds: no exact tie anywhere
    weights = dict(tiny_weights)
    output = weights["output.weight"].float()
    output[tokenizer.special_tokens["<|eot_id|>"]] = scale * direction
    weights["output.weight"] = output.to(torch.bfloat16)
    return write_checkpoint(tmp_path_factory.mktemp("stop_prone") / "Tiny-Stops", TINY, weights)


@pytest.fixture(scope="module")
def stop_prone_hf(stop_prone_dir):
    return transformers_llama(stop_prone_dir)


# ---------------------------------------------------------------------------------------------------------
# Logits
# ---------------------------------------------------------------------------------------------------------
def test_prompt_logits_match_transformers(script, distributed, models_dir, tiny_hf, tokenizer):
    ids = random_prompt(tokenizer, 96, seed=1)
    model = load(script, models_dir / "Tiny", len(ids))
    positions, ours = logits_by_position(model, ids, cuts=[])
    assert positions[-1] == len(ids) - 1
    assert max_diff(ours, transformers_logits(tiny_hf, ids)[positions]) < FP32_TOLERANCE


def test_logits_through_the_kv_cache_match_transformers(script, distributed, models_dir, tiny_hf, tokenizer):
    """The prompt in two chunks (the second at start_pos 40), then four single tokens, as decoding feeds them."""
    ids = random_prompt(tokenizer, 96, seed=2)
    model = load(script, models_dir / "Tiny", len(ids))
    positions, ours = logits_by_position(model, ids, cuts=[40, 92, 93, 94, 95])
    assert {39, 91, 92, 93, 94, 95} <= set(positions)
    assert max_diff(ours, transformers_logits(tiny_hf, ids)[positions]) < FP32_TOLERANCE


# ---------------------------------------------------------------------------------------------------------
# Greedy decoding
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stop_prone", [False, True], ids=["tiny", "stop-prone"])
def test_greedy_matches_transformers_generate(script, stop_prone, distributed, models_dir, tiny_hf,
                                              stop_prone_dir, stop_prone_hf, tokenizer):
    model_dir, hf_model = (stop_prone_dir, stop_prone_hf) if stop_prone else (models_dir / "Tiny", tiny_hf)
    prompt_ids = script.encode_prompt(tokenizer, PROMPT_TEXT, "", instruct=False)
    expected, hf_new_ids = transformers_greedy(hf_model, prompt_ids, NEW_TOKENS, tokenizer.stop_tokens)
    if stop_prone:  # the case is only worth its name if transformers did stop early on a stop token
        assert len(hf_new_ids) < NEW_TOKENS and hf_new_ids[-1] in tokenizer.stop_tokens
    model = load(script, model_dir, len(prompt_ids) + NEW_TOKENS)
    ours = list(script.generate(model, prompt_ids, NEW_TOKENS, tokenizer.stop_tokens))
    assert ours == expected


@pytest.mark.parametrize("speedups_on", [1, 0], ids=["speedups-on", "speedups-off"])
def test_script_output_matches_transformers(script, speedups_on, models_dir, tiny_hf, tokenizer):
    """The script run as a user runs it (Instruct chat format, float32), with its fast path and with
    llama-models as written: its stdout is transformers' answer."""
    prompt_ids = meta_chat_prompt(tokenizer, [("system", SYSTEM_TEXT), ("user", USER_TEXT)])
    expected_ids, _ = transformers_greedy(tiny_hf, prompt_ids, NEW_TOKENS, tokenizer.stop_tokens)
    result = run_script(script.__name__ + ".py", models_dir, "Tiny-Instruct", DTYPE="float32", SPEEDUPS=speedups_on,
                        INPUT_STRING=USER_TEXT, SYSTEM_PROMPT=SYSTEM_TEXT, MAX_NEW_TOKENS=NEW_TOKENS)
    assert result.returncode == 0, result.stderr
    assert result.stdout == tokenizer.decode(expected_ids)


# bfloat16 keeps 8 significant bits: at the tiny model's largest logits (about 5.5) one step is 0.03, and
# two implementations that round at different places differ by a few steps. Measured: 1.4-1.6% of the
# largest logit between the scripts and transformers, both in bfloat16, at every position of a 64-token
# prompt (and 1.4% between transformers in bfloat16 and in float32). The bound is twice that; a wrong
# position, a dropped norm or a broken kernel moves logits by their own size.
BF16_TOLERANCE = 0.03  # of the largest logit


@pytest.mark.parametrize("use_speedups", [True, False], ids=["speedups-on", "speedups-off"])
def test_bfloat16_logits_match_transformers_in_bfloat16(script, use_speedups, distributed, models_dir, tokenizer):
    """The default number format against an independent implementation in the same format, one token at a
    time through the cache (the decode path), at every position of a 64-token prompt."""
    ids = random_prompt(tokenizer, 64, seed=8)
    expected = transformers_logits(transformers_llama(models_dir / "Tiny", dtype=torch.bfloat16), ids)
    model = load(script, models_dir / "Tiny", len(ids), torch.bfloat16, use_speedups=use_speedups)
    positions, ours = logits_by_position(model, ids, cuts=list(range(1, len(ids))))
    assert positions == list(range(len(ids)))
    assert max_diff(ours, expected) < BF16_TOLERANCE * expected.abs().max().item()


# ---------------------------------------------------------------------------------------------------------
# The chat prompt
# ---------------------------------------------------------------------------------------------------------
def test_chat_prompt_is_meta_format(script, tokenizer):
    expected = meta_chat_prompt(tokenizer, [("system", SYSTEM_TEXT), ("user", USER_TEXT)])
    assert script.encode_prompt(tokenizer, USER_TEXT, SYSTEM_TEXT, instruct=True) == expected
    # The same format as Meta documents it, as text with the special tokens written in.
    documented = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + SYSTEM_TEXT + "<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\n" + USER_TEXT + "<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert expected == tokenizer.encode(documented, bos=False, eos=False, allowed_special="all")


def test_chat_prompt_without_system_prompt_has_only_the_user_message(script, tokenizer):
    expected = meta_chat_prompt(tokenizer, [("user", USER_TEXT)])
    assert script.encode_prompt(tokenizer, USER_TEXT, "", instruct=True) == expected


def test_base_prompt_is_begin_of_text_and_the_text(script, tokenizer):
    expected = [tokenizer.special_tokens["<|begin_of_text|>"]] + tokenizer.encode(PROMPT_TEXT, bos=False, eos=False)
    assert script.encode_prompt(tokenizer, PROMPT_TEXT, SYSTEM_TEXT, instruct=False) == expected


# ---------------------------------------------------------------------------------------------------------
# RoPE scale factor
# Llama 3.1+ slows RoPE's low frequencies (wavelengths over 2048 tokens) by a factor: 8 for Llama 3.1 and
# 3.3, 32 for Llama 3.2 1B and 3B. The wrong factor changes nothing at position 0 and more with distance.
# ---------------------------------------------------------------------------------------------------------
def transformers_rotations(params, factor, length):
    """transformers' RoPE cos / sin for positions 0 .. length - 1, the first head_dim / 2 columns (the rest repeat)."""
    config = llama_config(params, factor)
    rotary = LlamaRotaryEmbedding(config)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(length)[None])
    half = config.head_dim // 2
    return cos[0, :, :half], sin[0, :, :half]


@pytest.mark.parametrize("model_name", PUBLISHED_ROPE_FACTORS)
def test_rope_table_uses_the_published_factor(script, model_name):
    """The rotation table the scripts install (rope_rotations with rope_scale_factor) is transformers' with the
    published factor, at every position up to 16384, and clearly not the one with the other factor."""
    params, published = PUBLISHED_ROPE_FACTORS[model_name]
    args = ModelArgs(**params, max_seq_len=16384)
    ours = script.rope_rotations(args, script.rope_scale_factor(args))  # (positions, head_dim // 2), complex
    cos, sin = transformers_rotations(params, published, args.max_seq_len)
    assert max(max_diff(ours.real, cos), max_diff(ours.imag, sin)) < 1e-6  # measured: 1 float32 ulp
    other_cos, _ = transformers_rotations(params, OTHER_FACTOR[published], args.max_seq_len)
    assert max_diff(ours.real, other_cos) > 0.5


def test_llama_3_1_style_model_matches_factor_8_and_not_32(script, distributed, models_dir, tokenizer):
    """The tiny model (not a 3.2 1B / 3B shape) end to end, at positions up to 1023: half the prompt at once,
    the rest but four tokens as a second chunk, then four single tokens."""
    ids = random_prompt(tokenizer, 1024, seed=3)
    model = load(script, models_dir / "Tiny", len(ids))
    positions, ours = logits_by_position(model, ids, cuts=[512, 1020, 1021, 1022, 1023])
    right = max_diff(ours, transformers_logits(transformers_llama(models_dir / "Tiny", rope_factor=8), ids)[positions])
    wrong = max_diff(ours, transformers_logits(transformers_llama(models_dir / "Tiny", rope_factor=32), ids)[positions])
    assert right < FP32_TOLERANCE
    assert wrong > 100 * FP32_TOLERANCE


LLAMA_1B_CUTS = [64, 128, 192, 255]  # prompt chunks of the 1B test: logits at positions 63, 127, 191, 254 and 255


@pytest.fixture(scope="session")  # not per module: on a pytest-xdist worker, other files' tests may come between
def llama_1b_transformers(llama_1b_dir, tokenizer):
    """A 256-token prompt, and transformers' float32 logits for it with RoPE factor 32 (131 MB)."""
    ids = random_prompt(tokenizer, 256, seed=4)
    hf_model = transformers_llama(llama_1b_dir / "Llama3.2-1B", rope_factor=32)
    logits = transformers_logits(hf_model, ids)
    del hf_model  # 5 GB
    gc.collect()
    return ids, logits


def test_llama_3_2_1b_matches_factor_32(script, distributed, llama_1b_dir, llama_1b_transformers):
    """The exact Llama 3.2 1B shapes, loaded by each script as it runs (the RoPE table it installs, its fast
    path), fed a 256-token prompt in chunks: its logits are transformers' with factor 32. (llama-models'
    own factor 8 fails it: the mutants rope-factor-8-* in tests/mutants.py.)

    float32 rounding grows with the logits' size, so the tolerance is 1e-6 of the largest logit if that is larger."""
    ids, expected = llama_1b_transformers
    model = load(script, llama_1b_dir / "Llama3.2-1B", len(ids))
    positions, ours = logits_by_position(model, ids, cuts=LLAMA_1B_CUTS)
    assert positions == [63, 127, 191, 254, 255]
    del model  # 5 GB in float32
    gc.collect()
    assert max_diff(ours, expected[positions]) < max(FP32_TOLERANCE, 1e-6 * ours.abs().max().item())


# ---------------------------------------------------------------------------------------------------------
# Beam search
# transformers' generate(num_beams=k, do_sample=False) with its defaults (early_stopping=False) is the
# reference: the k returned sequences, their scores, and the number of steps it ran before stopping.
# ---------------------------------------------------------------------------------------------------------
BEAM_NEW_TOKENS = 24


def compare_beam_search(model_dir, hf_model, tokenizer, beam_width, length_penalty):
    """Run both; assert the same k hypotheses (best first), scores and step count. Returns ours and the steps."""
    stop_tokens = tokenizer.stop_tokens
    prompt_ids = run_inference.encode_prompt(tokenizer, PROMPT_TEXT, "", instruct=False)
    model = load(run_inference, model_dir, len(prompt_ids) + BEAM_NEW_TOKENS, batch=beam_width)
    steps = []
    model.register_forward_pre_hook(lambda *_: steps.append(1))  # one forward call per step
    ours = run_inference.beam_search(model, prompt_ids, BEAM_NEW_TOKENS, stop_tokens, beam_width, length_penalty)

    out = hf_model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                            max_new_tokens=BEAM_NEW_TOKENS, do_sample=False, num_beams=beam_width,
                            num_return_sequences=beam_width, length_penalty=length_penalty, eos_token_id=stop_tokens,
                            pad_token_id=stop_tokens[0], output_scores=True, return_dict_in_generate=True)
    expected = [up_to_stop(ids, stop_tokens) for ids in out.sequences[:, len(prompt_ids):].tolist()]
    assert [token_ids for _, token_ids in ours] == expected
    assert max(abs(a - b) for (a, _), b in zip(ours, out.sequences_scores.tolist())) < FP32_TOLERANCE
    assert len(steps) == len(out.scores)
    return ours, len(steps)


@pytest.mark.parametrize("speedups_on", [1, 0], ids=["speedups-on", "speedups-off"])
def test_beam_search_run_prints_transformers_best_beams(speedups_on, models_dir, tiny_hf, tokenizer):
    """run_inference.py with BEAM_WIDTH=3 as a user runs it, fast path on and off: the 2 best beams it prints
    are transformers' generate(num_beams=3), best first."""
    prompt_ids = run_inference.encode_prompt(tokenizer, PROMPT_TEXT, "", instruct=False)
    out = tiny_hf.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                           max_new_tokens=16, do_sample=False, num_beams=3, num_return_sequences=2,
                           eos_token_id=tokenizer.stop_tokens, pad_token_id=tokenizer.stop_tokens[0])
    expected = [up_to_stop(ids, tokenizer.stop_tokens) for ids in out[:, len(prompt_ids):].tolist()]
    result = run_script("run_inference.py", models_dir, "Tiny", DTYPE="float32", MAX_NEW_TOKENS=16, BEAM_WIDTH=3,
                        NUM_RETURN_SEQUENCES=2, SPEEDUPS=speedups_on, INPUT_STRING=PROMPT_TEXT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "\n\n".join(tokenizer.decode([t for t in ids if t not in tokenizer.stop_tokens])
                                         for ids in expected)


@pytest.mark.parametrize("beam_width", [2, 4])
def test_beam_search_matches_transformers(beam_width, distributed, models_dir, tiny_hf, tokenizer):
    """The plain tiny model: nearly flat predictions, where no stop token gets chosen and all beams run to the end."""
    compare_beam_search(models_dir / "Tiny", tiny_hf, tokenizer, beam_width, length_penalty=1.0)


def test_beam_search_with_stop_tokens_matches_transformers(distributed, stop_prone_dir, stop_prone_hf, tokenizer):
    """The stop-prone model: hypotheses finish on <|eot_id|>, and the search can end before its token limit."""
    stopped_early = []
    for beam_width in (2, 4):
        for length_penalty in (0.0, 1.0, 2.0):  # raw sum of log-probs, per-token average, favouring long ones
            hypotheses, steps = compare_beam_search(stop_prone_dir, stop_prone_hf, tokenizer, beam_width,
                                                    length_penalty)
            best_ids = hypotheses[0][1]
            stopped_early.append(steps < BEAM_NEW_TOKENS and best_ids[-1] in tokenizer.stop_tokens)
    assert any(stopped_early), "no case exercised finishing on a stop token before the limit"
