"""Fixtures shared by the tests: random-weight checkpoints in Meta's layout, a way to run the scripts as a
user does (a subprocess, settings in environment variables), and the scripts' own functions in-process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from llama_models.llama3.tokenizer import Tokenizer

import minimal_run_inference
import run_inference
import support
from random_checkpoint import LLAMA_3_2_1B, TINY, TOKENIZER, random_weights, write_checkpoint

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["minimal_run_inference.py", "run_inference.py"]
CPU = torch.device("cpu")
# What must not leak from the caller's environment into a script run: the scripts' own settings, the
# variables torchrun sets (a script would think it is one of several processes), and DEBUG.
SETTING_NAMES = {name for module in (minimal_run_inference, run_inference) for name, value in vars(module).items()
                 if name.isupper() and type(value) in (str, int, float)}
LAUNCHER_NAMES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", "OMP_NUM_THREADS", "DEBUG"}


def clean_environment(**settings):
    """os.environ without the scripts' settings and torchrun's variables, plus `settings` as text."""
    env = {name: value for name, value in os.environ.items() if name not in SETTING_NAMES | LAUNCHER_NAMES}
    env.update({name: str(value) for name, value in settings.items()})
    return env


def run_script(script, models_dir, model_name, stdin=None, **settings):
    """Run a script as a user would: `python SCRIPT` with its settings overridden by environment variables."""
    env = clean_environment(**{"LLAMA_MODELS_DIR": models_dir, "MODEL_NAME": model_name, "DEVICE": "cpu", **settings})
    result = subprocess.run([sys.executable, str(REPO / script)], env=env, capture_output=True, timeout=600,
                            input=stdin.encode() if stdin is not None else None)
    # Decoded here rather than with text=True, which would turn a generated "\r\n" into "\n".
    result.stdout, result.stderr = result.stdout.decode("utf-8"), result.stderr.decode("utf-8")
    return result


def load(script, model_dir, max_seq_len, dtype=torch.float32, batch=1, **options):
    """A script's own load_model on the CPU, params.json read as the script reads it."""
    return script.load_model(model_dir, support.read_params(model_dir), CPU, dtype, max_seq_len, batch, **options)


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
    folder = tmp_path_factory.mktemp("checkpoints_1b")
    write_checkpoint(folder / "Llama3.2-1B", LLAMA_3_2_1B, random_weights(LLAMA_3_2_1B, tie_embeddings=True))
    return folder


@pytest.fixture(scope="session")
def distributed():
    """The one-process torch.distributed group and fairscale model parallelism the model's layers need."""
    if not dist.is_initialized():
        support.init_distributed(CPU)
    yield
    support.close_distributed()


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
