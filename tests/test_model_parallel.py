"""Model parallel with torchrun: CPU processes with gloo, on a tiny checkpoint saved as 1 and as 2 shards."""

import os
import re
import subprocess
import sys
import time

import pytest

from support import devices
from conftest import REPO, clean_environment, run_script
from standin.random_checkpoint import TINY, write_checkpoint

SETTINGS = {"DTYPE": "float32", "MAX_NEW_TOKENS": 16, "INPUT_STRING": "Once upon a time", "SHOW_TOKENS": 0}


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, models_dir, tiny_weights):
    """models_dir's tiny weights again, saved as 2 shards split the way Meta splits them."""
    folder = tmp_path_factory.mktemp("sharded")
    write_checkpoint(folder / "Tiny", TINY, tiny_weights, shards=2)
    return folder


def torchrun(processes, script_name, models_dir, **settings):
    """`torchrun --nproc-per-node N SCRIPT` on this machine, settings in environment variables (torchrun sets
    OMP_NUM_THREADS=1 for each process, as for a user who did not set it)."""
    env = clean_environment(**{"LLAMA_MODELS_DIR": models_dir, "MODEL_NAME": "Tiny", "DEVICE": "cpu", **settings})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               str(REPO / script_name)]
    result = subprocess.run(command, env=env, capture_output=True, timeout=300)
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


@pytest.mark.parametrize("script_name, strategy", [
    ("minimal_run_inference.py", {}),
    ("run_inference.py", {}),
    ("run_inference.py", {"BEAM_WIDTH": 3}),  # beam search is in run_inference.py only
    ("minimal_run_inference.py", {"KERNELS": "linear"}),  # a named kernel: our C++ norms and RoPE, on local heads
], ids=["minimal-greedy", "tutorial-greedy", "tutorial-beam", "minimal-greedy-one-call"])
def test_two_processes_decode_the_single_process_tokens(script_name, strategy, models_dir, sharded_dir):
    single = run_script(script_name, models_dir, "Tiny", **SETTINGS, **strategy)
    assert single.returncode == 0 and single.stdout, single.stderr
    folders = (models_dir, sharded_dir) if not strategy else (sharded_dir,)  # 1 shard split onto 2; 2 shards, one each
    for folder in folders:
        result = torchrun(2, script_name, folder, **SETTINGS, **strategy)
        assert result.returncode == 0, result.stderr
        assert result.stdout == single.stdout  # printed once: only rank 0 prints
        if script_name == "run_inference.py":  # torchrun's OMP_NUM_THREADS=1 is replaced by a share of the cores
            threads = max(1, devices.physical_cores() // 2)
            assert f" with {threads} threads in" in result.stderr


@pytest.mark.parametrize("folder, settings", [
    ("dice_dir", {"MODEL_NAME": "Dice", "TEMPERATURE": 1.0, "SEED": 5, "MAX_NEW_TOKENS": 24}),
    ("confident_dir", {"QUANTIZE": "int8", "DTYPE": "bfloat16"}),
], ids=["sampling", "int8"])
def test_two_processes_sample_and_quantise_as_one(folder, settings, request):
    """Every process draws with the same seed, so all pick the same tokens; each quantises its own slice."""
    folder = request.getfixturevalue(folder)
    settings = {**SETTINGS, **settings}
    model_name = settings.pop("MODEL_NAME", "Tiny")
    single = run_script("run_inference.py", folder, model_name, **settings)
    assert single.returncode == 0 and single.stdout, single.stderr
    result = torchrun(2, "run_inference.py", folder, MODEL_NAME=model_name, **settings)
    assert result.returncode == 0, result.stderr
    assert result.stdout == single.stdout


def test_two_shards_merge_in_one_process(models_dir, sharded_dir):
    single = run_script("run_inference.py", models_dir, "Tiny", **SETTINGS)
    merged = run_script("run_inference.py", sharded_dir, "Tiny", **SETTINGS)
    assert merged.returncode == 0, merged.stderr
    assert merged.stdout == single.stdout != ""


# Runs a script as rank 0 would, after a pause: the other ranks exit first, and torchrun stops rank 0.
LATE_RANK_0 = """import os, runpy, sys, time
sys.path.insert(0, {repo!r})
if os.environ["RANK"] == "0":
    time.sleep({seconds})
runpy.run_path({script!r}, run_name="__main__")
"""


def our_error_lines(stderr):
    """Our error lines, rank 0's as they are and another rank's marked with its number (torchrun adds its
    own failure report)."""
    return [line for line in stderr.splitlines() if re.match(r"(\[rank \d+\] )?error: ", line)]


@pytest.mark.parametrize("rank_0", ["in time", "late"])
def test_shards_that_cannot_map_onto_the_processes(sharded_dir, tmp_path, rank_0):
    """Every rank finds this error and prints it: when one rank exits, torchrun stops the others, so the
    line must not wait for rank 0. "late" holds rank 0 back on purpose until torchrun has stopped it."""
    script = REPO / "minimal_run_inference.py"
    if rank_0 == "late":
        script = tmp_path / "late_rank_0.py"
        script.write_text(LATE_RANK_0.format(repo=str(REPO), seconds=60, script=str(REPO / "minimal_run_inference.py")))
    start = time.monotonic()
    result = torchrun(3, script, sharded_dir, **SETTINGS)
    assert result.returncode != 0 and result.stdout == ""
    ours = our_error_lines(result.stderr)
    assert ours, result.stderr
    assert all("has 2 shards, which cannot be split or merged onto 3 processes" in line for line in ours)
    if rank_0 == "late":  # rank 0 was stopped before it printed: the others' lines reached the user
        assert time.monotonic() - start < 60
        assert not any(line.startswith("error: ") for line in ours)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc/self/task (Linux)")
def test_close_distributed_stops_every_thread_the_groups_started():
    """A group thread still running when Python shuts down can abort a finished torchrun run (SIGABRT after
    the output, 3 runs in 95 before close_distributed). Counted in a fresh process: each gloo group
    starts its threads in init_distributed, and all of them must be gone after close_distributed."""
    code = ("import os, torch\nfrom support import devices\n"
            "threads = lambda: len(os.listdir('/proc/self/task'))\n"
            "torch.ones(64, 64) @ torch.ones(64, 64)  # start torch's own thread pool first\n"
            "before = threads()\n"
            "devices.init_distributed(torch.device('cpu'))\n"
            "started = threads() - before\n"
            "devices.close_distributed()\n"
            "print(started, threads() - before)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=clean_environment())
    assert result.returncode == 0, result.stderr
    started, left = map(int, result.stdout.split()[-2:])
    assert started > 0 and left == 0
