"""Bad input, faults and limits: one clear line on stderr, a non-zero status, no traceback, nothing written."""

import json
import os
import shutil
import signal

import pytest
import torch

import minimal_run_inference
from conftest import SCRIPTS, clean_environment, load, read_until, run_script, start_script
from standin.random_checkpoint import TINY, write_checkpoint
from support import checkpoint
from support.memory import GIB


@pytest.fixture(params=SCRIPTS)
def script_name(request):
    return request.param


def fails_with(result, *fragments):
    """The script stopped with one line on stderr containing every fragment, and printed no text."""
    assert result.returncode not in (0, None)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    error = [line for line in lines if line.startswith("error: ")]
    assert len(error) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error[0]


@pytest.fixture
def broken(tmp_path, models_dir):
    """A copy of the tiny checkpoint as models_dir/Broken, to damage in a test."""
    shutil.copytree(models_dir / "Tiny", tmp_path / "Broken")
    return tmp_path / "Broken"


def test_missing_models_dir(script_name, tmp_path):
    fails_with(run_script(script_name, tmp_path / "nowhere", "Llama3.2-1B"),
               str(tmp_path / "nowhere" / "Llama3.2-1B"), "no checkpoints in",
               "llama-model download --source meta --model-id Llama3.2-1B")


def test_unknown_model_lists_the_closest_first(script_name, models_dir):
    result = run_script(script_name, models_dir, "Tiny-Instrct")
    fails_with(result, str(models_dir / "Tiny-Instrct"), "checkpoints in", "--model-id Tiny-Instrct")
    assert "Tiny-Instruct, Tiny" in result.stderr


@pytest.mark.parametrize("missing", ["params.json", "tokenizer.model", "consolidated.00.pth"])
def test_incomplete_folder_names_the_missing_file(script_name, broken, missing):
    (broken / missing).unlink()
    fails_with(run_script(script_name, broken.parent, "Broken"), missing, "llama-model download")


@pytest.mark.parametrize("damage", ["cut in half", "random bytes"])
def test_damaged_weights(script_name, broken, damage):
    path = broken / "consolidated.00.pth"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "cut in half" else os.urandom(len(data)))
    fails_with(run_script(script_name, broken.parent, "Broken"), "damaged", "re-download",
               "llama-model verify-download --model-id Broken")


class Planted:
    """Unpickled, it would create the file at `path`: the harmless stand-in for code a pickle can run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_weights_file_that_would_run_code_is_refused_in_our_words(script_name, broken, tmp_path):
    """torch.load reads only tensors: a pickle that would call a function is refused. Its message advises
    loading the file with that check switched off; the user sees our line instead, which never does."""
    marker = tmp_path / "the pickle ran"
    torch.save({"tok_embeddings.weight": torch.zeros(2), "planted": Planted(marker)}, broken / "consolidated.00.pth")
    result = run_script(script_name, broken.parent, "Broken")
    fails_with(result, "holds code or objects that are not plain tensors, so it was not loaded",
               "download it again from Meta or the Hugging Face Hub")
    assert not marker.exists()  # nothing of the pickle ran
    output = (result.stdout + result.stderr).lower()
    assert not any(word in output for word in ("weights_only", "unsafe", "trust"))


@pytest.mark.parametrize("model_name, repository", [
    ("Llama3.2-1B-Instruct", "meta-llama/Llama-3.2-1B-Instruct"),
    ("Llama3.1-8B", "meta-llama/Llama-3.1-8B"),
    ("Llama3.3-70B-Instruct", "meta-llama/Llama-3.3-70B-Instruct"),
    ("Llama-3.2-3B", "meta-llama/Llama-3.2-3B"),  # a folder named as the Hub names it
    ("Llama3-8B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct"),  # Llama 3's repositories have another name
    ("Tiny", None),
])
def test_the_hub_repository_of_a_model_name(model_name, repository):
    assert checkpoint.hub_repository(model_name) == repository


def test_a_missing_llama_names_both_downloads(script_name, tmp_path):
    fails_with(run_script(script_name, tmp_path, "Llama3.2-1B-Instruct"),
               "llama-model download --source meta --model-id Llama3.2-1B-Instruct",
               "hf download meta-llama/Llama-3.2-1B-Instruct --include \"original/*\"")


@pytest.mark.parametrize("params_text, fragments", [
    ("{not json", ["params.json is not valid JSON"]),
    (json.dumps({k: v for k, v in TINY.items() if k != "dim"}), ["params.json", "'dim'"]),
    (json.dumps({k: v for k, v in TINY.items() if k != "n_layers"}), ["params.json", "'n_layers'"]),
    (json.dumps({k: v for k, v in TINY.items() if k != "n_heads"}), ["params.json", "'n_heads'"]),
    (json.dumps({k: v for k, v in TINY.items() if k != "vocab_size"}), ["params.json", "'vocab_size'"]),
    (json.dumps({**TINY, "vocab_size": -1}), ["looks like Llama 2", "text-only Llama 3.x"]),
    (json.dumps({**TINY, "vocab_size": 202048, "moe_args": {}}), ["looks like Llama 4", "text-only Llama 3.x"]),
    (json.dumps({**TINY, "vision_chunk_size": 560}), ["looks like a vision model", "text-only Llama 3.x"]),
])
def test_bad_params_json(script_name, broken, params_text, fragments):
    (broken / "params.json").write_text(params_text)
    fails_with(run_script(script_name, broken.parent, "Broken"), *fragments)


@pytest.mark.parametrize("change, fragments", [
    ("wrong shape", ["layers.1.attention.wq.weight in", "has shape (64, 32), but params.json implies (64, 64)"]),
    ("missing", ["lack layers.1.attention.wq.weight", "(64, 64)"]),
    ("extra", ["unexpected tensor rope.freqs"]),
])
def test_weights_that_do_not_match_params(script_name, tmp_path, tiny_weights, change, fragments):
    weights = dict(tiny_weights)
    if change == "wrong shape":
        weights["layers.1.attention.wq.weight"] = weights["layers.1.attention.wq.weight"][:, :32].clone()
    elif change == "missing":
        del weights["layers.1.attention.wq.weight"]
    else:
        weights["rope.freqs"] = torch.zeros(8)
    write_checkpoint(tmp_path / "Mismatch", TINY, weights)
    fails_with(run_script(script_name, tmp_path, "Mismatch"), *fragments)


def test_tokenizer_that_does_not_fit_vocab_size(script_name, broken):
    with open(broken / "tokenizer.model", "a") as tokenizer_file:
        tokenizer_file.write("bm90IGEgcmVhbCB0b2tlbg== 128000\n")  # one token more than Llama 3 has
    fails_with(run_script(script_name, broken.parent, "Broken"), "128257 tokens", "vocab_size is 128256")


def test_tokenizer_that_is_not_a_tokenizer(script_name, broken):
    (broken / "tokenizer.model").write_bytes(os.urandom(1000))
    fails_with(run_script(script_name, broken.parent, "Broken"), "is not a Llama 3 tokenizer file")


def test_prompt_longer_than_the_context(script_name, tmp_path, tiny_weights, models_dir, tokenizer):
    write_checkpoint(tmp_path / "Llama3-Tiny", {**TINY, "use_scaled_rope": False}, tiny_weights)  # 8,192 tokens
    text = "a " * 9000
    prompt_length = len(tokenizer.encode(text, bos=True, eos=False))
    result = run_script(script_name, tmp_path, "Llama3-Tiny", INPUT_STRING=text)
    fails_with(result, f"the prompt ({prompt_length} tokens) + MAX_NEW_TOKENS (64) exceeds the model's context of 8192")
    fails_with(run_script(script_name, models_dir, "Tiny", MAX_NEW_TOKENS=200000),
               "MAX_NEW_TOKENS (200000)", "context of 131072 tokens")


def test_unavailable_device(script_name, models_dir):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has mps")
    fails_with(run_script(script_name, models_dir, "Tiny", DEVICE="mps"), "DEVICE='mps' is not available here", "cpu")


def test_nan_in_the_weights_stops_instead_of_printing_garbage(script_name, tmp_path, tiny_weights):
    weights = dict(tiny_weights)
    weights["layers.0.feed_forward.w2.weight"] = weights["layers.0.feed_forward.w2.weight"].clone()
    weights["layers.0.feed_forward.w2.weight"][3, 5] = float("nan")
    write_checkpoint(tmp_path / "Poisoned", TINY, weights)
    fails_with(run_script(script_name, tmp_path, "Poisoned"), "NaN or infinite", "bfloat16 on cpu")


def test_a_kv_cache_larger_than_memory_is_refused_before_loading(models_dir):
    """30,000 beams of 100,000 tokens: the tiny model's weights fit, its KV cache (about 700 GiB) does not."""
    fails_with(run_script("run_inference.py", models_dir, "Tiny", BEAM_WIDTH=30000, MAX_NEW_TOKENS=100000),
               "Tiny needs", "GiB for its weights in bfloat16 and its KV cache", "or a shorter context")


def test_checkpoint_larger_than_memory_is_refused_before_loading(script_name, broken):
    with open(broken / "consolidated.00.pth", "r+b") as weights_file:
        weights_file.truncate(1024 * GIB)  # a sparse 1 TiB file: takes no disk space
    fails_with(run_script(script_name, broken.parent, "Broken"), "Broken needs 1024.0 GiB", "is available",
               "try a smaller model")


@pytest.mark.parametrize("text", [
    "",
    "🦙 Llamas: 駱馬 (ラマ), e\u0301, \u202eright-to-left\u202c and \x07\x1b[31m control characters",
    "a" * 100_000,
])
def test_unusual_prompts_work_and_print_exactly_the_decoded_ids(script, models_dir, tokenizer, distributed, text):
    """The ids come from the same script's own functions in this process (bfloat16, as the run)."""
    prompt_ids = script.encode_prompt(tokenizer, text, "", instruct=False)
    model = load(script, models_dir / "Tiny", len(prompt_ids) + 8, torch.bfloat16)
    expected = list(script.generate(model, prompt_ids, 8, tokenizer.stop_tokens))
    result = run_script(f"{script.__name__}.py", models_dir, "Tiny", INPUT_STRING=text, MAX_NEW_TOKENS=8,
                        SHOW_TOKENS=0)
    assert result.returncode == 0, result.stderr
    assert result.stdout == tokenizer.decode(expected)


def test_same_inputs_give_byte_identical_output_and_the_checkpoint_is_untouched(models_dir):
    """With sampling, whose draws come from a seeded generator (greedy and beam search are deterministic by
    construction, and the exact-text tests would fail if they were not)."""
    folder = models_dir / "Tiny"
    before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())
    runs = [run_script("run_inference.py", models_dir, "Tiny", MAX_NEW_TOKENS=12, TEMPERATURE=0.8, SEED=7)
            for _ in range(2)]
    assert runs[0].returncode == 0 and runs[0].stdout != ""
    assert runs[0].stdout == runs[1].stdout
    assert sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()) == before


def test_ctrl_c_stops_cleanly_and_keeps_the_text(script_name, models_dir):
    env = clean_environment(LLAMA_MODELS_DIR=models_dir, MODEL_NAME="Tiny", DEVICE="cpu", MAX_NEW_TOKENS=100000,
                            SHOW_TOKENS=0)
    process = start_script(script_name, env)
    try:
        first = read_until(process.stdout, len)  # generation has started
        process.send_signal(signal.SIGINT)
        rest, stderr = process.communicate(timeout=60)
    finally:
        process.kill()  # a no-op once it has ended; otherwise it must not outlive the test
    assert process.returncode == 130
    assert first and "Traceback" not in stderr.decode()
    assert "interrupted" in stderr.decode()


def test_a_missing_input_file_is_one_line(script_name, models_dir, tmp_path):
    fails_with(run_script(script_name, models_dir, "Tiny", INPUT_FILE=tmp_path / "nowhere.txt"),
               f"INPUT_FILE='{tmp_path / 'nowhere.txt'}' cannot be read (No such file or directory)")


def test_an_input_file_that_is_not_text_is_one_line(script_name, models_dir, tmp_path):
    (tmp_path / "image.png").write_bytes(bytes(range(256)))
    fails_with(run_script(script_name, models_dir, "Tiny", INPUT_FILE=tmp_path / "image.png"), "not UTF-8 text")


@pytest.mark.parametrize("setting, value", [("MAX_NEW_TOKENS", "nan"), ("PREFILL_CHUNK", "inf")])
def test_numeric_settings_must_be_numbers(script_name, setting, value, models_dir):
    result = run_script(script_name, models_dir, "Tiny", **{setting: value})
    fails_with(result, f"{setting}={value!r} is not a valid int")


def test_float16_overflow_says_to_use_bfloat16(script_name, tmp_path, tiny_weights, distributed):
    """Activations above 65,504 are infinite in float16 but fine in bfloat16: the hint names the fix."""
    weights = dict(tiny_weights)
    weights["layers.0.feed_forward.w2.weight"] = weights["layers.0.feed_forward.w2.weight"] * 3e5
    write_checkpoint(tmp_path / "Loud", TINY, weights)
    model = load(minimal_run_inference, tmp_path / "Loud", 8, torch.bfloat16)
    assert torch.isfinite(minimal_run_inference.prefill(model, [128000, 791])).all()  # bfloat16 copes
    fails_with(run_script(script_name, tmp_path, "Loud", DTYPE="float16", MAX_NEW_TOKENS=4),
               "NaN or infinite scores in float16 on cpu", "float16 overflows on Llama: use DTYPE=bfloat16 or float32")


def test_an_unexpected_error_is_one_line_and_debug_shows_where(script_name, broken):
    """A params.json value of the wrong type gets past the checks and fails deep inside llama-models."""
    params = json.loads((broken / "params.json").read_text())
    (broken / "params.json").write_text(json.dumps({**params, "rope_theta": "fast"}))
    fails_with(run_script(script_name, broken.parent, "Broken"), "error: TypeError:", "(set DEBUG=1 to see where)")
    if script_name != "run_inference.py":  # support.exits.run handles both scripts' errors: one DEBUG=1 run is enough
        return
    debug = run_script(script_name, broken.parent, "Broken", DEBUG=1)
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    assert "in load_model" in debug.stderr  # where it happened
