"""What the look inside costs (run_inference.look_inside, and the picture), against one prefill of the same prompt,
on a random checkpoint with Llama 3.2 1B's exact shapes (bf16, the fast path on, as the tutorial runs).

    python benchmarks/bench_look_inside.py                  # about 3 minutes on 2 cores, after the checkpoint
    python benchmarks/bench_look_inside.py --tokens 1024 --rounds 2 --checkpoint-dir /tmp/checkpoints

Three things take turns, round after round (this machine's speed drifts), and each is reported as its median
and as a multiple of the prefill's median in the same run:
  prefill           the prompt through the model, in chunks of PREFILL_CHUNK (what generation starts with)
  look (script)     look_inside at the positions the script shows: the prompt's last LOOK_INSIDE_POSITIONS
  look (every one)  look_inside(first=0): every position; the lens applies the output layer once per layer
                    and position, which a prefill does once per prompt
  picture           draw_look_inside and save_picture, from the script's look (matplotlib, Pillow)
The checkpoint is bench_decode.py's (written once into --checkpoint-dir, 2.5 GB). The kernels are speedups'
fixed rule (KERNELS=rule), so that no trial of another thread count runs between the things compared.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_decode import CHECKPOINT_DIR, CHECKPOINT_NAME, DTYPE, ensure_checkpoint, prompt_ids  # puts the scripts
from llama_models.llama3.tokenizer import Tokenizer  # on the path, and the tests' helpers

import run_inference
from support import checkpoint, devices, picture


def timed(work):
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def measure(model, tokenizer, ids, rounds, folder):
    """{what: [seconds per round]}."""
    layer = run_inference.shown_layer(len(model.layers))
    first = max(0, len(ids) - run_inference.LOOK_INSIDE_POSITIONS)
    path = Path(folder) / "look.png"
    looks = {}

    def draw():
        picture.save(picture.draw_look_inside(looks["script"], tokenizer, ids, layer), path)

    work = {"prefill": lambda: run_inference.prefill(model, ids),
            "look (script)": lambda: looks.update(script=run_inference.look_inside(model, ids, layer, first)),
            "look (every one)": lambda: run_inference.look_inside(model, ids, layer, 0),
            "picture": draw}
    times = {name: [] for name in work}
    for round_ in range(rounds):
        for name, step in work.items():
            times[name].append(timed(step))
            print(f"[{round_ + 1}/{rounds}] {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=256, help="prompt tokens (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default %(default)s)")
    parser.add_argument("--checkpoint-dir", type=Path, default=CHECKPOINT_DIR, help="default %(default)s")
    args = parser.parse_args()
    model_dir = args.checkpoint_dir / CHECKPOINT_NAME
    ensure_checkpoint(model_dir)
    device = torch.device("cpu")
    devices.init_distributed(device)
    ids = prompt_ids(model_dir, args.tokens)
    params = checkpoint.read_params(model_dir)
    model = run_inference.load_model(model_dir, params, device, DTYPE, len(ids), 1, kernels="rule")
    with tempfile.TemporaryDirectory() as folder:
        times = measure(model, Tokenizer(model_dir / "tokenizer.model"), ids, args.rounds, folder)
    prefill = statistics.median(times["prefill"])
    print(f"| {len(ids)}-token prompt, 1B shapes, {torch.get_num_threads()} threads | median s | x prefill |")
    print("|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {statistics.median(seconds):.2f} | {statistics.median(seconds) / prefill:.2f} |")
    devices.close_distributed()


if __name__ == "__main__":
    main()
