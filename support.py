"""What both scripts need that is not about the model: settings from the environment, the device and
number format, checks of the checkpoint and of the user's input, and errors a person can act on.

Every check stops the script with one line on stderr that says what is wrong and what to do, and a
non-zero exit status. Set DEBUG=1 to see the traceback of an unexpected error instead.
"""

import difflib
import json
import os
import resource
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import fairscale.nn.model_parallel.layers as fairscale_layers
import torch
from llama_models.llama3.tokenizer import Tokenizer

LLAMA_3_VOCAB_SIZE = 128256  # every Llama 3.x model; Llama 2 has 32,000 (or -1), Llama 4 202,048
REQUIRED_PARAMS = ("dim", "n_layers", "n_heads", "vocab_size")
CONTEXT_LENGTH = 131072  # Llama 3.1, 3.2 and 3.3 (use_scaled_rope: true)
CONTEXT_LENGTH_LLAMA_3_0 = 8192  # Llama 3 (no RoPE scaling)
SUPPORTED = "text-only Llama 3.x checkpoints in Meta's format (3.1 8B/70B/405B, 3.2 1B/3B, 3.3 70B)"
GIB = 2**30


def fail(message):
    raise SystemExit(f"error: {message}")


def apply_environment(settings):
    """Override each UPPERCASE str/int/float global of a script by the environment variable of that name."""
    for name, default in list(settings.items()):
        text = os.environ.get(name)
        if not name.isupper() or text is None or type(default) not in (str, int, float):
            continue
        try:
            settings[name] = type(default)(text)
        except ValueError:
            fail(f"{name}={text!r} is not a valid {type(default).__name__} (the default is {default!r})")


def processes():
    """How many processes torchrun started together (1 without torchrun), and this one's rank."""
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))


def silence_other_ranks():
    """Under torchrun every process computes the same tokens; only rank 0 prints them (and any error)."""
    if processes()[1] != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")


def pick_device(name):
    """"auto" picks cuda, then mps, then cpu; a device that is not here is an error, not a fallback.
    Under torchrun, "cuda" means the GPU of this process's local rank."""
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = ["mps"] if torch.backends.mps.is_available() else []
    available = cuda + mps + ["cpu"]  # in the order "auto" prefers them
    if name == "auto":
        name = available[0].split(":")[0]
    if name == "cuda":
        name = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    if name not in available:
        fail(f"DEVICE={name!r} is not available here; choose one of: auto, {', '.join(available)}")
    return torch.device(name)


def pick_dtype(name, device):
    """"auto" is bfloat16, the format of Meta's weights, except on GPUs without it (float16 there)."""
    if name == "auto":
        gpu_without_bf16 = device.type == "cuda" and not torch.cuda.is_bf16_supported()
        name = "float16" if gpu_without_bf16 else "bfloat16"
    if name not in ("bfloat16", "float16", "float32"):
        fail(f"DTYPE={name!r} is not supported; choose one of: auto, bfloat16, float16, float32")
    return getattr(torch, name)


def check_range(name, value, low, high=None):
    """A numeric setting must lie in [low, high]."""
    if value < low or (high is not None and value > high):
        fail(f"{name}={value} is out of range: it must be at least {low}" + (f" and at most {high}" if high is not None else ""))


def find_checkpoint(models_dir, model_name):
    """The checkpoint folder, after checking that it holds what `llama-model download` puts there."""
    model_dir = models_dir / model_name
    download = f"download it with: llama-model download --source meta --model-id {model_name}"
    if not model_dir.is_dir():
        found = sorted((p.parent.name for p in models_dir.glob("*/params.json")),
                       key=lambda name: -difflib.SequenceMatcher(None, name, model_name).ratio())
        where = f"checkpoints in {models_dir}: {', '.join(found)}" if found else f"no checkpoints in {models_dir}"
        fail(f"{model_dir} not found ({where}); {download}")
    for name in ("params.json", "tokenizer.model"):
        if not (model_dir / name).is_file():
            fail(f"{model_dir / name} not found: the download is incomplete; {download}")
    if not list(model_dir.glob("consolidated.*.pth")):
        fail(f"no weights (consolidated.00.pth) in {model_dir}: the download is incomplete; {download}")
    return model_dir


def read_params(model_dir):
    """params.json as a dict, after checking that it describes a text-only Llama 3.x model."""
    path = model_dir / "params.json"
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        fail(f"{path} is not valid JSON ({error}); re-download the checkpoint")
    if not isinstance(params, dict):
        fail(f"{path} is not a JSON object; re-download the checkpoint")
    family = ("Llama 4" if "moe_args" in params or params.get("vocab_size") == 202048 else
              "a vision model" if any(key.startswith("vision") for key in params) else
              "Llama 2" if params.get("vocab_size") in (32000, -1) else None)
    if family:
        fail(f"{model_dir} looks like {family}; these scripts run {SUPPORTED}")
    for field in REQUIRED_PARAMS:
        if not isinstance(params.get(field), int):
            fail(f"{path} has no integer field {field!r}; re-download the checkpoint")
    if params["vocab_size"] != LLAMA_3_VOCAB_SIZE:
        fail(f"{path} has vocab_size {params['vocab_size']}, not Llama 3's {LLAMA_3_VOCAB_SIZE}; these scripts run {SUPPORTED}")
    return params


def load_tokenizer(model_dir, params):
    """llama-models' Tokenizer for the checkpoint's tokenizer.model, checked against params.json."""
    path = model_dir / "tokenizer.model"
    try:
        tokenizer = Tokenizer(path)
    except Exception as error:  # tiktoken's parser raises several kinds
        fail(f"{path} is not a Llama 3 tokenizer file ({type(error).__name__}); re-download the checkpoint")
    if tokenizer.n_words != params["vocab_size"]:
        fail(f"{path} has {tokenizer.n_words} tokens but params.json's vocab_size is {params['vocab_size']}: "
             "they belong to different models; re-download the checkpoint")
    return tokenizer


def check_length(prompt_length, max_new_tokens, params):
    """Prompt + new tokens must fit in the context the model was trained for."""
    limit = CONTEXT_LENGTH if params.get("use_scaled_rope") else CONTEXT_LENGTH_LLAMA_3_0
    if prompt_length + max_new_tokens > limit:
        fail(f"the prompt ({prompt_length} tokens) + MAX_NEW_TOKENS ({max_new_tokens}) exceeds the model's "
             f"context of {limit} tokens; shorten INPUT_STRING or lower MAX_NEW_TOKENS")


def check_shards(model_dir, params):
    """The checkpoint's shards must split or merge evenly onto the processes, and so must the heads."""
    shards, world_size = len(list(model_dir.glob("consolidated.*.pth"))), processes()[0]
    if shards % world_size and world_size % shards:
        fail(f"{model_dir} has {shards} shards, which cannot be split or merged onto {world_size} processes: "
             f"run a number of processes that divides {shards} or is a multiple of it")
    if params.get("n_kv_heads", params["n_heads"]) % world_size:
        fail(f"{model_dir.name} has {params.get('n_kv_heads', params['n_heads'])} key-value heads, which cannot be "
             f"split across {world_size} processes: use a number of processes that divides it")


def check_memory(model_dir, dtype, device, quantize=""):
    """Refuse to start a load that cannot fit: the weights need their file size, scaled to the dtype
    (int8: half), shared among the processes of a torchrun launch (each holds its slice)."""
    checkpoint_bytes = sum(path.stat().st_size for path in model_dir.glob("consolidated.*.pth"))
    bits = 8 if quantize == "int8" else torch.finfo(dtype).bits
    needed = checkpoint_bytes * bits / 16 / processes()[0]  # the files hold bfloat16
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    elif Path("/proc/meminfo").exists():  # Linux: memory the kernel can hand out without swapping
        available = int(Path("/proc/meminfo").read_text().split("MemAvailable:")[1].split()[0]) * 1024
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # total memory, macOS
    if needed > available:
        smaller = " or DTYPE=bfloat16" if dtype == torch.float32 else " or QUANTIZE=int8 (run_inference.py)" if not quantize else ""
        fail(f"{model_dir.name} needs {needed / GIB:.1f} GiB for its weights in {quantize or str(dtype)[6:]} on {device}, "
             f"but {available / GIB:.1f} GiB is available; try a smaller model{smaller}")


@contextmanager
def without_weight_init():
    """Build fairscale's layers without initialising their weights: the checkpoint replaces them anyway.
    (fairscale fills each process's slice from a full-size "master" weight; on the meta device, with
    several processes, that copy from meta memory to the slice even fails.)"""
    original = fairscale_layers._initialize_affine_weight
    fairscale_layers._initialize_affine_weight = lambda *args, **kwargs: None
    try:
        yield
    finally:
        fairscale_layers._initialize_affine_weight = original


@contextmanager
def reading_checkpoint(model_dir):
    """Turns a damaged weights file into a one-line hint, and hides llama-models' use of a deprecated API."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*set_default_tensor_type")
            yield
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        fail(f"a weights file in {model_dir} is damaged ({str(error).splitlines()[0][:120]}); re-download it, "
             f"or check it with: llama-model verify-download --model-id {model_dir.name}")


def check_weights(model, weights, model_dir):
    """Every tensor the model expects, with the shape params.json implies, and nothing else."""
    expected = model.state_dict()  # on the meta device: names and shapes only
    for name in sorted(expected.keys() | weights.keys()):
        if name not in weights:
            fail(f"the weights in {model_dir} lack {name} (shape {tuple(expected[name].shape)}): they do not match params.json")
        if name not in expected:
            fail(f"the weights in {model_dir} have an unexpected tensor {name}: they do not match params.json")
        if weights[name].shape != expected[name].shape:
            fail(f"{name} in {model_dir} has shape {tuple(weights[name].shape)}, but params.json implies "
                 f"{tuple(expected[name].shape)}: the weights and params.json do not match")


def check_finite(logits, dtype):
    if not torch.isfinite(logits).all():
        hint = "float16 overflows on Llama: use DTYPE=bfloat16 or float32" if dtype == torch.float16 else \
            "the weights may be damaged: re-download them, or try DTYPE=float32"
        fail(f"the model produced NaN or infinite scores in {str(dtype)[6:]} on {logits.device}; {hint}")


def peak_memory_gib(device):
    """Peak memory of this process: resident memory on a CPU, allocated tensors on a GPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    if sys.platform == "darwin":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / GIB  # bytes on macOS
    # Linux: this process's own peak (ru_maxrss would count the peak of the process that launched it)
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 2**20  # KiB


def run(main):
    """Run a script's main: Ctrl-C stops cleanly (status 130), an unexpected error is one line."""
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        if os.environ.get("DEBUG") == "1":
            raise
        first_line = (str(error).splitlines() or [""])[0]
        sys.exit(f"error: {type(error).__name__}: {first_line} (set DEBUG=1 to see where)")
