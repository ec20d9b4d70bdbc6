"""speedups' kernel choice: a pure function of timings (fake ones here: nothing is timed), the fixed rule of
other devices, a forced choice (KERNELS=...), and the cache file of timings (keys, atomic writes, a corrupt
file ignored). One test measures for real on the tiny model, to check that measuring runs and is cached."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run_inference
import speedups
from speedups import calibration, kernels, layouts, native
from conftest import CPU, SCRIPTS, load, run_script
from standin.smollm import BASE_MODEL
from test_quantize import successor_chain

ONE_WORKER_FIXTURES = ["users_cache"]  # its tests on one xdist worker (conftest): the kernels built once (20 s)

EPYC_ONE_ROW = {"linear-native": 0.061, "linear": 0.090, "mv": 0.070, "packed": 0.25}  # REFERENCE.md's table
XEON_ONE_ROW = {"mv": 0.075, "linear-native": 0.088, "linear": 0.103, "packed": 0.67}  # this project's Xeon, AMX


@pytest.mark.parametrize("one_row, chunk, expected", [
    (EPYC_ONE_ROW, {"linear": 0.02, "linear-native": 0.9, "packed": 0.01},
     (layouts.PlainLinear, {"one": "linear-native", "few": "linear", "chunk": "linear"})),  # packed is another layout
    (XEON_ONE_ROW, {"linear": 0.02, "linear-native": 0.9},
     (layouts.PlainLinear, {"one": "mv", "few": "linear", "chunk": "linear"})),
    ({"packed": 0.05, "mv": 0.07}, {"linear": 0.01, "packed": 0.02},
     (layouts.PackedLinear, {"one": "packed", "few": "packed", "chunk": "packed"})),
    ({"w8": 0.149, "w8a8": 0.107, "w8a8-onednn": 0.095}, {"w8-copy": 0.2, "w8a8-onednn": 0.1},
     (layouts.PackedInt8Linear, dict.fromkeys(layouts.ROW_CLASSES, "w8a8-onednn"))),
    ({"w8": 0.081, "w8a8": 0.116, "w8a8-onednn": 0.095}, {"w8": 0.5, "w8-copy": 0.2, "w8a8": 0.1},
     (layouts.Int8Linear, {"one": "w8", "few": "w8", "chunk": "w8a8"})),
    # ours (q8) against stock kernels: kept while they are at most OURS_MARGIN times faster, replaced beyond
    ({"q8": 0.100, "w8a8": 0.090, "w8": 0.2}, {"w8-copy": 0.2}, (layouts.Int8Linear, {"one": "q8", "few": "w8",
                                                                                   "chunk": "w8-copy"})),
    ({"q8": 0.100, "w8a8": 0.085, "w8": 0.2}, {"w8-copy": 0.2}, (layouts.Int8Linear, {"one": "w8a8", "few": "w8",
                                                                                   "chunk": "w8-copy"})),
])
def test_the_choice_is_the_fastest_layout_for_decoding_then_the_fastest_kernel_per_row_class(one_row, chunk, expected):
    assert calibration.choose({"one": one_row, "chunk": chunk}, "one") == expected


def test_beam_search_chooses_the_layout_by_its_few_rows():
    seconds = {"one": {"mv": 0.07, "packed": 0.5}, "few": {"linear": 0.3, "packed": 0.1}, "chunk": {"linear": 1.0}}
    assert calibration.choose(seconds, "few") == (layouts.PackedLinear, dict.fromkeys(layouts.ROW_CLASSES, "packed"))
    assert calibration.choose(seconds, "one")[1] == {"one": "mv", "few": "linear", "chunk": "linear"}


@pytest.mark.parametrize("quantize, device, expected", [
    ("", "cuda", {"one": "linear", "few": "linear", "chunk": "linear"}),
    ("int8", "cuda", {"one": "w8-copy", "few": "w8-copy", "chunk": "w8-copy"}),
    ("int8", "mps", {"one": "w8", "few": "w8", "chunk": "w8-copy"}),
    ("int8", "cpu", {"one": "w8", "few": "w8", "chunk": "w8-copy"}),
    ("int4", "cpu", dict.fromkeys(layouts.ROW_CLASSES, "int4")),
    ("", "cpu", {"one": "linear-native", "few": "linear", "chunk": "linear"}),
])
def test_the_fixed_rule(quantize, device, expected):
    seconds = calibration.rule_seconds(quantize, torch.device(device), torch.bfloat16, 1)
    assert calibration.choose(seconds, "one")[1] == expected


def test_a_forced_kernel_runs_where_it_serves_and_the_rule_elsewhere():
    seconds = calibration.forced_seconds(["mv", "w8a8"], "", CPU, torch.float32, 1)  # w8a8 is not for plain weights
    assert calibration.choose(seconds, "one") == (layouts.PlainLinear, {"one": "mv", "few": "linear", "chunk": "linear"})
    seconds = calibration.forced_seconds(["w8a8"], "int8", CPU, torch.bfloat16, 1)
    assert calibration.choose(seconds, "one")[1] == dict.fromkeys(layouts.ROW_CLASSES, "w8a8")


@pytest.mark.parametrize("value, expected", [("", "measure"), ("rule", "rule"), ("mv, w8a8", ["mv", "w8a8"])])
def test_the_kernels_setting(value, expected):
    assert calibration.kernel_choice(value) == expected


def test_an_unknown_kernel_name_is_one_line():
    with pytest.raises(ValueError, match="unknown kernel fast; choose measure, rule, or names from: mv, linear"):
        calibration.kernel_choice("mv,fast")


def test_the_cache_key_names_the_machine_format_rows_shape_and_version():
    key = calibration.cache_key((8192, 2048), "few", torch.bfloat16, "int8", 5)
    assert f"torch {torch.__version__} threads {torch.get_num_threads()}" in key and "flags:" in key
    assert (f"bfloat16/int8 | few rows 5 | weight 8192x2048 | without our kernels "
            f"| choice v{calibration.CALIBRATION_VERSION}") in key


ENTRY = {"seconds": {"mv": 0.5}, "skipped": {"packed": "cannot build PackedLinear"}}


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"key": {"mv": "fast"}}', '{"key": {"mv": 0.5}}'])
def test_a_corrupt_cache_file_is_ignored_and_replaced(content, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = calibration.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert calibration.read_cache() == {}
    assert calibration.write_cache({"a key": ENTRY}) == f"cached in {path}"
    assert json.loads(path.read_text()) == {"a key": ENTRY}
    assert [file.name for file in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_measuring_on_the_tiny_model_is_cached_and_describes_the_rates(models_dir, tmp_path, monkeypatch, distributed):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    timed = []
    original = calibration.time_candidates
    monkeypatch.setattr(calibration, "time_candidates", lambda *args: timed.append(1) or original(*args))
    model = load(run_inference, models_dir / "Tiny", 8, torch.bfloat16, kernels="measure")
    first = speedups.describe(model)
    assert "kernels measured on this CPU in" in first and "1 row: " in first and " GB/s -> " in first
    shapes = {module.shape for module in model.modules() if isinstance(module, layouts.FastLinear)}
    assert len(json.loads(calibration.cache_path().read_text())) == len(shapes) * 3  # one row, a few, a chunk
    second = speedups.describe(load(run_inference, models_dir / "Tiny", 8, torch.bfloat16, kernels="measure"))
    assert "kernels measured on this CPU earlier" in second and timed == [1]


@pytest.mark.parametrize("slow_count, kept", [(2, 1), (1, 2)])
def test_step_threads_keeps_the_count_whose_steps_are_shorter(slow_count, kept, monkeypatch):
    """A fake clock: each decode step takes 1 s with `slow_count` threads and 0.3 s with the other count."""
    before = torch.get_num_threads()
    clock = [0.0]

    def now():
        return clock[0]

    monkeypatch.setattr(calibration.time, "perf_counter", now)
    threads = calibration.StepThreads(2)
    try:
        torch.set_num_threads(2)
        threads.step(decoding=False)  # a prompt chunk: not a decode step
        for _ in range(3 * calibration.StepThreads.TRIAL):
            clock[0] += 1.0 if torch.get_num_threads() == slow_count else 0.3
            threads.step(decoding=True)
        assert threads.current == kept and torch.get_num_threads() == kept
    finally:
        torch.set_num_threads(before)


def test_step_threads_keeps_all_threads_when_one_is_barely_faster(monkeypatch):
    """One thread's steps 5% shorter than two threads' (within what noise does to four steps): all threads stay;
    20% shorter: one thread is kept."""
    used = decode_with_step_threads(monkeypatch, lambda step, threads: 0.3 if threads == 2 else 0.285, 40)
    assert used[calibration.StepThreads.TRIAL * 2 + 1 :].count(2) == len(used) - calibration.StepThreads.TRIAL * 2 - 1
    used = decode_with_step_threads(monkeypatch, lambda step, threads: 0.3 if threads == 2 else 0.24, 40)
    assert used[-1] == 1


def decode_with_step_threads(monkeypatch, seconds, steps):
    """StepThreads(2) over `steps` decode steps on a fake clock, a step taking seconds(step, threads); returns the
    thread count each step ran with."""
    before = torch.get_num_threads()
    clock = [0.0]
    monkeypatch.setattr(calibration.time, "perf_counter", lambda: clock[0])
    threads = calibration.StepThreads(2)
    used = []
    try:
        torch.set_num_threads(2)
        threads.step(decoding=False)
        for step in range(steps):
            used.append(torch.get_num_threads())
            clock[0] += seconds(step, used[-1])
            threads.step(decoding=True)
    finally:
        torch.set_num_threads(before)
    return used


def test_step_threads_seldom_tries_the_slower_count_on_a_quiet_machine(monkeypatch):
    """2 threads always faster: the 1-thread trials' steps are under 2% of a long run (trials every 32 steps
    would make them 12.5%, each running at the slower count)."""
    used = decode_with_step_threads(monkeypatch, lambda step, threads: 0.3 if threads == 2 else 0.5, 3000)
    assert 1 in used[: calibration.StepThreads.TRIAL + 2]  # the first trial comes early
    assert used.count(1) < 0.02 * len(used)


def test_a_step_threads_trial_that_loses_at_its_first_step_ends_there(monkeypatch):
    """A quiet machine, 1-thread steps 1.67, 1.2 or 0.95 times as long as 2-thread ones: none would be kept
    (FEWER_MARGIN), so each trial of one thread is a single step. Steps 0.8 times as long get the whole trial
    (and one thread is kept)."""
    trials = lambda used: [len(run) for run in "".join(map(str, used)).split("2") if run]  # steps of each trial
    for one_thread in (0.5, 0.36, 0.285):
        used = decode_with_step_threads(monkeypatch, lambda step, threads: 0.3 if threads == 2 else one_thread, 200)
        assert trials(used) == [1, 1, 1]  # after 4 timed steps, then 64 and 128 steps later
    used = decode_with_step_threads(monkeypatch, lambda step, threads: 0.3 if threads == 2 else 0.24, 20)
    assert used[calibration.StepThreads.TRIAL + 1 :] == [1] * (20 - calibration.StepThreads.TRIAL - 1)


def test_a_step_threads_trial_of_all_threads_that_loses_at_its_first_step_ends_there(monkeypatch):
    """A busy core (2-thread steps 5 times as long) while one thread is kept: each trial of all threads is one
    step; 2-thread steps 1.05 times as long as 1-thread ones (within FEWER_MARGIN) take all threads back."""
    busy = decode_with_step_threads(monkeypatch, lambda step, threads: 0.3 if threads == 1 else 1.5, 200)
    assert [len(run) for run in "".join(map(str, busy[10:])).split("1") if run] == [1] * 5
    close = decode_with_step_threads(monkeypatch, lambda step, threads: 0.3 if threads == 1 else
                                     (1.5 if step < 40 else 0.315), 120)
    assert close[-1] == 2


def test_step_threads_tries_again_as_soon_as_the_machine_gets_busier(monkeypatch):
    """From step 120 another process holds a core and 2-thread steps take 5 times as long: one thread is
    tried and kept within two trials' steps, not at the next scheduled trial (2 threads are tried again every
    PERIOD steps: under 15% of the steps after)."""
    used = decode_with_step_threads(monkeypatch, lambda step, threads: 0.5 if threads == 1 else
                                    (1.5 if step >= 120 else 0.3), 200)
    assert used[:120].count(2) > 110 and used[129] == 1 and used[129:].count(1) > 0.85 * len(used[129:])


def test_step_threads_takes_all_threads_back_soon_after_the_machine_is_quiet_again(monkeypatch):
    """2-thread steps are 5 times as long from step 40 to 600 (a busy core), then quiet again: one thread runs
    through the busy stretch, and all threads are back within a trial period after it."""
    period, trial = calibration.StepThreads.PERIOD, calibration.StepThreads.TRIAL
    used = decode_with_step_threads(monkeypatch, lambda step, threads: 0.5 if threads == 1 else
                                    (1.5 if 40 <= step < 600 else 0.3), 800)
    assert used[60:600].count(1) > 0.8 * 540
    back = used[600 + period + 2 * trial:]
    assert back[0] == 2 and back.count(2) > 0.9 * len(back)


@pytest.mark.parametrize("step_seconds, dropped", [(0.5, True), (1.2, False)])
def test_timings_taken_on_a_busier_machine_are_measured_again(step_seconds, dropped, tmp_path, monkeypatch, capsys):
    """The timings said a step's linear layers take 1 s; steps of 0.5 s mean they were measured while the machine
    was busier than now: the cache forgets them (and says so), so that the next load measures again. Steps of
    1.2 s are what the timings predict."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calibration.write_cache({"this model's key": ENTRY, "another model's key": ENTRY})
    clock = [0.0]
    monkeypatch.setattr(calibration.time, "perf_counter", lambda: clock[0])
    check = calibration.TimingsCheck(1.0, ["this model's key"])
    check.step(decoding=False)  # a prompt chunk: not a decode step
    for _ in range(calibration.TimingsCheck.STEPS + 1):
        clock[0] += step_seconds
        check.step(decoding=True)
    assert ("this model's key" not in calibration.read_cache()) == dropped
    assert "another model's key" in calibration.read_cache()
    assert ("measured again at the next load" in capsys.readouterr().err) == dropped


# ---------------------------------------------------------------------------------------------------------
# A kernel must build, run, and be right before it can be fast (issue: an AVX2-only CPU crashed at load).
# ---------------------------------------------------------------------------------------------------------
def other_layouts():
    """Every layout a kernel reads that no format is first converted to."""
    bases = {kernels.base_layout(quantize, ours) for quantize in layouts.FORMATS for ours in (False, True)}
    return {kernel.layout for kernel in kernels.KERNELS.values()} - bases


def break_other_layouts(monkeypatch):
    """Every layout but the base ones raises while it is built, as oneDNN's packed bfloat16 layout does on a CPU
    without AVX-512."""
    def refuse(self, *args, **kwargs):
        raise RuntimeError("bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq")

    for layout in other_layouts():
        monkeypatch.setattr(layout, "__init__", refuse)


@pytest.mark.parametrize("quantize", ["", "int8"])
def test_decoding_one_row_never_tries_another_layout(quantize, confident_dir, tmp_path, monkeypatch, distributed):
    """Batch 1 measures the base layout's kernels only: another layout would be timed on one copied layer,
    which misjudged how a whole model in it streams (benchmarks/README.md). No other layout is even built."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = []
    for layout in other_layouts():
        monkeypatch.setattr(layout, "__init__", lambda self, *args, layout=layout, **kwargs: built.append(layout))
    model = load(run_inference, confident_dir / "Tiny", 30, torch.bfloat16, batch=1, quantize=quantize,
                 kernels="measure")
    assert "measured on this CPU in" in speedups.describe(model) and built == []
    assert {type(m) for m in model.modules() if isinstance(m, layouts.FastLinear)} == {kernels.base_layout(
        quantize, native.library() is not None)}


@pytest.mark.parametrize("quantize", ["", "int8"])
@pytest.mark.parametrize("setting", ["measure", "packed,w8a8-onednn"])
def test_a_layout_that_cannot_be_built_is_skipped_and_the_run_completes(quantize, setting, confident_dir, successor,
                                                                        tokenizer, tmp_path, monkeypatch,
                                                                        distributed):
    """Measured (KERNELS unset) or forced: beam search's few rows would take the packed layouts; they raise, so
    every layer keeps its base layout, the fast-path line says why, and the confident model's text follows."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    prompt_ids = tokenizer.encode("Once upon a time", bos=True, eos=False)
    break_other_layouts(monkeypatch)
    model = load(run_inference, confident_dir / "Tiny", 30, torch.bfloat16, batch=4, quantize=quantize,
                 kernels=setting)
    assert {type(m) for m in model.modules() if isinstance(m, layouts.FastLinear)} == {kernels.base_layout(quantize,
                                                                                                           False)}
    assert "skipped here: " in speedups.describe(model) and "cannot build Packed" in speedups.describe(model)
    assert list(run_inference.generate(model, prompt_ids, 12, tokenizer.stop_tokens)) == \
        successor_chain(successor, prompt_ids[-1], 12)


def fast_and_wrong(module, x):
    """A candidate faster than any real kernel, and wrong: it multiplies by nothing."""
    return torch.zeros(x.shape[0], module.out_features, dtype=x.dtype)


def slightly_wrong(module, x):
    return torch.nn.functional.linear(x, module.weight) * 1.03


@pytest.mark.parametrize("run, off", [(fast_and_wrong, "100.0% off"), (slightly_wrong, "3.0% off")])
def test_a_wrong_kernel_is_never_chosen_however_fast(run, off, models_dir, tokenizer, tmp_path, monkeypatch,
                                                     distributed):
    """A fake candidate for one row is tried on the model's weights before it is timed: it is skipped, named
    with how far off it was, remembered in the cache, and the text is right."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setitem(kernels.KERNELS, "fake", kernels.Kernel("fake", layouts.PlainLinear, ("one",), ("cpu",), run))
    prompt_ids = tokenizer.encode("Once upon a time", bos=True, eos=False)
    expected = list(run_inference.generate(load(run_inference, models_dir / "Tiny", 30), prompt_ids, 12,
                                           tokenizer.stop_tokens))
    for how in ("measured on this CPU in", "measured on this CPU earlier"):  # the second load reads the cache
        model = load(run_inference, models_dir / "Tiny", 30, kernels="measure")
        line = speedups.describe(model)
        assert how in line and f"skipped here: fake (wrong here: {off})" in line
        assert all(kernel.name != "fake" for m in model.modules() if isinstance(m, layouts.FastLinear)
                   for kernel in m.kernels.values())
        assert list(run_inference.generate(model, prompt_ids, 12, tokenizer.stop_tokens)) == expected


def test_a_forced_kernel_that_fails_keeps_the_base_layouts_own(models_dir, tokenizer, monkeypatch, distributed):
    """KERNELS=name forces a kernel without timing it; one that raises when run is still tried first."""
    def raises(module, x):
        raise NotImplementedError("no kernel for this CPU")

    monkeypatch.setitem(kernels.KERNELS, "broken", kernels.Kernel("broken", layouts.PlainLinear, ("one",), ("cpu",),
                                                                  raises))
    model = load(run_inference, models_dir / "Tiny", 30, kernels="broken")
    assert "plan (fails: no kernel for this CPU: kept the base layout)" in speedups.describe(model)
    prompt_ids = tokenizer.encode("Once upon a time", bos=True, eos=False)
    assert len(list(run_inference.generate(model, prompt_ids, 12, tokenizer.stop_tokens))) == 12


# ---------------------------------------------------------------------------------------------------------
# The cache file: written truthfully, where the XDG specification says, never leaving a temporary file.
# ---------------------------------------------------------------------------------------------------------
def test_a_cache_that_cannot_be_written_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a file"))
    (tmp_path / "a file").write_text("not a folder")
    said = calibration.write_cache({"a key": ENTRY})
    assert said.startswith("not cached (") and "cached in" not in said
    assert [path.name for path in tmp_path.iterdir()] == ["a file"]


def test_a_relative_xdg_cache_home_is_ignored(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert calibration.cache_folder() == Path.home() / ".cache" / calibration.CACHE_FOLDER


def test_a_temporary_file_left_by_a_killed_writer_is_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = calibration.cache_path()
    path.parent.mkdir(parents=True)
    abandoned = path.with_name(f"{path.name}.{dead.stdout.strip()}.tmp")
    abandoned.write_text("{half a fi")
    assert calibration.write_cache({"a key": ENTRY}) == f"cached in {path}"
    assert sorted(file.name for file in path.parent.iterdir()) == [path.name]


# ---------------------------------------------------------------------------------------------------------
# What users run: the default settings, kernels measured on the machine that runs the suite.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script_name", SCRIPTS)
def test_each_script_with_its_default_settings_measures_and_prints_the_confident_text(script_name, confident_dir,
                                                                                    successor, tokenizer, tmp_path):
    """Every setting at its default (bfloat16, KERNELS unset: measured here), the cache in a fresh folder: the
    confident model's successor chain, whichever kernels this CPU picked."""
    result = run_script(script_name, confident_dir, "Tiny", KERNELS=None, XDG_CACHE_HOME=tmp_path, DEVICE=None)
    assert result.returncode == 0, result.stderr
    last = tokenizer.encode(run_inference.INPUT_STRING, bos=True, eos=False)[-1]
    chain = [successor[last].item()]
    while len(chain) < run_inference.MAX_NEW_TOKENS:
        chain.append(successor[chain[-1]].item())
    assert result.stdout == tokenizer.decode(chain)
    assert (tmp_path / calibration.CACHE_FOLDER / calibration.CACHE_FILE).is_file()
    if script_name == "run_inference.py":
        assert "kernels measured on this CPU in" in result.stderr


@pytest.fixture(scope="module")
def users_cache(tmp_path_factory):
    """A cache folder the scripts' runs share, as a user's: the first run builds the kernels and measures, the
    next finds them there (the test above starts from an empty one each time)."""
    return tmp_path_factory.mktemp("users-cache")


@pytest.mark.parametrize("script_name", SCRIPTS)
def test_each_script_with_its_default_settings_knows_paris(script_name, smollm_dir, users_cache):
    """The stand-in's real weights, every setting at its default but the model: the answer a user expects."""
    result = run_script(script_name, smollm_dir, BASE_MODEL, KERNELS=None, XDG_CACHE_HOME=users_cache, DEVICE=None,
                        MAX_NEW_TOKENS=8)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(" Paris")


def test_without_a_compiler_the_stock_kernels_run_and_the_line_says_so(confident_dir, successor, tokenizer, tmp_path):
    """A machine without a C++ compiler (CXX names none, and no build is cached in the fresh cache folder):
    int4 decodes with PyTorch's kernels, the confident model's text, and the fast-path line says why."""
    result = run_script("run_inference.py", confident_dir, "Tiny", KERNELS=None, XDG_CACHE_HOME=tmp_path,
                        CXX=str(tmp_path / "no-such-compiler"), QUANTIZE="int4", MAX_NEW_TOKENS=12, LOOK_INSIDE=0)
    assert result.returncode == 0, result.stderr
    assert "our C++ kernels: not available (no C++ compiler" in result.stderr
    last = tokenizer.encode(run_inference.INPUT_STRING, bos=True, eos=False)[-1]
    assert result.stdout == tokenizer.decode(successor_chain(successor, last, 12))
