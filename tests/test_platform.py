"""The platform decisions in support/ (devices.py, memory.py), as pure functions of the facts they depend on
(device type, compute capability, processes, cores, operating system), so that this Linux CPU can check what
happens on a GPU, a Mac, Windows or under torchrun. What cannot run here (CUDA, mps, Windows) is reviewed,
not run: README says so."""


import pytest
import torch
import torch.distributed as dist
from llama_models.llama3.args import ModelArgs
from llama_models.llama3.model import Transformer

from support import checkpoint, devices, exits, memory
from standin.random_checkpoint import TINY

LLAMA_3_1_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                    ffn_dim_multiplier=1.3, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True)


@pytest.mark.parametrize("name, cuda, mps, processes, rank, expected", [
    ("auto", 2, False, 1, 0, "cuda:0"),
    ("auto", 0, True, 1, 0, "mps"),
    ("auto", 0, True, 2, 1, "cpu"),  # torchrun on a Mac: gloo has no backend for Apple GPUs
    ("auto", 0, False, 1, 0, "cpu"),
    ("cuda", 4, False, 4, 3, "cuda:3"),  # under torchrun, each process takes its local rank's GPU
    ("cuda:1", 2, False, 1, 0, "cuda:1"),
    ("cpu", 2, True, 1, 0, "cpu"),
])
def test_choose_device(name, cuda, mps, processes, rank, expected):
    assert devices.choose_device(name, cuda, mps, processes, rank) == expected


@pytest.mark.parametrize("name, cuda, mps, processes, message", [
    ("mps", 0, True, 2, "DEVICE=mps cannot be split across 2 processes"),
    ("cuda:1", 2, False, 2, "DEVICE='cuda:1' would put all 2 processes on one GPU"),
    ("cuda", 0, False, 1, "DEVICE='cuda:0' is not available here; choose one of: auto, cpu"),
    ("tpu", 1, False, 1, "DEVICE='tpu' is not available here; choose one of: auto, cuda:0, cpu"),
])
def test_devices_that_cannot_work_are_one_line(name, cuda, mps, processes, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        devices.choose_device(name, cuda, mps, processes, 0)


@pytest.mark.parametrize("name, device_type, capability, expected", [
    ("auto", "cpu", None, "bfloat16"),
    ("auto", "mps", None, "bfloat16"),
    ("auto", "cuda", (8, 0), "bfloat16"),  # A100 and newer: bfloat16 in hardware
    ("auto", "cuda", (9, 0), "bfloat16"),
    ("auto", "cuda", (7, 5), "float16"),  # T4: bfloat16 only emulated
    ("auto", "cuda", (7, 0), "float16"),  # V100
    ("bfloat16", "cuda", (7, 5), "bfloat16"),  # asked for: the user's choice
    ("float32", "cpu", None, "float32"),
])
def test_choose_dtype(name, device_type, capability, expected):
    assert devices.choose_dtype(name, device_type, capability) == expected


@pytest.mark.parametrize("omp, local_processes, cores, expected", [
    ("1", 2, 8, 4),  # torchrun's default for 2 processes on 8 cores
    ("1", 4, 2, 1),
    (None, 1, 8, None),  # one process: PyTorch's own choice
    ("3", 2, 8, None),  # the user's choice
    ("1", 1, 8, None),
])
def test_threads_per_process(omp, local_processes, cores, expected):
    assert devices.threads_per_process(omp, local_processes, cores) == expected


def test_set_threads_gives_each_torchrun_process_its_share(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(devices, "physical_cores", lambda: 6)
    before = torch.get_num_threads()
    try:
        devices.set_threads(torch.device("cpu"))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device_type, has_nccl, processes, expected", [
    ("cuda", True, 2, "nccl"), ("cuda", False, 1, "gloo"), ("cpu", True, 2, "gloo"), ("cpu", False, 1, "gloo")])
def test_choose_backend(device_type, has_nccl, processes, expected):
    assert devices.choose_backend(device_type, has_nccl, processes) == expected


def test_torchrun_on_gpus_without_nccl_is_one_line():
    with pytest.raises(SystemExit, match="this PyTorch build has no nccl backend"):
        devices.choose_backend("cuda", False, 2)


GB = 10**9


@pytest.mark.parametrize("bits, shards, processes, local, on_cpu, expected", [
    (16, 1, 1, 1, True, (16 * GB, 0)),  # the memory-mapped file itself
    (8, 1, 1, 1, True, (8 * GB, 0)),  # int8: converted from the mapped file, whose pages are let go
    (16, 8, 8, 8, False, (0, 2 * GB)),  # 70B-style: a shard per GPU, mapped, then copied to its GPU
    (16, 8, 4, 4, False, (16 * GB, 4 * GB)),  # 8 shards merged onto 4 GPUs: each process copies 2 in memory
    (16, 1, 2, 2, True, (16 * GB, 0)),  # 1 shard split onto 2 CPU processes: each copies its half
    (32, 1, 1, 1, False, (0, 32 * GB)),  # float32 on a GPU: twice the file there
])
def test_memory_needed(bits, shards, processes, local, on_cpu, expected):
    """(host memory, device memory) for a 16 GB checkpoint: Llama 3.1 8B's size, or a 70B slice's."""
    assert memory.memory_needed(16 * GB, bits, shards, processes, local, on_cpu) == pytest.approx(expected)


def test_building_the_model_allocates_nothing(distributed):
    """Under checkpoint.without_weight_init and the meta device, fairscale's layers (whose legacy
    torch.Tensor(rows, cols) ignores the meta device, and which Windows would commit: 30 GB for 8B) get
    meta weights too."""
    with torch.device("meta"), checkpoint.without_weight_init():
        model = Transformer(ModelArgs(**LLAMA_3_1_8B, max_seq_len=16, max_batch_size=1))
    assert all(parameter.is_meta for parameter in model.parameters())
    assert torch.Tensor(2, 3).device.type == "cpu"  # and torch itself is left as it was


def test_a_group_of_one_without_hashstore_uses_a_temporary_file(monkeypatch, tmp_path):
    """Windows builds of PyTorch have no HashStore: the one-process group's store is then a temporary file,
    which the store deletes when it is gone."""
    monkeypatch.delattr(dist, "HashStore")
    monkeypatch.setattr(devices.tempfile, "tempdir", str(tmp_path))
    store = devices.one_process_store()
    assert isinstance(store, dist.FileStore) and len(list(tmp_path.iterdir())) == 1
    store.set("key", "value")
    assert store.get("key") == b"value"
    del store
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("text, expected", [
    ("short message", "short message"),
    ("PytorchStreamReader failed reading zip archive: failed finding central directory " * 3,
     "PytorchStreamReader failed reading zip archive: failed finding central directory PytorchStreamReader failed "
     "reading..."),
    ("first line\nsecond line", "first line"),
])
def test_quoted_errors_are_cut_at_a_word(text, expected):
    assert exits.shorten(text) == expected
    assert len(exits.shorten(text)) <= exits.ERROR_DETAIL_CHARS


def test_the_kv_heads_must_split_across_the_processes(tmp_path, monkeypatch):
    """TINY has 2 key-value heads: 4 processes cannot share them (1 shard can be split 4 ways)."""
    from standin.random_checkpoint import random_weights, write_checkpoint
    folder = write_checkpoint(tmp_path / "Tiny", TINY, random_weights(TINY))
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit, match="Tiny has 2 key-value heads, which cannot be split across 4 processes"):
        checkpoint.check_shards(folder, TINY)
    monkeypatch.setenv("WORLD_SIZE", "2")
    checkpoint.check_shards(folder, TINY)  # 2 processes: one head each
