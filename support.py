"""What both scripts need that is not about the model: settings from the environment, the device, number
format and threads, checks of the checkpoint and of the user's input, and errors a person can act on.

Every check stops the script with one line on stderr that says what is wrong and what to do, and a
non-zero exit status. Set DEBUG=1 to see the traceback of an unexpected error instead.

Decisions that depend on the platform (which device, which number format, how many threads) are pure
functions of the facts they need (choose_device, choose_dtype, threads_per_process), so that tests on one
Linux CPU can check what happens on a GPU, a Mac or under torchrun.
"""

import difflib
import errno
import json
import math
import os
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import fairscale.nn.model_parallel.initialize as fs_init
import fairscale.nn.model_parallel.layers as fairscale_layers
import torch
import torch.distributed as dist
from llama_models.llama3.tokenizer import Tokenizer

LLAMA_3_VOCAB_SIZE = 128256  # every Llama 3.x model; Llama 2 has 32,000 (or -1), Llama 4 202,048
REQUIRED_PARAMS = ("dim", "n_layers", "n_heads", "vocab_size")
CONTEXT_LENGTH = 131072  # Llama 3.1, 3.2 and 3.3 (use_scaled_rope: true)
CONTEXT_LENGTH_LLAMA_3_0 = 8192  # Llama 3 (no RoPE scaling)
SUPPORTED = "text-only Llama 3.x checkpoints in Meta's format (3.1 8B/70B/405B, 3.2 1B/3B, 3.3 70B)"
HUB_FOLDER = "original"  # where the Hugging Face Hub's Llama 3.x repositories keep Meta's files
BF16_CAPABILITY = (8, 0)  # NVIDIA GPUs compute in bfloat16 natively from Ampere (compute capability 8.0) on
GIB = 2**30
ERROR_DETAIL_CHARS = 120  # a library's message quoted in ours is cut at a word boundary before this

# The numeric settings of both scripts and their ranges (lowest, highest; None: unbounded), and the
# settings that take one of a few values. A script checks the ones it has.
RANGES = {"MAX_NEW_TOKENS": (1, None), "PREFILL_CHUNK": (1, None), "BEAM_WIDTH": (1, None),
          "TEMPERATURE": (0.0, None), "LENGTH_PENALTY": (None, None), "SHOWN_ALTERNATIVES": (0, LLAMA_3_VOCAB_SIZE - 1)}
CHOICES = {"QUANTIZE": ("", "int8", "int4"), "SPEEDUPS": (0, 1), "SHOW_TOKENS": (0, 1), "CHAT": (0, 1),
           "LOOK_INSIDE": (0, 1)}


# ---------------------------------------------------------------------------------------------------------
# Errors, and how a script ends.
# ---------------------------------------------------------------------------------------------------------
def fail(message):
    raise SystemExit(f"error: {message}")


def run(main):
    """Run a script's main: Ctrl-C stops cleanly (status 130), a reader that closes the pipe (| head) ends
    generation quietly, and an unexpected error is one line. Under torchrun only rank 0 prints; another
    rank's error is still shown, marked with its rank."""
    world_size, rank = processes()
    write_utf8()
    if rank != 0:  # every process computes the same tokens: one prints them
        sys.stdout = sys.stderr = open(os.devnull, "w")
    elif world_size > 1:
        sys.stdout = OutputToClosedPipe(sys.stdout)
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit as stop:  # fail(): one line, which another rank marks with its number
        if rank != 0 and isinstance(stop.code, str):
            exit_with(f"[rank {rank}] {stop.code}")
        raise
    except Exception as error:
        if isinstance(error, OSError) and closed_pipe(error):  # stdout's reader is gone: stop, as `yes | head` does
            write_nowhere()
            sys.exit(0)
        if os.environ.get("DEBUG") == "1":
            raise
        first_line = (str(error).splitlines() or [""])[0]
        exit_with(f"{f'[rank {rank}] ' if rank else ''}error: {type(error).__name__}: {first_line} (set DEBUG=1 to see where)")


def exit_with(message):
    """One line on the real stderr (another rank's sys.stderr writes nowhere), exit status 1."""
    print(message, file=sys.__stderr__, flush=True)
    sys.exit(1)


def closed_pipe(error):
    """Whether a write failed because the reader closed the pipe (Windows reports EINVAL for it)."""
    return isinstance(error, BrokenPipeError) or (sys.platform == "win32" and error.errno == errno.EINVAL)


def write_nowhere():
    """Point stdout's file descriptor at the null device, so that Python's final flush does not fail too."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())


class OutputToClosedPipe:
    """Rank 0's stdout under torchrun: when the reader closes the pipe, generation goes on without output,
    because the other processes wait for rank 0 in every layer's collectives."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except OSError as error:
            if not closed_pipe(error):
                raise
            write_nowhere()
            self.stream = open(os.devnull, "w", encoding="utf-8")
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except OSError as error:
            if not closed_pipe(error):
                raise

    def __getattr__(self, name):
        return getattr(self.stream, name)


def write_utf8():
    """Generated text goes out as UTF-8 whatever the locale: Windows encodes redirected output in its code
    page, where Chinese text or an emoji would raise UnicodeEncodeError. (stderr replaces what it cannot encode.)"""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    if encoding.lower().replace("-", "") != "utf8" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")


def shorten(text, limit=ERROR_DETAIL_CHARS):
    """The first line of `text`, cut at a word boundary so that it fits `limit` characters."""
    line = (text.splitlines() or [""])[0]
    if len(line) <= limit:
        return line
    return line[: limit - 3].rsplit(" ", 1)[0] + "..."


# ---------------------------------------------------------------------------------------------------------
# Settings.
# ---------------------------------------------------------------------------------------------------------
def apply_settings(settings):
    """Override each UPPERCASE str/int/float global of a script by the environment variable of that name,
    then check every setting the script has against RANGES and CHOICES."""
    for name, default in list(settings.items()):
        text = os.environ.get(name)
        if not name.isupper() or text is None or type(default) not in (str, int, float):
            continue
        try:
            settings[name] = type(default)(text)
        except ValueError:
            fail(f"{name}={text!r} is not a valid {type(default).__name__} (the default is {default!r})")
    for name, (low, high) in RANGES.items():
        if name in settings:
            check_range(name, settings[name], low, high)
    for name, choices in CHOICES.items():
        if name in settings and settings[name] not in choices:
            fail(f"{name}={settings[name]!r} is not supported; choose one of: {', '.join(map(repr, choices))}")
    if settings.get("QUANTIZE") and not settings.get("SPEEDUPS", 1):
        fail(f"QUANTIZE={settings['QUANTIZE']!r} needs SPEEDUPS=1: 8- and 4-bit weights live in speedups.py")


def check_range(name, value, low=None, high=None):
    """A numeric setting must be a finite number in [low, high] (None: no bound)."""
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = [f"at least {low}"] * (low is not None) + [f"at most {high}"] * (high is not None)
        fail(f"{name}={value} is out of range: it must be {' and '.join(bounds) or 'a finite number'}")


def read_prompt(input_string, input_file):
    """The prompt: INPUT_FILE's text when it is set, else INPUT_STRING."""
    if not input_file:
        return input_string
    path = Path(input_file).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else error.strerror or type(error).__name__
        fail(f"INPUT_FILE={input_file!r} cannot be read ({reason}); give a UTF-8 text file, or unset INPUT_FILE")


# ---------------------------------------------------------------------------------------------------------
# Processes, device, number format, threads.
# ---------------------------------------------------------------------------------------------------------
def processes():
    """How many processes torchrun started together (1 without torchrun), and this one's rank."""
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))


def local_processes():
    """How many of them run on this machine."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def choose_device(name, cuda_count, has_mps, world_size, local_rank):
    """The device name for DEVICE=`name`, given what this machine has. "auto" prefers cuda, then mps (for
    one process only: torch.distributed has no backend for Apple GPUs), then cpu. Under torchrun "cuda"
    means this process's local rank's GPU, and an explicit index is refused (every rank would share it)."""
    available = [f"cuda:{i}" for i in range(cuda_count)] + (["mps"] if has_mps else []) + ["cpu"]
    if name == "auto":
        name = "cuda" if cuda_count else "mps" if has_mps and world_size == 1 else "cpu"
    if name == "mps" and world_size > 1:
        fail(f"DEVICE=mps cannot be split across {world_size} processes (torch.distributed has no backend for "
             "Apple GPUs): run one process, or use DEVICE=cpu under torchrun")
    if name.startswith("cuda:") and world_size > 1:
        fail(f"DEVICE={name!r} would put all {world_size} processes on one GPU: under torchrun use DEVICE=cuda "
             "(each process takes the GPU of its local rank; CUDA_VISIBLE_DEVICES chooses which GPUs)")
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name not in available:
        fail(f"DEVICE={name!r} is not available here; choose one of: auto, {', '.join(available)}")
    return name


def pick_device(name):
    cuda_count = torch.cuda.device_count()
    has_mps = torch.backends.mps.is_available()
    return torch.device(choose_device(name, cuda_count, has_mps, processes()[0], int(os.environ.get("LOCAL_RANK", 0))))


def choose_dtype(name, device_type, capability=None):
    """"auto" is bfloat16, the format of Meta's weights, except on NVIDIA GPUs that only emulate it (compute
    capability below 8.0: T4, V100, ...), where float16 is the fast 16-bit format."""
    if name == "auto":
        emulated = device_type == "cuda" and capability is not None and tuple(capability) < BF16_CAPABILITY
        name = "float16" if emulated else "bfloat16"
    if name not in ("bfloat16", "float16", "float32"):
        fail(f"DTYPE={name!r} is not supported; choose one of: auto, bfloat16, float16, float32")
    return name


def pick_dtype(name, device):
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None  # asks this GPU only
    return getattr(torch, choose_dtype(name, device.type, capability))


def threads_per_process(omp_num_threads, local_processes, physical_cores):
    """Threads for each process on a CPU, or None to keep PyTorch's choice. torchrun sets OMP_NUM_THREADS=1
    for every process unless the user set it, leaving all but one core per process idle: then (and for a
    user's 1, which cannot be told apart) each process gets its share of the physical cores."""
    if local_processes > 1 and omp_num_threads == "1":
        return max(1, physical_cores // local_processes)
    return None


def physical_cores():
    """Physical cores this process may run on: hyper-threads share a core's memory bandwidth and arithmetic
    units. Linux: the CPUs of this process's affinity (taskset, containers), one per core; elsewhere, the
    logical CPUs (twice the cores where there are hyper-threads)."""
    if not hasattr(os, "sched_getaffinity"):
        return os.cpu_count() or 1
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            cores.add(("cpu", cpu))
    return max(1, len(cores))


def set_threads(device):
    """Under torchrun on CPUs, give each process its share of the cores (see threads_per_process)."""
    threads = threads_per_process(os.environ.get("OMP_NUM_THREADS"), local_processes(), physical_cores())
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)


def init_distributed(device):
    """Join torchrun's process group, or start a group of one process; then fairscale's model parallelism
    over all of them (run_inference.py explains both). On CPUs under torchrun, each process then gets its
    share of the cores."""
    backend = choose_backend(device.type, dist.is_nccl_available(), processes()[0])
    if device.type == "cuda":
        torch.cuda.set_device(device)  # this process's GPU
    if "RANK" in os.environ:  # started by torchrun: its environment says where the others are
        dist.init_process_group(backend)
    else:  # one process: a store in memory, no launcher, no network port
        dist.init_process_group(backend, store=one_process_store(), rank=0, world_size=1)
    with redirect_stdout(sys.stderr):  # fairscale prints; stdout is for generated text only
        fs_init.initialize_model_parallel(dist.get_world_size())  # model-parallel size = processes
    set_threads(device)


def choose_backend(device_type, has_nccl, world_size):
    """nccl between NVIDIA GPUs, gloo between CPUs. One process runs no collective, so a CUDA build without
    nccl (Windows) can use gloo there; several processes on GPUs need nccl (gloo cannot all_gather them)."""
    if device_type == "cuda" and has_nccl:
        return "nccl"
    if device_type == "cuda" and world_size > 1:
        fail("this PyTorch build has no nccl backend (Windows builds have none), which torchrun on GPUs needs: "
             "run one process per machine, or use Linux")
    return "gloo"


def close_distributed():
    """Stop the groups' threads while Python is whole: left to the interpreter's shutdown, a gloo worker now
    and then frees a finished collective's tensors too late and aborts a finished torchrun run.
    destroy_process_group alone is not enough: fairscale keeps its own references to its three groups."""
    fs_init.destroy_model_parallel()
    dist.destroy_process_group()


def one_process_store():
    """The rendezvous store of a one-process group: a dictionary in memory (HashStore), or on Windows,
    whose PyTorch builds have none, a temporary file (which the store deletes when the group is gone)."""
    if hasattr(dist, "HashStore"):
        return dist.HashStore()
    descriptor, path = tempfile.mkstemp(prefix="llama-store-")
    os.close(descriptor)
    return dist.FileStore(path, 1)


# ---------------------------------------------------------------------------------------------------------
# The checkpoint.
# ---------------------------------------------------------------------------------------------------------
def find_checkpoint(models_dir, model_name):
    """The folder holding the checkpoint's files, after checking that it holds what `llama-model download`
    puts there. A model folder from the Hugging Face Hub keeps Meta's files in original/: that works too."""
    models_dir = Path(models_dir).expanduser()
    model_dir = models_dir / model_name
    download = (f"download it with: llama-model download --source meta --model-id {model_name} "
                f"(or from the Hugging Face Hub: huggingface-cli download meta-llama/REPO --include \"{HUB_FOLDER}/*\" "
                f"--local-dir {model_dir})")
    if not model_dir.is_dir():
        found = sorted({model_name_of(p.parent) for p in [*models_dir.glob("*/params.json"),
                                                          *models_dir.glob(f"*/{HUB_FOLDER}/params.json")]},
                       key=lambda name: -difflib.SequenceMatcher(None, name, model_name).ratio())
        where = f"checkpoints in {models_dir}: {', '.join(found)}" if found else f"no checkpoints in {models_dir}"
        fail(f"{model_dir} not found ({where}); {download}")
    if not (model_dir / "params.json").exists() and (model_dir / HUB_FOLDER / "params.json").exists():
        model_dir = model_dir / HUB_FOLDER
    for name in ("params.json", "tokenizer.model"):
        if not (model_dir / name).is_file():
            fail(f"{model_dir / name} not found: the download is incomplete; {download}")
    if not weight_files(model_dir):
        fail(f"no weights (consolidated.00.pth) in {model_dir}: the download is incomplete; {download}")
    return model_dir


def model_name_of(model_dir):
    """The model's folder name, also when its files sit in the Hub's original/ subfolder."""
    return model_dir.parent.name if model_dir.name == HUB_FOLDER else model_dir.name


def weight_files(model_dir):
    """The checkpoint's shards, consolidated.00.pth, consolidated.01.pth, ..."""
    return sorted(model_dir.glob("consolidated.*.pth"))


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


def check_job(model_dir, params, prompt_length, max_new_tokens, dtype, device, quantize, sequences=1):
    """Before loading anything: the text fits the context, the shards fit the processes, the weights and the
    KV cache (for `sequences` sequences of prompt + new tokens) fit memory."""
    if quantize == "int4" and device.type != "cpu":
        fail(f"QUANTIZE='int4' runs on CPUs only (PyTorch's 4-bit kernels differ per device); on {device.type} use int8")
    check_length(prompt_length, max_new_tokens, params)
    check_shards(model_dir, params)
    check_memory(model_dir, dtype, device, quantize, kv_cache_bytes(params, sequences, prompt_length + max_new_tokens, dtype))


def check_length(prompt_length, max_new_tokens, params):
    """Prompt + new tokens must fit in the context the model was trained for."""
    limit = context_length(params)
    if prompt_length + max_new_tokens > limit:
        fail(f"the prompt ({prompt_length} tokens) + MAX_NEW_TOKENS ({max_new_tokens}) exceeds the model's "
             f"context of {limit} tokens; shorten the prompt or lower MAX_NEW_TOKENS")


def kv_cache_bytes(params, sequences, positions, dtype):
    """Keys and values for every layer, sequence and position: this process's key-value heads only."""
    kv_heads = params.get("n_kv_heads", params["n_heads"]) / processes()[0]
    head_dim = params["dim"] // params["n_heads"]
    return 2 * params["n_layers"] * sequences * positions * kv_heads * head_dim * dtype.itemsize


def context_length(params):
    return CONTEXT_LENGTH if params.get("use_scaled_rope") else CONTEXT_LENGTH_LLAMA_3_0


def check_shards(model_dir, params):
    """The checkpoint's shards must split or merge evenly onto the processes, and so must the heads."""
    shards, world_size = len(weight_files(model_dir)), processes()[0]
    if shards % world_size and world_size % shards:
        fail(f"{model_dir} has {shards} shards, which cannot be split or merged onto {world_size} processes: "
             f"run a number of processes that divides {shards} or is a multiple of it")
    kv_heads = params.get("n_kv_heads", params["n_heads"])
    if kv_heads % world_size:
        fail(f"{model_dir.name} has {kv_heads} key-value heads, which cannot be split across {world_size} processes: "
             "use a number of processes that divides it")


def memory_needed(checkpoint_bytes, bits, shards, world_size, local_processes, on_cpu):
    """(bytes of host memory, bytes of device memory) the weights need in one process's machine and device.
    Each process holds its 1/world_size slice, in `bits` per weight (the files hold 16). On a CPU the slice
    is the memory-mapped file when shards == processes; otherwise llama-models copies its shards into
    memory to merge or split them, in every process on the machine, before anything moves to a GPU."""
    slice_bytes = checkpoint_bytes * bits / 16 / world_size
    file_slice = checkpoint_bytes / world_size
    host = file_slice * local_processes if shards != world_size else 0
    if on_cpu:
        return max(host, slice_bytes * local_processes), 0
    return host, slice_bytes


def check_memory(model_dir, dtype, device, quantize="", cache_bytes=0):
    """Refuse to start a load that cannot fit, in host memory and, on a GPU, in the GPU's memory."""
    files = weight_files(model_dir)
    checkpoint_bytes = sum(path.stat().st_size for path in files)
    bits = {"int8": 8, "int4": 5}.get(quantize, torch.finfo(dtype).bits)  # int4: 4 bits + a scale and offset per 32
    host, on_device = memory_needed(checkpoint_bytes, bits, len(files), processes()[0], local_processes(),
                                    device.type == "cpu")
    if device.type == "cpu":
        host += cache_bytes * local_processes()
    else:
        on_device += cache_bytes
    smaller = (" or DTYPE=bfloat16" if dtype == torch.float32 else
               " or QUANTIZE=int8 or int4" if not quantize and device.type == "cpu" else "")
    what = f"{model_name_of(model_dir)} needs {{:.1f}} GiB for its weights in {quantize or str(dtype)[6:]} and its KV cache"
    available = host_memory_available()
    if host > available:
        fail(f"{what.format(host / GIB)} in this machine's memory, but {available / GIB:.1f} GiB is available; "
             f"try a smaller model{smaller}, or a shorter context")
    if on_device > device_memory_available(device):
        fail(f"{what.format(on_device / GIB)} on {device}, but {device_memory_available(device) / GIB:.1f} GiB is "
             f"available there; try a smaller model{smaller}, or a shorter context")


def host_memory_available():
    """Memory the operating system can hand out without swapping (Linux, Windows), or the total (macOS)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        return int(meminfo.read_text().split("MemAvailable:")[1].split()[0]) * 1024
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return windows_memory_available()


def windows_memory_available():
    import ctypes  # GlobalMemoryStatusEx: Windows has neither /proc nor sysconf's page counts

    class MemoryStatus(ctypes.Structure):
        _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong), ("total", ctypes.c_ulonglong),
                    ("available", ctypes.c_ulonglong), *((f"other{i}", ctypes.c_ulonglong) for i in range(5))]

    status = MemoryStatus(length=ctypes.sizeof(MemoryStatus))
    ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status))
    return status.available


def device_memory_available(device):
    """Free memory on a GPU; for Apple GPUs, Metal's recommended limit for one process."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return torch.mps.recommended_max_memory()
    return math.inf


# ---------------------------------------------------------------------------------------------------------
# Building and loading the model.
# ---------------------------------------------------------------------------------------------------------
class MetaTensors:
    """Stands in for the torch module inside fairscale's layers while they are built: their legacy
    torch.Tensor(rows, cols) ignores the meta device and allocates float32 memory, which Linux and macOS
    never back with pages but Windows commits (30 GB for the 8B model). Here it makes meta tensors."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def Tensor(*shape):
        return torch.empty(*shape, device="meta")


@contextmanager
def without_weight_init():
    """Build fairscale's layers with weights of a shape and no memory, and without initialising them: the
    checkpoint replaces them anyway. (fairscale fills each process's slice from a full-size "master"
    weight; on the meta device, with several processes, that copy even fails.)"""
    original_init, original_torch = fairscale_layers._initialize_affine_weight, fairscale_layers.torch
    fairscale_layers._initialize_affine_weight = lambda *args, **kwargs: None
    fairscale_layers.torch = MetaTensors()
    try:
        yield
    finally:
        fairscale_layers._initialize_affine_weight, fairscale_layers.torch = original_init, original_torch


@contextmanager
def reading_checkpoint(model_dir):
    """Around llama-models' maybe_reshard_state_dict: its printing goes to stderr (stdout is for generated
    text), the default dtype it sets (bfloat16, through a deprecated API, which warns) is undone, and a
    damaged weights file becomes a one-line hint."""
    try:
        with warnings.catch_warnings(), redirect_stdout(sys.stderr):
            warnings.filterwarnings("ignore", message=".*set_default_tensor_type")
            yield
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        fail(f"a weights file in {model_dir} is damaged ({shorten(str(error))}); re-download it, "
             f"or check it with: llama-model verify-download --model-id {model_name_of(model_dir)}")
    finally:
        torch.set_default_dtype(torch.float32)


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


def tie_weights(model):
    """Llama 3.2 stores its output layer and its embedding table once. load_state_dict(assign=True) makes
    them two parameters over the same memory, which model.to() would copy twice: make them one."""
    embeddings, output = model.tok_embeddings.weight, model.output.weight
    if embeddings.data_ptr() == output.data_ptr() and embeddings.shape == output.shape:
        model.output.weight = embeddings


# ---------------------------------------------------------------------------------------------------------
# During and after generation.
# ---------------------------------------------------------------------------------------------------------
def check_finite(logits, dtype):
    if not torch.isfinite(logits).all():
        hint = "float16 overflows on Llama: use DTYPE=bfloat16 or float32" if dtype == torch.float16 else \
            "the weights may be damaged: re-download them, or try DTYPE=float32"
        fail(f"the model produced NaN or infinite scores in {str(dtype)[6:]} on {logits.device}; {hint}")


class Timer:
    """When generation started and when each new token came, so that the prompt's pass and the decoding
    are reported apart (one rate for both would hide a slow long prompt or a fast decoder)."""

    def __init__(self):
        self.start, self.marks = time.perf_counter(), []

    def tokens(self, token_ids):
        """The token ids, passed on as each one's time is noted."""
        for token_id in token_ids:
            self.marks.append(time.perf_counter())
            yield token_id

    def report(self, prompt_tokens, new_tokens, device):
        """The speed and the memory, on stderr."""
        line = f"\n{prompt_tokens} prompt + {new_tokens} new tokens in {time.perf_counter() - self.start:.1f} s"
        if len(self.marks) > 1:
            decoding = (len(self.marks) - 1) / (self.marks[-1] - self.marks[0])
            line += f" (the prompt and the first token {self.marks[0] - self.start:.1f} s, then {decoding:.2f} tokens/s)"
        print(line, file=sys.stderr)
        print(memory_line(device), file=sys.stderr)


def memory_line(device):
    """Peak memory of this process: resident memory on a CPU, allocated tensors on a GPU."""
    if device.type == "cuda":
        return f"peak memory {torch.cuda.max_memory_allocated(device) / GIB:.2f} GiB (CUDA tensors)"
    if device.type == "mps":  # resident memory there is mostly the mapped checkpoint; Metal keeps no peak
        return f"memory {torch.mps.driver_allocated_memory() / GIB:.2f} GiB (allocated by Metal, now)"
    status = Path("/proc/self/status")
    if status.exists():  # Linux: this process's own peak (ru_maxrss would count its launcher's)
        return f"peak memory {int(status.read_text().split('VmHWM:')[1].split()[0]) / 2**20:.2f} GiB"
    if sys.platform == "darwin":
        import resource  # Unix only
        return f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / GIB:.2f} GiB"  # bytes on macOS
    return "peak memory not measured on this system"


class Progress:
    """One updating line on stderr for long work (converting weights), shown only when stderr is a
    terminal; it is erased when the work is done."""

    def __init__(self, label):
        self.label, self.start, self.width = label, time.perf_counter(), 0
        self.shown = sys.stderr.isatty()

    def __call__(self, done, total):
        if not self.shown:
            return
        line = f"{self.label} {done}/{total} ({time.perf_counter() - self.start:.0f} s)" if done < total else ""
        print(f"\r{line.ljust(self.width)}\r{line}", end="", file=sys.stderr, flush=True)  # spaces erase the last
        self.width = len(line)
