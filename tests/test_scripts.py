"""The two scripts, run as a user runs them: settings in environment variables, text on stdout."""

import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time

import pytest
import torch

import minimal_run_inference
import run_inference
from conftest import REPO, SCRIPTS, clean_environment, greedy_without_cache, load, read_until, run_script
from standin.random_checkpoint import TINY, write_checkpoint

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
    expected = list(script.generate(model, prompt_ids, 16, tokenizer.stop_tokens))
    result = run_script(f"{script.__name__}.py", models_dir, "Tiny", MAX_NEW_TOKENS=16)
    assert result.returncode == 0, result.stderr
    assert result.stdout == tokenizer.decode(expected) != ""
    assert "torch.bfloat16" in result.stderr


@pytest.mark.parametrize("stop", ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"])
def test_each_stop_token_ends_generation(stop, tmp_path, models_dir, tiny_weights, tokenizer, distributed):
    """Make a stop token the model's favourite at some step (its output row becomes 3x the row of a token
    greedy decoding picks); generation must end there, the stop token not printed: through both scripts as
    a user runs them for <|eot_id|>, through their generate for the other two."""
    stop_id = tokenizer.special_tokens[stop]
    assert stop_id in tokenizer.stop_tokens
    free_run = reference_ids(models_dir, "Tiny", tokenizer, "Once upon a time", NEW_TOKENS)
    weights = dict(tiny_weights)
    weights["output.weight"] = weights["output.weight"].clone()
    weights["output.weight"][stop_id] = 3 * weights["output.weight"][free_run[5]]
    write_checkpoint(tmp_path / "Stopping", TINY, weights)

    expected = reference_ids(tmp_path, "Stopping", tokenizer, "Once upon a time", NEW_TOKENS)
    assert 0 < len(expected) < NEW_TOKENS
    prompt_ids = tokenizer.encode("Once upon a time", bos=True, eos=False)
    for script in (minimal_run_inference, run_inference):
        if stop == "<|eot_id|>":
            result = run_script(f"{script.__name__}.py", tmp_path, "Stopping", INPUT_STRING="Once upon a time",
                                DTYPE="float32", MAX_NEW_TOKENS=NEW_TOKENS)
            assert result.returncode == 0, result.stderr
            assert result.stdout == tokenizer.decode(expected)
            assert f"+ {len(expected)} new tokens" in result.stderr
        else:
            model = load(script, tmp_path / "Stopping", len(prompt_ids) + NEW_TOKENS)
            assert list(script.generate(model, prompt_ids, NEW_TOKENS, tokenizer.stop_tokens)) == expected


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


def own_greedy_text(script, model_dir, tokenizer, text, instruct, max_new_tokens):
    """What the script's own functions print for this prompt, in this process (bfloat16, as a run)."""
    prompt_ids = script.encode_prompt(tokenizer, text, "", instruct)
    model = load(script, model_dir, len(prompt_ids) + max_new_tokens, torch.bfloat16)
    return tokenizer.decode(list(script.generate(model, prompt_ids, max_new_tokens, tokenizer.stop_tokens)))


def test_input_file_gives_the_same_text_as_the_same_input_string(script, models_dir, tmp_path, tokenizer, distributed):
    text = "Three rivers of Europe:\n\n1. The Danube\n2. The Rhine\n3."
    (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
    result = run_script(f"{script.__name__}.py", models_dir, "Tiny-Instruct", INPUT_STRING="ignored",
                        INPUT_FILE=tmp_path / "prompt.txt", MAX_NEW_TOKENS=12, SHOW_TOKENS=0)
    assert result.returncode == 0, result.stderr
    assert result.stdout == own_greedy_text(script, models_dir / "Tiny-Instruct", tokenizer, text, True, 12) != ""


def test_a_model_folder_in_the_hubs_layout_runs(script, models_dir, tmp_path, tokenizer, distributed):
    """The Hugging Face Hub's Llama repositories keep Meta's files in original/ (hf download
    ... --include "original/*" --local-dir FOLDER)."""
    shutil.copytree(models_dir / "Tiny-Instruct", tmp_path / "Tiny-Instruct" / "original")
    result = run_script(f"{script.__name__}.py", tmp_path, "Tiny-Instruct", MAX_NEW_TOKENS=12, SHOW_TOKENS=0)
    assert result.returncode == 0, result.stderr
    expected = own_greedy_text(script, models_dir / "Tiny-Instruct", tokenizer, script.INPUT_STRING, True, 12)
    assert result.stdout == expected != ""


def test_output_is_utf8_whatever_the_locale(models_dir, tokenizer, distributed):
    """Redirected output in a code page that cannot encode the text (Windows' cp1252 here) is written in UTF-8."""
    expected = tokenizer.decode(reference_ids(models_dir, "Tiny", tokenizer, "The capital of France is", NEW_TOKENS))
    assert any(ord(character) > 255 for character in expected)  # the case under test really occurs
    result = run_script("minimal_run_inference.py", models_dir, "Tiny", DTYPE="float32", MAX_NEW_TOKENS=NEW_TOKENS,
                        PYTHONIOENCODING="cp1252")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected


@pytest.mark.parametrize("script_name", SCRIPTS)
def test_a_closed_pipe_ends_generation_quietly(script_name, models_dir):
    """`python SCRIPT | head -c 20`: the reader goes away; the script stops with status 0 and no error."""
    env = clean_environment(LLAMA_MODELS_DIR=models_dir, MODEL_NAME="Tiny", DEVICE="cpu", MAX_NEW_TOKENS=100000,
                            SHOW_TOKENS=0)
    process = subprocess.Popen([sys.executable, str(REPO / script_name)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        read_until(process.stdout, lambda data: len(data) >= 20)
        process.stdout.close()
        stderr = process.communicate(timeout=120)[1].decode()
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "error" not in stderr.lower() and "Traceback" not in stderr and "Exception ignored" not in stderr


def test_converting_weights_shows_progress_on_a_terminal_only(models_dir):
    """With stderr a terminal, QUANTIZE=int8's conversion shows one updating line (carriage returns), erased
    at the end; with stderr a pipe, nothing of it."""
    import os
    import pty
    controller, terminal = pty.openpty()
    env = clean_environment(LLAMA_MODELS_DIR=models_dir, MODEL_NAME="Tiny", DEVICE="cpu", QUANTIZE="int8",
                            MAX_NEW_TOKENS=4)
    process = subprocess.Popen([sys.executable, str(REPO / "minimal_run_inference.py")], env=env,
                               stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    try:
        shown = read_terminal(controller, process)
    finally:
        process.kill()
        os.close(controller)
    assert process.returncode == 0, shown.decode(errors="replace")
    layers = 4 * TINY["n_layers"] + 1  # wqkv, wo, w13 and w2 per block, and the output layer
    assert f"\rpreparing weights 1/{layers}".encode() in shown
    assert f"\rpreparing weights {layers - 1}/{layers}".encode() in shown
    piped = run_script("minimal_run_inference.py", models_dir, "Tiny", QUANTIZE="int8", MAX_NEW_TOKENS=4)
    assert piped.returncode == 0 and "preparing weights" not in piped.stderr


def read_terminal(controller, process, timeout=120):
    """All a child writes to a pseudo-terminal until it ends (reading the controller side)."""
    shown = b""
    deadline = time.monotonic() + timeout
    while select.select([controller], [], [], max(0, deadline - time.monotonic()))[0]:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed: the child has ended
            break
        if not chunk:
            break
        shown += chunk
    process.wait(timeout=timeout)
    return shown


def test_on_one_terminal_the_token_lines_read_cleanly_and_the_text_follows_once(models_dir, tokenizer, distributed):
    """SHOW_TOKENS=1 (the default) with stdout and stderr on one terminal, as in an interactive shell: no
    streamed text in front of the token lines (the screen read `' Paris'    1      30 '.' ...`); the
    whole text once after them, ending with a newline, before the speed line."""
    expected_ids = reference_ids(models_dir, "Tiny", tokenizer, "The capital of France is", NEW_TOKENS)
    controller, terminal = pty.openpty()
    env = clean_environment(LLAMA_MODELS_DIR=models_dir, MODEL_NAME="Tiny", DEVICE="cpu", DTYPE="float32",
                            MAX_NEW_TOKENS=NEW_TOKENS, LOOK_INSIDE=0)
    process = subprocess.Popen([sys.executable, str(REPO / "run_inference.py")], env=env, stdout=terminal,
                               stderr=terminal)
    os.close(terminal)
    try:
        screen = read_terminal(controller, process).decode().replace("\r\n", "\n")  # the terminal's line ends
    finally:
        process.kill()
        os.close(controller)
    assert process.returncode == 0, screen
    lines = screen.split("\n")
    token_lines = [i for i, line in enumerate(lines) if re.match(r" *\d+ +\d+ ['\"]", line)]
    assert [int(lines[i].split()[1]) for i in token_lines] == expected_ids  # whole lines, from their start
    text = tokenizer.decode(expected_ids)
    after_table = "\n".join(lines[token_lines[-1] + 1:])
    assert after_table.startswith(f"{text}\n\n{len(tokenizer.encode('The capital of France is', bos=True, eos=False))}"
                                  " prompt + ")  # the text, its newline, then the speed line (which opens with one)
    assert screen.count(text) == 1


def test_one_terminal_means_the_same_terminal(monkeypatch):
    """report.one_terminal: stdout and stderr the same pseudo-terminal, not two terminals, not a pipe."""
    from support import report
    first, second = pty.openpty(), pty.openpty()
    read_end, write_end = os.pipe()
    cases = {(first[1], first[1]): True, (first[1], second[1]): False, (write_end, first[1]): False}
    try:
        for (out, err), same in cases.items():
            monkeypatch.setattr(sys, "stdout", open(out, "w", closefd=False))
            monkeypatch.setattr(sys, "stderr", open(err, "w", closefd=False))
            assert report.one_terminal() == same, (out, err)
    finally:
        for descriptor in (*first, *second, read_end, write_end):
            os.close(descriptor)
