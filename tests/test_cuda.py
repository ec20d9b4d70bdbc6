"""On an NVIDIA GPU (skipped elsewhere): the scripts print on cuda what they print on the CPU, bfloat16 agrees
with transformers on the same GPU, tied weights stay one tensor, and the platform decisions hold for this
GPU. benchmarks/gpu_check.sh runs these and the benchmark in one command."""

import pytest
import torch

import run_inference
from support import devices
from conftest import SCRIPTS, load, run_script
from hf_reference import transformers_llama
from standin.random_checkpoint import TINY, random_weights, write_checkpoint
from test_independent import BF16_TOLERANCE, random_prompt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (benchmarks/gpu_check.sh)")
CUDA = torch.device("cuda:0")


@pytest.mark.parametrize("settings", [{}, {"SPEEDUPS": 0}, {"BEAM_WIDTH": 3}, {"QUANTIZE": "int8"}],
                         ids=["greedy", "speedups-off", "beam", "int8"])
@pytest.mark.parametrize("script_name", SCRIPTS)
def test_cuda_prints_the_cpu_text(script_name, settings, models_dir, confident_dir):
    if script_name == "minimal_run_inference.py" and "BEAM_WIDTH" in settings:
        pytest.skip("beam search is in run_inference.py only")
    folder, dtype = (confident_dir, "bfloat16") if "QUANTIZE" in settings else (models_dir, "float32")
    runs = [run_script(script_name, folder, "Tiny", DEVICE=device, DTYPE=dtype, MAX_NEW_TOKENS=16, **settings)
            for device in ("cpu", "cuda")]
    assert runs[1].returncode == 0, runs[1].stderr
    assert runs[1].stdout == runs[0].stdout != ""
    assert "(CUDA tensors)" in runs[1].stderr


def test_bfloat16_on_cuda_matches_transformers_on_cuda(script, distributed, models_dir, tokenizer):
    """As test_independent's bfloat16 check on the CPU: every position of a 64-token prompt, one token at a time."""
    ids = random_prompt(tokenizer, 64, seed=8)
    hf_model = transformers_llama(models_dir / "Tiny", dtype=torch.bfloat16).to(CUDA)
    with torch.inference_mode():
        expected = hf_model(torch.tensor([ids], device=CUDA)).logits[0].float().cpu()
    model = load(script, models_dir / "Tiny", len(ids), torch.bfloat16, device=CUDA)
    ours = torch.stack([model(torch.tensor([[token]], device=CUDA), start_pos=position)[0, -1].float().cpu()
                        for position, token in enumerate(ids)])
    assert (ours - expected).abs().max() < BF16_TOLERANCE * expected.abs().max().item()


def test_tied_weights_are_copied_to_the_gpu_once(tmp_path, distributed):
    folder = write_checkpoint(tmp_path / "Tied", TINY, random_weights(TINY, tie_embeddings=True))
    model = load(run_inference, folder, 8, torch.bfloat16, device=CUDA)
    assert model.output.layer.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    assert model.output.layer.weight.device.type == "cuda"


def test_auto_dtype_follows_this_gpus_compute_capability():
    capability = torch.cuda.get_device_capability(CUDA)
    expected = torch.bfloat16 if capability >= devices.BF16_CAPABILITY else torch.float16
    assert devices.pick_dtype("auto", CUDA) == expected
