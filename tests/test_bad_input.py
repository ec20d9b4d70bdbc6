"""Bad input, faults and limits: one clear line on stderr, a non-zero status, no traceback, nothing written."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import minimal_run_inference
from conftest import REPO, SCRIPTS, clean_environment, load, read_until, run_script, start_script
from standin.random_checkpoint import TINY, write_checkpoint
from support import checkpoint, settings
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
               f"INPUT_FILE='{tmp_path / 'nowhere.txt'}' does not exist")


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


PLANTED_FAULT = """
import llama_models.llama3.model

def planted(*args, **kwargs):
    raise RuntimeError("a planted fault. Advice the user should not see")

llama_models.llama3.model.Transformer.__init__ = planted
"""


def test_an_unexpected_error_is_one_line_and_debug_shows_where(script_name, models_dir, tmp_path):
    """A fault no check foresees, planted inside llama-models (a sitecustomize module, which Python runs at
    start): one line with its type and first sentence; DEBUG=1 shows the traceback."""
    (tmp_path / "sitecustomize.py").write_text(PLANTED_FAULT)
    result = run_script(script_name, models_dir, "Tiny", PYTHONPATH=tmp_path)
    fails_with(result, "error: RuntimeError: a planted fault (set DEBUG=1 to see where)")
    assert "Advice" not in result.stderr
    if script_name != "run_inference.py":  # support.exits.run handles both scripts' errors: one DEBUG=1 run is enough
        return
    debug = run_script(script_name, models_dir, "Tiny", DEBUG=1, PYTHONPATH=tmp_path)
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    assert "in load_model" in debug.stderr  # where it happened


# ---------------------------------------------------------------------------------------------------------
# First contact (issue 27): what a newcomer plausibly gives each setting and file. The checks live in
# support/, shared by both scripts: most cases call them in this process (fail() raises SystemExit with
# the line), and a few run a script, for the whole path: one line, status 1, no traceback, no hang.
# ---------------------------------------------------------------------------------------------------------
def stops_with(call, *fragments):
    """call() stops with fail()'s one line, containing every fragment."""
    with pytest.raises(SystemExit) as stop:
        call()
    assert isinstance(stop.value.code, str) and stop.value.code.startswith("error: ")
    assert "\n" not in stop.value.code
    for fragment in fragments:
        assert fragment in stop.value.code, stop.value.code


def with_params(folder, **changes):
    """folder's params.json with these fields changed (None: removed)."""
    params = {**json.loads((folder / "params.json").read_text()), **changes}
    (folder / "params.json").write_text(json.dumps({k: v for k, v in params.items() if v is not None}))
    return folder


@pytest.mark.parametrize("changes, fragments", [
    ({"dim": 65}, ["dim 65 does not split into n_heads 4 heads of an even size"]),
    ({"dim": 66, "n_heads": 6, "n_kv_heads": 2}, ["dim 66 does not split into n_heads 6 heads of an even size"]),
    ({"n_kv_heads": 3}, ["n_heads 4 is not a multiple of n_kv_heads 3"]),
    ({"n_heads": 0}, ["n_heads is 0, but it must be a positive integer"]),
    ({"n_kv_heads": 0}, ["n_kv_heads is 0, but it must be a positive integer"]),
    ({"dim": -64}, ["dim is -64, but it must be a positive integer"]),
    ({"n_layers": 0}, ["n_layers is 0, but it must be a positive integer"]),
    ({"dim": True}, ["dim is True, but it must be a positive integer"]),
    ({"multiple_of": 0}, ["multiple_of is 0, but it must be a positive integer"]),
    ({"norm_eps": "1e-5"}, ["norm_eps is '1e-5', but it must be a positive number"]),
    ({"norm_eps": -1e-5}, ["norm_eps is -1e-05, but it must be a positive number"]),
    ({"rope_theta": 0}, ["rope_theta is 0, but it must be a positive number"]),
    ({"ffn_dim_multiplier": 0.0}, ["ffn_dim_multiplier is 0.0, but it must be a positive number"]),
    ({"use_scaled_rope": "false"}, ["use_scaled_rope is 'false', but it must be true or false"]),
    ({"quantization_args": {"group_size": 32, "scheme": "int4_weight_int8_dynamic_activation", "spinquant": True}},
     ["is one of Meta's quantized checkpoints (params.json has quantization_args)",
      "llama-model download --source meta --model-id Llama3.2-1B-Instruct)", "QUANTIZE=int8 or int4"]),
])
def test_params_json_whose_sizes_are_not_a_llamas(broken, changes, fragments):
    """Each line names params.json and says what to do; before, these ended in AssertionError,
    ZeroDivisionError, a TypeError deep in the model, NaN scores, or (quantization_args) a run of a
    checkpoint whose weights it cannot read."""
    folder = broken.rename(broken.parent / "Llama3.2-1B-Instruct:int4-spinquant-eo8")  # a quantized download's name
    stops_with(lambda: checkpoint.read_params(with_params(folder, **changes)), *fragments)


@pytest.mark.parametrize("script_name, changes, fragment", [
    ("minimal_run_inference.py", {"dim": 65}, "params.json: dim 65 does not split"),
    ("run_inference.py", {"n_kv_heads": 3}, "params.json: n_heads 4 is not a multiple of n_kv_heads 3"),
])
def test_params_json_sizes_are_checked_before_loading(broken, script_name, changes, fragment):
    with_params(broken, **changes)
    fails_with(run_script(script_name, broken.parent, "Broken"), fragment, "re-download the checkpoint")


def test_job_fields_in_params_json_are_ignored_with_a_note(broken):
    """Some converters write max_seq_len and max_batch_size, which llama-models' ModelArgs also takes from
    the scripts (a TypeError before); n_kv_heads null means n_heads, as in ModelArgs (a TypeError in the
    memory check before)."""
    params = {**TINY, "n_kv_heads": None, "n_heads": TINY["n_kv_heads"], "max_seq_len": 2048, "max_batch_size": 32}
    (broken / "params.json").write_text(json.dumps(params))
    assert "n_kv_heads" not in checkpoint.read_params(broken)
    params = {**TINY, "ffn_dim_multiplier": None, "max_seq_len": 2048, "max_batch_size": 32}
    (broken / "params.json").write_text(json.dumps(params))
    result = run_script("minimal_run_inference.py", broken.parent, "Broken", MAX_NEW_TOKENS=6)
    assert result.returncode == 0 and result.stdout != "", result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 2 and "sets max_seq_len (2048), which sizes a job, not the model: ignored" in notes[0]
    assert "sets max_batch_size (32)" in notes[1]


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64])
def test_weights_that_are_not_floating_point_weights(tmp_path, tiny_weights, dtype, distributed):
    """int64 tensors of the right shapes (a raw state_dict error before), and float64, which no Llama
    checkpoint holds: one line that names the tensor."""
    write_checkpoint(tmp_path / "Integers", TINY, {name: t.to(dtype) for name, t in tiny_weights.items()})
    stops_with(lambda: load(minimal_run_inference, tmp_path / "Integers", 8),
               f"in {tmp_path / 'Integers'} holds {str(dtype).removeprefix('torch.')} numbers, not floating-point "
               "weights (Meta's are bfloat16)")


BRIEF_RUN_MEMORY = 8 * GIB  # address space: a script that reads /dev/zero stops there, not at the machine's end


def limited_memory():
    resource.setrlimit(resource.RLIMIT_AS, (BRIEF_RUN_MEMORY, BRIEF_RUN_MEMORY))


def run_briefly(script_name, models_dir, model_name, **settings):
    """run_script for what must not hang nor grow: a minute at most (a hang fails the test instead of
    stalling it), BRIEF_RUN_MEMORY at most."""
    env = clean_environment(LLAMA_MODELS_DIR=models_dir, MODEL_NAME=model_name, DEVICE="cpu", **settings)
    return subprocess.run([sys.executable, str(REPO / script_name)], env=env, capture_output=True, text=True,
                          timeout=60, preexec_fn=limited_memory)


@pytest.mark.parametrize("kind", ["dangling link", "named pipe", "folder"])
def test_a_weights_file_that_is_not_a_file(broken, kind):
    """A dangling symlink (a raw FileNotFoundError before), a FIFO (a silent hang before: torch.load
    waited for a writer), a folder: named for what they are."""
    weights = broken / "consolidated.00.pth"
    weights.unlink()
    if kind == "dangling link":
        weights.symlink_to(broken / "moved-away.pth")
    elif kind == "named pipe":
        os.mkfifo(weights)
    else:
        weights.mkdir()
    expected = {"dangling link": f"is a link to {broken / 'moved-away.pth'}, which does not exist",
                "named pipe": "is a named pipe (FIFO), not a file", "folder": "is a folder, not a file"}[kind]
    result = run_briefly("minimal_run_inference.py", broken.parent, "Broken")
    fails_with(result, f"{weights} {expected}", "llama-model download")
    assert result.returncode == 1


@pytest.mark.parametrize("name", ["params.json", "tokenizer.model"])
def test_checkpoint_files_that_are_not_files(broken, name):
    """params.json as a folder, tokenizer.model as a named pipe: read_text would fail or wait forever."""
    (broken / name).unlink()
    os.mkfifo(broken / name) if name == "tokenizer.model" else (broken / name).mkdir()
    stops_with(lambda: checkpoint.find_checkpoint(str(broken.parent), "Broken"),
               f"{broken / name} is a {'named pipe (FIFO)' if name == 'tokenizer.model' else 'folder'}, not a file")


def test_a_link_to_a_file_is_that_file(broken, models_dir):
    """The Hub's downloads may be links into its cache: a link that points to a file works."""
    (broken / "tokenizer.model").unlink()
    (broken / "tokenizer.model").symlink_to(models_dir / "Tiny" / "tokenizer.model")
    assert checkpoint.find_checkpoint(str(broken.parent), "Broken") == broken


@pytest.mark.parametrize("path, fragment", [
    ("/dev/zero", "INPUT_FILE='/dev/zero' is a device, not a file"),
    ("fifo", "is a named pipe (FIFO), not a file"),
    ("folder", "is a folder, not a file"),
])
def test_an_input_file_that_is_not_a_file_is_never_read(models_dir, tmp_path, path, fragment):
    """/dev/zero was read whole (until memory ran out), a FIFO waited for a writer forever."""
    if path == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
    elif path == "folder":
        path = tmp_path
    result = run_briefly("run_inference.py", models_dir, "Tiny", INPUT_FILE=path)
    fails_with(result, fragment, "give a UTF-8 text file, or unset INPUT_FILE")


def test_an_input_file_larger_than_the_context_can_hold_is_not_read(tmp_path, models_dir, tokenizer):
    """A text of more bytes than the context's tokens can cover (each at most the longest token's bytes) is
    refused by its size; one byte less is read (and then counted in tokens by check_length)."""
    params = checkpoint.read_params(models_dir / "Tiny")
    longest = max(len(piece) for piece in tokenizer.model.token_byte_values())
    limit = checkpoint.context_length(params) * longest
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as text_file:
        text_file.truncate(limit + 1)  # sparse: no disk space, and reading it would take long
    stops_with(lambda: settings.read_prompt("", str(huge), tokenizer, params),
               f"is {limit + 1} bytes, more text than the model's context of 131072 tokens can hold "
               f"(at most {limit} bytes, {longest} per token); give a shorter file")
    (tmp_path / "fits.txt").write_text("a" * 1000)
    assert settings.read_prompt("", str(tmp_path / "fits.txt"), tokenizer, params) == "a" * 1000


@pytest.mark.parametrize("stdin", ["closed", "write-only"])
def test_chat_with_stdin_that_cannot_be_read_stops_before_loading(models_dir, tmp_path, stdin):
    """`python run_inference.py <&-` (an AttributeError after the model had loaded) and `0>file`."""
    env = clean_environment(LLAMA_MODELS_DIR=models_dir, MODEL_NAME="Tiny-Instruct", DEVICE="cpu", CHAT=1)
    output = tmp_path / "written.txt"
    with open(output, "w") as write_only:
        options = {"preexec_fn": lambda: os.close(0)} if stdin == "closed" else {"stdin": write_only}
        result = subprocess.run([sys.executable, str(REPO / "run_inference.py")], env=env, capture_output=True,
                                text=True, timeout=60, **options)
    expected = "is closed" if stdin == "closed" else "is open for writing only"
    fails_with(result, f"CHAT=1 reads your messages from stdin, which {expected}: run it in a terminal, or pipe")
    assert "loaded" not in result.stderr  # before the model loads


@pytest.mark.parametrize("name, value, fragment", [
    ("SEED", "18446744073709551616", "SEED=18446744073709551616 is out of range: it must be at least 0 and at most "
                                     "18446744073709551615"),
    ("SEED", "-1", "SEED=-1 is out of range"),
])
def test_settings_out_of_range_stop_before_any_work(monkeypatch, name, value, fragment):
    """SEED=2**64 overflowed in torch's generator, after the model had loaded."""
    import run_inference
    monkeypatch.setenv(name, value)
    stops_with(lambda: settings.apply_settings(dict(vars(run_inference))), fragment)


@pytest.mark.parametrize("models_dir_setting, model_name, fragment", [
    ("{models}", "", "MODEL_NAME='' is not a folder name"),
    ("{models}", "../models/Tiny", "MODEL_NAME='../models/Tiny' is not a folder name"),
    ("{models}", "meta-llama/Llama-3.2-1B-Instruct", "MODEL_NAME='meta-llama/Llama-3.2-1B-Instruct' is not a folder "
                                                     "name: set it to the name of a checkpoint folder in"),
    ("{models}", "..", "MODEL_NAME='..' is not a folder name"),
    ("", "Tiny", "LLAMA_MODELS_DIR is empty: set it to the folder that holds the checkpoint folders"),
    ("{models}/Tiny/params.json", "Tiny", "params.json' is not a folder: set it to the folder that holds"),
])
def test_model_name_and_models_dir_that_are_not_a_folder_and_its_name(models_dir, models_dir_setting, model_name,
                                                                       fragment):
    setting = models_dir_setting.format(models=models_dir)
    stops_with(lambda: checkpoint.find_checkpoint(setting, model_name), fragment)


SLOW_IMPORT = """
import sys
import time


class SlowTorch:
    '''Pins the moment of the test's Ctrl-C: while the script imports torch, which takes seconds anyway.'''

    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.stderr.write("importing torch\\n")
            sys.stderr.flush()
            time.sleep(60)
        return None


sys.meta_path.insert(0, SlowTorch())
"""


def test_ctrl_c_during_the_imports_prints_interrupted(script_name, models_dir, tmp_path):
    """Ctrl-C in the first seconds, while the scripts import torch: one line, no traceback."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_IMPORT)
    env = clean_environment(LLAMA_MODELS_DIR=models_dir, MODEL_NAME="Tiny", DEVICE="cpu", PYTHONPATH=tmp_path)
    process = start_script(script_name, env)
    try:
        read_until(process.stderr, lambda data: b"importing torch\n" in data, timeout=60)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode in (130, -signal.SIGINT)  # Python ends as interrupted: a shell shows 130
    assert stdout == b"" and stderr.decode().strip() == "interrupted"
