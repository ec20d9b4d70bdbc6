"""The two scripts, run as a user runs them: settings in environment variables, text on stdout."""

import pytest
import torch

import minimal_run_inference
from conftest import CPU, SCRIPTS, greedy_without_cache, load, run_script
from random_checkpoint import TINY, write_checkpoint

NEW_TOKENS = 24


def reference_ids(models_dir, model_name, tokenizer, text, max_new_tokens):
    """What greedy decoding must produce: recomputed from scratch at every step, no KV cache, float32."""
    prompt_ids = minimal_run_inference.encode_prompt(tokenizer, text, "", instruct="Instruct" in model_name)
    model = load(minimal_run_inference, models_dir / model_name, len(prompt_ids) + max_new_tokens, use_speedups=False)
    return greedy_without_cache(model, prompt_ids, max_new_tokens, tokenizer.stop_tokens)


@pytest.mark.parametrize("model_name", ["Tiny", "Tiny-Instruct"])
@pytest.mark.parametrize("script_name", SCRIPTS)
def test_stdout_is_exactly_the_cache_free_greedy_text(script_name, model_name, models_dir, tokenizer, distributed):
    text = "The capital of France is"
    result = run_script(script_name, models_dir, model_name, INPUT_STRING=text, DTYPE="float32",
                        MAX_NEW_TOKENS=NEW_TOKENS)
    assert result.returncode == 0, result.stderr
    expected = reference_ids(models_dir, model_name, tokenizer, text, NEW_TOKENS)
    assert len(expected) == NEW_TOKENS  # no stop token on the way: every step was compared
    assert result.stdout == tokenizer.decode(expected)
    assert "Traceback" not in result.stderr


def test_bfloat16_default_prints_what_the_same_functions_compute(script, models_dir, tokenizer, distributed):
    """In bfloat16 the two scripts may round differently (run_inference.py computes attention in float32),
    so each is compared with its own functions run in this process."""
    prompt_ids = script.encode_prompt(tokenizer, "The capital of France is", "", instruct=False)
    model = load(script, models_dir / "Tiny", len(prompt_ids) + 16, torch.bfloat16)
    expected = list(script.generate(model, prompt_ids, 16, tokenizer.stop_tokens, CPU))
    result = run_script(f"{script.__name__}.py", models_dir, "Tiny", MAX_NEW_TOKENS=16)
    assert result.returncode == 0, result.stderr
    assert result.stdout == tokenizer.decode(expected) != ""
    assert "torch.bfloat16" in result.stderr


def test_stop_token_ends_generation(tmp_path, models_dir, tiny_weights, tokenizer, distributed):
    """Make <|eot_id|> the model's favourite at some step (its output row becomes 3x the row of a token
    greedy decoding picks); generation must end there, with the stop token not printed."""
    eot = tokenizer.special_tokens["<|eot_id|>"]
    free_run = reference_ids(models_dir, "Tiny", tokenizer, "Once upon a time", NEW_TOKENS)
    weights = dict(tiny_weights)
    weights["output.weight"] = weights["output.weight"].clone()
    weights["output.weight"][eot] = 3 * weights["output.weight"][free_run[5]]
    write_checkpoint(tmp_path / "Stopping", TINY, weights)

    expected = reference_ids(tmp_path, "Stopping", tokenizer, "Once upon a time", NEW_TOKENS)
    assert 0 < len(expected) < NEW_TOKENS
    for script_name in SCRIPTS:
        result = run_script(script_name, tmp_path, "Stopping", INPUT_STRING="Once upon a time",
                            DTYPE="float32", MAX_NEW_TOKENS=NEW_TOKENS)
        assert result.returncode == 0, result.stderr
        assert result.stdout == tokenizer.decode(expected)
        assert f"+ {len(expected)} new tokens" in result.stderr


def test_prompt_formats(script, tokenizer):
    special = tokenizer.special_tokens

    def text(s):
        return tokenizer.encode(s, bos=False, eos=False)

    base = script.encode_prompt(tokenizer, "Hello there", "", instruct=False)
    assert base == [special["<|begin_of_text|>"]] + text("Hello there")
    instruct = script.encode_prompt(tokenizer, "Hello there", "", instruct=True)
    assert instruct == (
        [special["<|begin_of_text|>"], special["<|start_header_id|>"]] + text("user") + [special["<|end_header_id|>"]]
        + text("\n\n") + text("Hello there") + [special["<|eot_id|>"], special["<|start_header_id|>"]]
        + text("assistant") + [special["<|end_header_id|>"]] + text("\n\n")
    )


def test_stream_prints_characters_split_across_tokens_whole(script, tokenizer, capsys):
    text = "naïve café, 世界, 🦙🦙 and e\u0301"
    token_ids = tokenizer.encode(text, bos=False, eos=False)
    pieces = [tokenizer.model.decode_single_token_bytes(t) for t in token_ids]
    assert any(_not_utf8(piece) for piece in pieces)  # the case under test really occurs
    assert list(script.stream(iter(token_ids), tokenizer)) == token_ids
    assert capsys.readouterr().out == text


def _not_utf8(data):
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_rope_table_matches_llama_models_for_factor_8():
    """Our table with factor 8 is llama-models' own (which hard-codes 8); the 3.2 small shapes get 32."""
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import precompute_freqs_cis

    args = ModelArgs(**TINY, max_seq_len=300)
    ours = minimal_run_inference.rope_rotations(args, scale_factor=8)
    theirs = precompute_freqs_cis(args.dim // args.n_heads, 300, args.rope_theta, use_scaled=True)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert not torch.allclose(minimal_run_inference.rope_rotations(args, scale_factor=32), theirs, atol=1e-3)
    assert minimal_run_inference.rope_scale_factor(ModelArgs(dim=2048, n_layers=16, n_heads=32)) == 32
    assert minimal_run_inference.rope_scale_factor(ModelArgs(dim=3072, n_layers=28, n_heads=24)) == 32
    assert minimal_run_inference.rope_scale_factor(ModelArgs(dim=4096, n_layers=32, n_heads=32)) == 8


@pytest.mark.parametrize("script_name", SCRIPTS)
def test_missing_checkpoint_is_one_clear_line(script_name, models_dir):
    result = run_script(script_name, models_dir, "Llama3.2-3B-Instruct")
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert str(models_dir / "Llama3.2-3B-Instruct") in lines[0]
    assert "Tiny, Tiny-Instruct" in lines[0] or "Tiny-Instruct, Tiny" in lines[0]
    assert "llama-model download --source meta --model-id Llama3.2-3B-Instruct" in lines[0]


@pytest.mark.parametrize("setting, value, message", [
    ("DEVICE", "tpu", "DEVICE='tpu' is not available here; choose one of: auto,"),
    ("DEVICE", "cuda", "DEVICE='cuda:0' is not available here"),
    ("DTYPE", "float8", "DTYPE='float8' is not supported"),
    ("MAX_NEW_TOKENS", "ten", "MAX_NEW_TOKENS='ten' is not a valid int"),
    ("MAX_NEW_TOKENS", "0", "MAX_NEW_TOKENS=0 is out of range: it must be at least 1"),
    ("PREFILL_CHUNK", "0", "PREFILL_CHUNK=0 is out of range: it must be at least 1"),
])
@pytest.mark.parametrize("script_name", SCRIPTS)
def test_bad_settings_are_one_clear_line(script_name, setting, value, message, models_dir):
    if setting == "DEVICE" and value == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    result = run_script(script_name, models_dir, "Tiny", **{setting: value})
    assert result.returncode != 0
    assert result.stdout == ""
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
