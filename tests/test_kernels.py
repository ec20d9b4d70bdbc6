"""speedups' kernel choice: a pure function of timings (fake ones here: nothing is timed), the fixed rule of
other devices, a forced choice (KERNELS=...), and the cache file of timings (keys, atomic writes, a corrupt
file ignored). One test measures for real on the tiny model, to check that measuring runs and is cached."""

import json

import pytest
import torch

import run_inference
import speedups
from conftest import CPU, load

EPYC_ONE_ROW = {"linear-native": 0.061, "linear": 0.090, "mv": 0.070, "packed": 0.25}  # REFERENCE.md's table
XEON_ONE_ROW = {"mv": 0.075, "linear-native": 0.088, "linear": 0.103, "packed": 0.67}  # this project's Xeon, AMX


@pytest.mark.parametrize("one_row, chunk, expected", [
    (EPYC_ONE_ROW, {"linear": 0.02, "linear-native": 0.9, "packed": 0.01},
     (speedups.PlainLinear, {"one": "linear-native", "few": "linear", "chunk": "linear"})),  # packed is another layout
    (XEON_ONE_ROW, {"linear": 0.02, "linear-native": 0.9},
     (speedups.PlainLinear, {"one": "mv", "few": "linear", "chunk": "linear"})),
    ({"packed": 0.05, "mv": 0.07}, {"linear": 0.01, "packed": 0.02},
     (speedups.PackedLinear, {"one": "packed", "few": "packed", "chunk": "packed"})),
    ({"w8": 0.149, "w8a8": 0.107, "w8a8-onednn": 0.095}, {"w8-copy": 0.2, "w8a8-onednn": 0.1},
     (speedups.PackedInt8Linear, dict.fromkeys(speedups.ROW_CLASSES, "w8a8-onednn"))),
    ({"w8": 0.081, "w8a8": 0.116, "w8a8-onednn": 0.095}, {"w8": 0.5, "w8-copy": 0.2, "w8a8": 0.1},
     (speedups.Int8Linear, {"one": "w8", "few": "w8", "chunk": "w8a8"})),
])
def test_the_choice_is_the_fastest_layout_for_decoding_then_the_fastest_kernel_per_row_class(one_row, chunk, expected):
    assert speedups.choose({"one": one_row, "chunk": chunk}, "one") == expected


def test_beam_search_chooses_the_layout_by_its_few_rows():
    seconds = {"one": {"mv": 0.07, "packed": 0.5}, "few": {"linear": 0.3, "packed": 0.1}, "chunk": {"linear": 1.0}}
    assert speedups.choose(seconds, "few") == (speedups.PackedLinear, dict.fromkeys(speedups.ROW_CLASSES, "packed"))
    assert speedups.choose(seconds, "one")[1] == {"one": "mv", "few": "linear", "chunk": "linear"}


@pytest.mark.parametrize("quantize, device, expected", [
    ("", "cuda", {"one": "linear", "few": "linear", "chunk": "linear"}),
    ("int8", "cuda", {"one": "w8-copy", "few": "w8-copy", "chunk": "w8-copy"}),
    ("int8", "mps", {"one": "w8", "few": "w8", "chunk": "w8-copy"}),
    ("int8", "cpu", {"one": "w8", "few": "w8", "chunk": "w8-copy"}),
    ("int4", "cpu", dict.fromkeys(speedups.ROW_CLASSES, "int4")),
    ("", "cpu", {"one": "linear-native", "few": "linear", "chunk": "linear"}),
])
def test_the_fixed_rule(quantize, device, expected):
    seconds = speedups.rule_seconds(quantize, torch.device(device), torch.bfloat16, 1)
    assert speedups.choose(seconds, "one")[1] == expected


def test_a_forced_kernel_runs_where_it_serves_and_the_rule_elsewhere():
    seconds = speedups.forced_seconds(["mv", "w8a8"], "", CPU, torch.float32, 1)  # w8a8 is not for plain weights
    assert speedups.choose(seconds, "one") == (speedups.PlainLinear, {"one": "mv", "few": "linear", "chunk": "linear"})
    seconds = speedups.forced_seconds(["w8a8"], "int8", CPU, torch.bfloat16, 1)
    assert speedups.choose(seconds, "one")[1] == dict.fromkeys(speedups.ROW_CLASSES, "w8a8")


@pytest.mark.parametrize("value, expected", [("", "measure"), ("rule", "rule"), ("mv, w8a8", ["mv", "w8a8"])])
def test_the_kernels_setting(value, expected, monkeypatch):
    monkeypatch.setenv(speedups.KERNELS_SETTING, value)
    assert speedups.kernels_setting() == expected


def test_an_unknown_kernel_name_is_one_line(monkeypatch):
    monkeypatch.setenv(speedups.KERNELS_SETTING, "mv,fast")
    with pytest.raises(SystemExit, match="unknown kernel fast; choose measure, rule, or names from: mv, linear"):
        speedups.kernels_setting()


def test_the_cache_key_names_the_machine_format_rows_shape_and_version():
    key = speedups.cache_key((8192, 2048), "few", torch.bfloat16, "int8", 5)
    assert f"torch {torch.__version__} threads {torch.get_num_threads()}" in key and "flags:" in key
    assert f"bfloat16/int8 | few rows 5 | weight 8192x2048 | choice v{speedups.CALIBRATION_VERSION}" in key


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"key": {"mv": "fast"}}'])
def test_a_corrupt_cache_file_is_ignored_and_replaced(content, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = speedups.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert speedups.read_cache() == {}
    speedups.write_cache({"a key": {"mv": 0.5}})
    assert json.loads(path.read_text()) == {"a key": {"mv": 0.5}}
    assert [file.name for file in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_measuring_on_the_tiny_model_is_cached_and_describes_the_rates(models_dir, tmp_path, monkeypatch, distributed):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(speedups.KERNELS_SETTING, "measure")
    timed = []
    original = speedups.time_candidates
    monkeypatch.setattr(speedups, "time_candidates", lambda *args: timed.append(1) or original(*args))
    model = load(run_inference, models_dir / "Tiny", 8, torch.bfloat16)
    first = speedups.describe(model)
    assert "kernels measured on this CPU in" in first and "1 row: " in first and " GB/s -> " in first
    shapes = {module.shape for module in model.modules() if isinstance(module, speedups.FastLinear)}
    assert len(json.loads(speedups.cache_path().read_text())) == len(shapes) * 2  # one row, a chunk
    second = speedups.describe(load(run_inference, models_dir / "Tiny", 8, torch.bfloat16))
    assert "kernels measured on this CPU earlier" in second and timed == [1]


@pytest.mark.parametrize("slow_count, kept", [(2, 1), (1, 2)])
def test_step_threads_keeps_the_count_whose_steps_are_shorter(slow_count, kept, monkeypatch):
    """A fake clock: each decode step takes 1 s with `slow_count` threads and 0.3 s with the other count."""
    before = torch.get_num_threads()
    clock = [0.0]

    def now():
        return clock[0]

    monkeypatch.setattr(speedups.time, "perf_counter", now)
    threads = speedups.StepThreads(2)
    try:
        torch.set_num_threads(2)
        threads.step(decoding=False)  # a prompt chunk: not a decode step
        for _ in range(3 * speedups.StepThreads.TRIAL):
            clock[0] += 1.0 if torch.get_num_threads() == slow_count else 0.3
            threads.step(decoding=True)
        assert threads.current == kept and torch.get_num_threads() == kept
    finally:
        torch.set_num_threads(before)
