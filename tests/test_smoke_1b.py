"""The smoke run on Llama 3.2 1B: the real checkpoint when one is present, and always a random-weight one
with its exact shapes, so the full-size path (2.5 GB, tied embeddings, RoPE factor 32) loads and decodes."""

import os
from pathlib import Path

import pytest
import torch

import minimal_run_inference
from conftest import SCRIPTS, load, run_script
from support.memory import GIB

REAL_DIR = Path(os.environ.get("LLAMA_MODELS_DIR", minimal_run_inference.LLAMA_MODELS_DIR)).expanduser()


@pytest.mark.parametrize("script_name", SCRIPTS)
@pytest.mark.parametrize("model_name, prompt", [
    ("Llama3.2-1B", "The capital of France is"),
    ("Llama3.2-1B-Instruct", "What is the capital of France? Answer in one word."),
])
def test_real_llama_3_2_1b_knows_the_capital_of_france(script_name, model_name, prompt):
    if not (REAL_DIR / model_name / "consolidated.00.pth").exists():
        pytest.skip(f"no real {model_name} checkpoint in {REAL_DIR} (set LLAMA_MODELS_DIR, see README)")
    result = run_script(script_name, REAL_DIR, model_name, INPUT_STRING=prompt, MAX_NEW_TOKENS=8, SHOW_TOKENS=0)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_random_1b_shaped_checkpoint_runs_in_both_scripts(script, llama_1b_dir, tokenizer, distributed):
    """Each script's stdout is what its own functions compute in this process (bfloat16, as the run)."""
    prompt_ids = script.encode_prompt(tokenizer, "The capital of France is", "", instruct=False)
    model = load(script, llama_1b_dir / "Llama3.2-1B", len(prompt_ids) + 8, torch.bfloat16)
    assert model.output.layer.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()  # tied: stored once
    expected = list(script.generate(model, prompt_ids, 8, tokenizer.stop_tokens))
    del model

    result = run_script(f"{script.__name__}.py", llama_1b_dir, "Llama3.2-1B", MAX_NEW_TOKENS=8)
    assert result.returncode == 0, result.stderr
    assert result.stdout == tokenizer.decode(expected)
    peak_gib = float(result.stderr.split("peak memory ")[1].split()[0])
    checkpoint_gib = (llama_1b_dir / "Llama3.2-1B" / "consolidated.00.pth").stat().st_size / GIB
    assert peak_gib < checkpoint_gib + 0.6  # the weights are mapped once, never copied
    if script.__name__ == "run_inference":
        assert "RoPE scale factor 32" in result.stderr
