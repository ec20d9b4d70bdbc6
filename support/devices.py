"""Where the model runs: the device, the number format and the threads, and the process groups that
llama-models' fairscale layers need, for one process or for several under torchrun.

The decisions that depend on the platform are pure functions of the facts they need (choose_device,
choose_dtype, threads_per_process, choose_backend), so that tests on one Linux CPU can check what happens
on a GPU, a Mac or under torchrun.
"""

import os
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist

from support.exits import fail
from support.torchrun import local_processes, local_rank, processes

BF16_CAPABILITY = (8, 0)  # NVIDIA GPUs compute in bfloat16 natively from Ampere (compute capability 8.0) on
DTYPES = ("bfloat16", "float16", "float32")
DEVICE_KINDS = {"cpu": "CPUs", "cuda": "NVIDIA GPUs", "mps": "Apple GPUs"}  # torch's device types, in words


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
    world_size = processes()[0]
    return torch.device(choose_device(name, cuda_count, has_mps, world_size, local_rank()))


def choose_dtype(name, device_type, capability=None):
    """"auto" is bfloat16, the format of Meta's weights, except on NVIDIA GPUs that only emulate it (compute
    capability below 8.0: T4, V100, ...), where float16 is the fast 16-bit format."""
    if name == "auto":
        emulated = device_type == "cuda" and capability is not None and tuple(capability) < BF16_CAPABILITY
        name = "float16" if emulated else "bfloat16"
    if name not in DTYPES:
        fail(f"DTYPE={name!r} is not supported; choose one of: auto, {', '.join(DTYPES)}")
    return name


def pick_dtype(name, device):
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None  # asks this GPU only
    return getattr(torch, choose_dtype(name, device.type, capability))


def dtype_name(dtype):
    """torch.bfloat16 -> "bfloat16", as DTYPE spells it."""
    return str(dtype).removeprefix("torch.")


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
