"""Whether the job fits, checked before anything is loaded: the text in the model's context, the shards
onto the processes, the format on the device, and the weights and the KV cache in memory; and how much
memory this machine, its GPU and this process have or had.
"""

import math
import os
import sys
from pathlib import Path

import torch

import speedups
from support.checkpoint import check_length, check_shards, model_name_of, weight_files
from support.devices import DEVICE_KINDS, dtype_name
from support.exits import fail
from support.torchrun import local_processes, processes

GIB = 2**30


def check_job(model_dir, params, prompt_length, max_new_tokens, dtype, device, quantize, sequences=1):
    """Before loading anything: the text fits the context, the shards fit the processes, the format runs on
    the device, the weights and the KV cache (for `sequences` sequences of prompt + new tokens) fit memory."""
    check_format(quantize, device)
    check_length(prompt_length, max_new_tokens, params)
    check_shards(model_dir, params)
    cache_bytes = kv_cache_bytes(params, sequences, prompt_length + max_new_tokens, dtype)
    check_memory(model_dir, dtype, device, quantize, cache_bytes)


def check_format(quantize, device):
    """QUANTIZE's format must have kernels on this device (speedups.FORMATS says where)."""
    devices = speedups.FORMATS[quantize].devices
    if device.type not in devices:
        where = " and ".join(DEVICE_KINDS.get(kind, kind) for kind in devices)
        fail(f"QUANTIZE={quantize!r} runs on {where} only (PyTorch's kernels for it differ per device); "
             f"on {device.type} use {' or '.join(formats_for(device)) or 'no QUANTIZE'}")


def formats_for(device):
    """The QUANTIZE formats with kernels on this device."""
    return [name for name, fmt in speedups.FORMATS.items() if name and device.type in fmt.devices]


def kv_cache_bytes(params, sequences, positions, dtype):
    """Keys and values for every layer, sequence and position: this process's key-value heads only."""
    kv_heads = params.get("n_kv_heads", params["n_heads"]) / processes()[0]
    head_dim = params["dim"] // params["n_heads"]
    return 2 * params["n_layers"] * sequences * positions * kv_heads * head_dim * dtype.itemsize


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
    bits = speedups.FORMATS[quantize].bits or torch.finfo(dtype).bits
    on_cpu = device.type == "cpu"
    host, on_device = memory_needed(checkpoint_bytes, bits, len(files), processes()[0], local_processes(), on_cpu)
    if on_cpu:
        host += cache_bytes * local_processes()
    else:
        on_device += cache_bytes
    smaller = ""
    if dtype == torch.float32:
        smaller = " or DTYPE=bfloat16"
    elif not quantize and formats_for(device):
        smaller = f" or QUANTIZE={' or '.join(formats_for(device))}"
    weights = quantize or dtype_name(dtype)
    what = f"{model_name_of(model_dir)} needs {{:.1f}} GiB for its weights in {weights} and its KV cache"
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


def peak_resident_bytes():
    """This process's peak resident memory, in bytes: Linux's VmHWM (ru_maxrss would count its launcher's),
    macOS's ru_maxrss; None elsewhere."""
    status = Path("/proc/self/status")
    if status.exists():
        return int(status.read_text().split("VmHWM:")[1].split()[0]) * 1024  # kB
    if sys.platform == "darwin":
        import resource  # Unix only
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    return None
