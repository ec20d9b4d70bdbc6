"""Measure decoding: both scripts (fast path on and off), beam search, 8- and 4-bit weights, transformers, the
original approach, and llama.cpp when you have it, on a random checkpoint with Llama 3.2 1B's exact shapes.

    python benchmarks/bench_decode.py                                   # the default set: about 30 minutes on 2 cores
    python benchmarks/bench_decode.py --only minimal,tutorial --depths 0 --rounds 1 --new-tokens 32
    python benchmarks/bench_decode.py --llama-bench ~/llama.cpp/build/bin/llama-bench \\
        --gguf /tmp/llama_cpp_peer/Llama3.2-1B-random-bf16.gguf,/tmp/llama_cpp_peer/Llama3.2-1B-random-q8_0.gguf
    python benchmarks/bench_decode.py --depths 0,1024,2048,3072,4096 --plot benchmarks/results/decode.png
    python benchmarks/bench_decode.py --only minimal,minimal-rule,minimal-speedups-off --prompt-tokens 512
    python benchmarks/bench_decode.py --only verify-cost,verify-cost-int8,verify-cost-int4 --rounds 3
    python benchmarks/bench_decode.py --only stand-in-summary,stand-in-summary-lookup,stand-in-summary-self-int4,\
stand-in-open,stand-in-open-lookup,stand-in-open-self-int4 --rounds 3

The checkpoint (bf16, tied output layer, the real tokenizer; 2.5 GB) is written once into --checkpoint-dir.
Random weights cost exactly what real ones cost to read; they only talk nonsense. Every (configuration,
depth) runs in a fresh process, so its peak memory is its own; the configurations take turns, round after
round, because this machine's speed drifts, and the report gives the median of the rounds. Compare ratios
within one run, never a number with one from another day. Depth: tokens of context before decoding
starts (0: a 16-token prompt). Decode tokens/s: new tokens 2..N over their time, one decode step each.
Prompt tokens/s: each script configuration also reads a --prompt-tokens prompt once per round (the prompt
and its first token over their time), beside llama-bench's prompt processing of as many tokens (ppN).

Speculative decoding (run_inference.py's DRAFT) runs on the SmolLM2-135M stand-in's real weights (standin/smollm.py
converts it once; random weights never agree with a draft), greedy, on two prompts: a text to summarise, whose
answer repeats it (prompt lookup's case), and an open-ended one. Its decode tokens/s count every new token over
the time after the prompt's pass; each row is paired with the plain run of the same prompt, and the report gives
the acceptance rate and tokens per verify pass. verify-cost times one forward pass of k + 1 tokens (a verify pass
with k drafts) against a one-token decode step on the 1B shapes, k = 1 .. MAX_VERIFY_DRAFTS, interleaved.
"""

import argparse
import ctypes
import importlib
import json
import platform
import statistics
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the scripts and the tests' helpers

import run_inference  # noqa: E402
from support import checkpoint, devices, memory  # noqa: E402
from support.memory import GIB  # noqa: E402
from llama_models.llama3.tokenizer import Tokenizer  # noqa: E402
from standin.random_checkpoint import LLAMA_3_2_1B, random_weights, write_checkpoint  # noqa: E402

CHECKPOINT_DIR = REPO / "benchmarks" / "checkpoints"  # git-ignored
CHECKPOINT_NAME = "Llama3.2-1B-random"  # a base model: the prompt is plain text
RESULTS_FILE = REPO / "benchmarks" / "results" / "latest.json"  # git-ignored
SHORT_PROMPT = 16  # tokens of the prompt at depth 0
DTYPE = torch.bfloat16
PROMPT_TEXT = ("The history of the city begins with a small fishing village on the banks of a wide river. Over "
               "the centuries, merchants built warehouses, bridges and markets, and the village grew into a port. ")
ACCURACY_TOKENS = 64  # the accuracy check's prompt: logits at each of its positions
ACCURACY_ORDER = ("float32", "bfloat16", "float16", "int8", "int4")
BANDWIDTH_BYTES = 2**30  # the array read by each bandwidth method
PEER_FORMATS = {"BF16": "bf16", "F16": "bf16", "Q8_0": "int8", "Q4_0": "int4"}  # llama.cpp's file type: ours
PEER_OF_FORMAT = {"bf16": ("minimal", "tutorial"), "int8": ("tutorial-int8",), "int4": ("tutorial-int4",), None: ()}
FORMAT_OF = {"minimal": "bf16", "tutorial": "bf16", "transformers": "bf16", "minimal-speedups-off": "bf16",
             "minimal-rule": "bf16", "minimal-small-pages": "bf16",
             "tutorial-int8": "int8", "tutorial-int4": "int4", "tutorial-busy-core-1-thread": "bf16",
             "tutorial-busy-core-2-threads": "bf16"}
# name: (what runs, its options, whether it is measured at every depth)
CONFIGURATIONS = {
    "minimal": ("script", dict(script="minimal_run_inference"), True),
    "tutorial": ("script", dict(script="run_inference"), True),
    "minimal-rule": ("script", dict(script="minimal_run_inference", kernels="rule"), True),  # KERNELS=rule
    "minimal-speedups-off": ("script", dict(script="minimal_run_inference", use_speedups=False), True),
    # the weights in 4 KiB pages: Linux's transparent huge pages switched off for the process (prctl)
    "minimal-small-pages": ("script", dict(script="minimal_run_inference", small_pages=True), True),
    "tutorial-beam5": ("script", dict(script="run_inference", beams=5), False),
    "tutorial-int8": ("script", dict(script="run_inference", quantize="int8"), True),
    "tutorial-int4": ("script", dict(script="run_inference", quantize="int4"), True),
    # another process keeps one core busy (a Python busy loop) while the tutorial decodes with 1 or 2 threads
    "tutorial-busy-core-1-thread": ("script", dict(script="run_inference", threads=1, busy=True), False),
    "tutorial-busy-core-2-threads": ("script", dict(script="run_inference", threads=2, busy=True), False),
    "transformers": ("transformers", dict(beams=1), True),
    "transformers-beam5": ("transformers", dict(beams=5), False),
    "original-fp32-recompute": ("original", {}, False),
    "accuracy": ("accuracy", {}, False),
    "bandwidth": ("bandwidth", {}, False),
    # a k-token verify pass against a one-token step, on the 1B shapes
    "verify-cost": ("verify", dict(quantize=""), False),
    "verify-cost-int8": ("verify", dict(quantize="int8"), False),
    "verify-cost-int4": ("verify", dict(quantize="int4"), False),
    # speculative decoding on the stand-in's real weights: each proposer, and plain decoding, on each prompt
    **{f"stand-in-{prompt}{'-' + draft if draft else ''}": (
        "script", dict(script="run_inference", stand_in=prompt, draft=draft), False)
       for prompt in ("summary", "open") for draft in ("", "lookup", "self-int4")},
}
PR_SET_THP_DISABLE = 41  # Linux's prctl option (linux/prctl.h)
MAX_VERIFY_DRAFTS = 8  # verify-cost: k = 1 .. this
VERIFY_REPEATS = 5  # verify-cost: each pass timed this many times, interleaved; the fastest counts
STAND_IN = "SmolLM2-135M"  # a base model: the prompts are plain text
STAND_IN_PROMPTS = {
    "summary": ("The old harbour of the town was built in 1820 to shelter fishing boats from the winter storms. "
                "In 1890 a railway line reached the harbour, and the fish market moved next to the station. "
                "After the second world war the fishing fleet shrank, and the harbour became a marina for "
                "sailing boats. Today the old fish market is a museum about the history of the harbour and the "
                "railway.\n\nQuestion: Summarise the history of the harbour in a few sentences.\nAnswer: The old "
                "harbour of the town"),
    "open": "Write a short story about a robot who learns to paint.\n\n",
}
PROMPT_CONFIGURATIONS = ("minimal", "tutorial", "minimal-rule", "minimal-speedups-off", "minimal-small-pages",
                         "tutorial-int8", "tutorial-int4")


# ---------------------------------------------------------------------------------------------------------
# What a child process runs: one configuration at one depth; it prints one JSON line.
# ---------------------------------------------------------------------------------------------------------
def clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def prompt_ids(model_dir, depth):
    tokenizer = Tokenizer(model_dir / "tokenizer.model")
    length = max(depth, SHORT_PROMPT)
    text = PROMPT_TEXT * (length // len(tokenizer.encode(PROMPT_TEXT, bos=False, eos=False)) + 1)
    return run_inference.encode_prompt(tokenizer, text, "", instruct=False)[:length]


def run_script(args, device, model_dir, depth, script, beams=1, use_speedups=True, quantize="", threads=0, busy=False,
               kernels="measure", stand_in="", draft="", small_pages=False):
    """The script's own load_model and generate (or beam_search), timed token by token; with `threads`
    torch threads, and with `busy`, another process spinning on one core meanwhile; kernels as KERNELS says
    (measured, as a user's run: cached by the first run on this machine). stand_in: the stand-in with that
    prompt (STAND_IN_PROMPTS), decoded with the proposer `draft` if any (speculative_run). small_pages: no
    transparent huge pages in this process (speedups' weight_memory then gets 4 KiB pages)."""
    module = importlib.import_module(script)
    if small_pages:
        ctypes.CDLL(None).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
    if threads:
        torch.set_num_threads(threads)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        devices.init_distributed(device)
        if stand_in:
            return speculative_run(args, device, stand_in, draft)
        ids = prompt_ids(model_dir, depth)
        start = clock(device)
        params = checkpoint.read_params(model_dir)
        model = module.load_model(model_dir, params, device, DTYPE, len(ids) + args.new_tokens, beams, use_speedups,
                                  quantize, kernels)
        load_s, marks = clock(device) - start, [clock(device)]
        if beams > 1:
            on_step = lambda *_: marks.append(clock(device))  # after each step but the last
            run_inference.beam_search(model, ids, args.new_tokens, set(), beams, 1.0, on_step)
            marks.append(clock(device))
        else:
            for _ in module.generate(model, ids, args.new_tokens, set()):
                marks.append(clock(device))
        devices.close_distributed()
    finally:
        if spinner:
            spinner.kill()
            spinner.wait()
    return dict(load_s=load_s, prompt_tokens=len(ids), marks=marks, threads=torch.get_num_threads())


def speculative_run(args, device, prompt, draft):
    """The stand-in on STAND_IN_PROMPTS[prompt], greedy, through run_inference.py's own functions: the prompt's
    pass but its last token (as speculative_generate makes it), then plain decoding or speculative decoding with
    the proposer `draft` ("lookup", "self-int4", which drafts in bfloat16 as the script's does), --draft-tokens
    drafts a round; marks[1] is the prompt's pass, so decode tokens/s count every new token."""
    from standin import smollm  # converts the stand-in once, into the user's cache
    model_dir = smollm.smollm_models_dir() / STAND_IN
    tokenizer = Tokenizer(model_dir / "tokenizer.model")
    ids = run_inference.encode_prompt(tokenizer, STAND_IN_PROMPTS[prompt], "", instruct=False)
    params, max_seq_len = checkpoint.read_params(model_dir), len(ids) + args.new_tokens
    start = clock(device)
    model = run_inference.load_model(model_dir, params, device, DTYPE, max_seq_len, 1)
    proposer = None
    if draft == "lookup":
        proposer = run_inference.PromptLookup(args.draft_tokens, None)
    elif draft == "self-int4":
        draft_model = run_inference.load_model(model_dir, params, device, torch.bfloat16, max_seq_len, 1, True, "int4")
        proposer = run_inference.DraftModel(draft_model, args.draft_tokens, None)
    load_s, marks = clock(device) - start, [clock(device)]
    run_inference.prefill(model, ids[:-1])
    marks.append(clock(device))
    if proposer:
        tokens = run_inference.speculative_generate(model, proposer, ids, args.new_tokens, set(), len(ids) - 1)
    else:
        tokens = run_inference.generate(model, ids[-1:], args.new_tokens, set(), len(ids) - 1)
    for _ in tokens:
        marks.append(clock(device))
    devices.close_distributed()
    return dict(load_s=load_s, prompt_tokens=len(ids), marks=marks, threads=torch.get_num_threads(),
                tally=dict(proposer.tally) if proposer else None)


def run_verify(args, device, model_dir, depth, quantize):
    """Seconds of one forward pass of k + 1 tokens (run_inference.verify: the logits of every position) for
    k = 0 (a one-token decode step) .. MAX_VERIFY_DRAFTS, after a 16-token prompt, each timed VERIFY_REPEATS
    times, the k taking turns; the fastest of each."""
    devices.init_distributed(device)
    ids = prompt_ids(model_dir, 0)
    params = checkpoint.read_params(model_dir)
    model = run_inference.load_model(model_dir, params, device, DTYPE, len(ids) + MAX_VERIFY_DRAFTS + 1, 1, True,
                                     quantize)
    run_inference.prefill(model, ids)
    seconds = {}
    for _ in range(1 + VERIFY_REPEATS):  # the first round warms up (oneDNN builds its kernels per shape)
        for k in range(MAX_VERIFY_DRAFTS + 1):
            start = clock(device)
            run_inference.verify(model, ids[: k + 1], len(ids)).argmax(dim=-1).tolist()  # as accept_greedy reads it
            seconds.setdefault(k, []).append(clock(device) - start)
    devices.close_distributed()
    return {"verify_s": {k: min(times[1:]) for k, times in seconds.items()}}


def run_transformers(args, device, model_dir, depth, beams):
    """transformers' LlamaForCausalLM.generate on the same weights, dtype, prompt and number of new tokens."""
    from hf_reference import transformers_llama  # tests/hf_reference.py: Meta's layout to transformers'
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StepClock(StoppingCriteria):  # called once per step, after the step's tokens are chosen
        def __call__(self, input_ids, scores, **kwargs):
            marks.append(clock(device))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    ids = torch.tensor([prompt_ids(model_dir, depth)], device=device)
    start = clock(device)
    model = transformers_llama(model_dir, dtype=DTYPE).to(device)
    load_s, marks = clock(device) - start, [clock(device)]
    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=beams, pad_token_id=0,
                   max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                   stopping_criteria=StoppingCriteriaList([StepClock()]))
    return dict(load_s=load_s, prompt_tokens=ids.shape[1], marks=marks)


def run_original(args, device, model_dir, depth):
    """How the project first ran: float32, ModelArgs' default sizes (a 4.3 GB KV cache for 32 x 2048 tokens),
    a normally built model filled by a plain torch.load, and the whole text recomputed for every token."""
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    devices.init_distributed(device)
    ids = prompt_ids(model_dir, depth)
    start = clock(device)
    torch.set_default_dtype(torch.float32)
    model = Transformer(ModelArgs(**checkpoint.read_params(model_dir)))
    model.load_state_dict(torch.load(checkpoint.weight_files(model_dir)[0], map_location="cpu"))  # no mmap
    model = model.to(device)
    load_s, marks = clock(device) - start, [clock(device)]
    for _ in range(args.original_new_tokens):
        ids.append(int(model(torch.tensor([ids], device=device), 0)[0, -1].argmax()))  # every position, every step
        marks.append(clock(device))
    return dict(load_s=load_s, prompt_tokens=SHORT_PROMPT, marks=marks)


def run_accuracy(args, device, model_dir, depth):
    """Each format's logits at every position of a 64-token prompt, fed one token at a time, against float32's
    and against bfloat16's: the mean over the positions of |logits - reference| / |reference| (vector norms)."""
    devices.init_distributed(device)
    params, ids = checkpoint.read_params(model_dir), prompt_ids(model_dir, ACCURACY_TOKENS)[:ACCURACY_TOKENS]
    formats = {"float32": (torch.float32, ""), "bfloat16": (torch.bfloat16, ""), "float16": (torch.float16, ""),
               "int8": (DTYPE, "int8"), "int4": (DTYPE, "int4")}
    logits = {}
    for name, (dtype, quantize) in formats.items():
        if quantize == "int4" and device.type != "cpu":
            continue
        model = run_inference.load_model(model_dir, params, device, dtype, len(ids), 1, True, quantize)
        logits[name] = torch.stack([run_inference.decode_step(model, [token], pos)[0].float().cpu()
                                    for pos, token in enumerate(ids)])
        del model
    return {"relative_error": {reference: {name: ((value - logits[reference]).norm(dim=1)
                                                  / logits[reference].norm(dim=1)).mean().item()
                                           for name, value in logits.items() if name != reference}
                               for reference in ("float32", "bfloat16")}}


def run_bandwidth(args, device, model_dir, depth):
    """Read bandwidth the ways fast kernels read, with 1 .. N threads: GB/s of the best of 5 reads of a 1 GiB
    array for each. (PyTorch's sum does not always split its work across threads; max and dot do.)"""
    results = {}
    arrays = {dtype: torch.ones(BANDWIDTH_BYTES // dtype.itemsize, dtype=dtype, device=device)
              for dtype in (torch.bfloat16, torch.float32, torch.int8)}
    reads = {"bfloat16 sum": lambda: arrays[torch.bfloat16].sum(), "float32 sum": lambda: arrays[torch.float32].sum(),
             "float32 max": lambda: arrays[torch.float32].amax(), "int8 max": lambda: arrays[torch.int8].amax(),
             "float32 dot product": lambda: torch.dot(arrays[torch.float32], arrays[torch.float32])}
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        for method, read in reads.items():
            read()  # warm up
            seconds = []
            for _ in range(5):
                start = clock(device)
                read()
                seconds.append(clock(device) - start)
            results[f"{method}, {threads_label(threads)}"] = BANDWIDTH_BYTES / min(seconds)
    return {"bandwidth": results}


def threads_label(threads):
    return "1 thread" if threads == 1 else f"{threads} threads"


def child(args):
    kind, options, _ = CONFIGURATIONS[args.run]
    run = {"script": run_script, "transformers": run_transformers, "original": run_original,
           "accuracy": run_accuracy, "bandwidth": run_bandwidth, "verify": run_verify}[kind]
    device = torch.device(args.device)
    with redirect_stdout(sys.stderr):  # fairscale, llama-models and transformers print
        result = run(args, device, args.checkpoint_dir / CHECKPOINT_NAME, args.depth, **options)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else memory.peak_resident_bytes()
    print(json.dumps({**result, "peak_bytes": peak}), flush=True)


# ---------------------------------------------------------------------------------------------------------
# The parent: the checkpoint, the rounds, llama.cpp, the report.
# ---------------------------------------------------------------------------------------------------------
def ensure_checkpoint(model_dir):
    """Write the random 1B checkpoint into model_dir unless a complete one is there already."""
    complete = (model_dir / "checklist.chk").exists()  # write_checkpoint writes it last
    if complete and json.loads((model_dir / "params.json").read_text()) == LLAMA_3_2_1B:
        return
    print(f"writing a random Llama 3.2 1B checkpoint to {model_dir} (2.5 GB, once) ...", file=sys.stderr)
    (model_dir / "checklist.chk").unlink(missing_ok=True)
    write_checkpoint(model_dir, LLAMA_3_2_1B, random_weights(LLAMA_3_2_1B, tie_embeddings=True))


def bytes_per_token(model_dir):
    """Bytes a decode step must read at a short context, per weight format: every linear weight (the tied
    output layer reads the whole embedding table), its scales, the norms, one embedding row."""
    weights = torch.load(checkpoint.weight_files(model_dir)[0], mmap=True, weights_only=True)
    linear = [t for name, t in weights.items() if t.dim() == 2 and name != "tok_embeddings.weight"]
    rest = sum(t.numel() for t in weights.values() if t.dim() == 1) + weights["tok_embeddings.weight"].shape[1]
    weights_n, rows = sum(t.numel() for t in linear), sum(t.shape[0] for t in linear)
    return {"bf16": 2 * (weights_n + rest), "int8": weights_n + 2 * rows + 2 * rest,  # + a bf16 scale per row
            "int4": weights_n / 2 + 4 * weights_n / 32 + 2 * rest}  # + a bf16 scale and offset per 32


def cpu_name():
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return names[0] if names else platform.processor() or platform.machine()


def run_child(args, name, depth, new_tokens=None):
    tokens = ["--new-tokens", str(new_tokens)] if new_tokens else []
    command = [sys.executable, __file__, *sys.argv[1:], *tokens, "--run", name, "--depth", str(depth)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]}
    return json.loads(lines[-1])


def peer_name(gguf):
    return "llama.cpp " + Path(gguf).stem.rsplit("-", 1)[-1].upper()


def run_llama_bench(args, gguf, depths):
    """llama.cpp's llama-bench on one GGUF file: {depth: decode tokens/s} and its prompt processing of
    --prompt-tokens tokens (tokens/s), with as many threads as PyTorch uses."""
    command = [args.llama_bench, "-m", gguf, "-p", str(args.prompt_tokens), "-n", str(args.new_tokens),
               "-d", ",".join(map(str, depths)), "-t", str(torch.get_num_threads()), "-r", "1", "-o", "json"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["llama-bench failed"])[-1]}
    entries = json.loads(done.stdout)
    prompt = [entry["avg_ts"] for entry in entries if entry["n_prompt"] and entry["n_depth"] == 0]  # none at -p 0
    return {"decode": {str(entry["n_depth"]): entry["avg_ts"] for entry in entries if entry["n_gen"]},
            **({"prompt": prompt[0]} if prompt else {})}


def decode_rate(marks):
    """Decode tokens/s from a run's marks: marks[0] before the prompt, marks[i] when token i was ready."""
    return (len(marks) - 2) / (marks[-1] - marks[1]) if len(marks) > 2 else None


def summarise(runs):
    """{name: {depth: median numbers}} from {name: {depth: [run, ...]}}."""
    summary = {}
    for name, by_depth in runs.items():
        for depth, results in by_depth.items():
            good = [r for r in results if "error" not in r]
            numbers = {"errors": [r["error"] for r in results if "error" in r]}
            if good and "marks" in good[0]:
                numbers.update(decode=statistics.median(decode_rate(r["marks"]) for r in good),
                               prefill=statistics.median(r["prompt_tokens"] / (r["marks"][1] - r["marks"][0])
                                                         for r in good),
                               decode_s=statistics.median(r["marks"][-1] - r["marks"][1] for r in good),
                               load_s=statistics.median(r["load_s"] for r in good),
                               peak_gib=statistics.median(r["peak_bytes"] for r in good) / GIB,
                               tally=good[0].get("tally"))  # greedy: the same drafts every round
            elif good and "decode" in good[0]:  # llama.cpp
                numbers.update(decode=statistics.median(r["decode"][depth] for r in good))
                if "prompt" in good[0]:
                    numbers.update(prompt=statistics.median(r["prompt"] for r in good))
            elif good and "verify_s" in good[0]:  # the fastest of the rounds, per k
                numbers.update(verify_s={k: min(r["verify_s"][k] for r in good) for k in good[0]["verify_s"]})
            elif good and "bandwidth" in good[0]:  # the best of the rounds, per method
                methods = good[0]["bandwidth"]
                numbers.update(bandwidth={method: max(r["bandwidth"][method] for r in good) for method in methods})
            elif good:
                numbers.update(good[0])
            summary.setdefault(name, {})[depth] = numbers
    return summary


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "—"


def report(summary, depths, args, per_token):
    def get(name, depth, key="decode"):
        return summary.get(name, {}).get(str(depth), {}).get(key)

    timed = [name for name in summary if name not in ("accuracy", "bandwidth") and not name.startswith("verify")]
    lines = [f"Decode benchmark: {args.machine}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"device {args.device}, bf16 unless named, {args.new_tokens} new tokens, "
             f"median of {args.rounds} rounds.", "",
             "| configuration | load s | decode tok/s, " + " | decode tok/s, ".join(
                 "short prompt" if d == 0 else f"{d} tokens of context" for d in depths) + " | peak GiB | errors |",
             "|---" * (4 + len(depths)) + "|"]
    for name in timed:
        cells = [f"{get(name, d):.2f}" if get(name, d) else "—" for d in depths]
        load, peak = get(name, 0, "load_s"), get(name, 0, "peak_gib")
        errors = "; ".join(get(name, 0, "errors") or []) or ""
        lines.append(f"| {name} | {f'{load:.2f}' if load else '—'} | " + " | ".join(cells) +
                     f" | {f'{peak:.2f}' if peak else '—'} | {errors} |")
    bandwidth = get("bandwidth", 0, "bandwidth") or {}
    best = max(bandwidth.items(), key=lambda item: item[1], default=(None, None))
    peers = [name for name in summary if name.startswith("llama.cpp")]
    peer_bytes = {peer_name(path): Path(path).stat().st_size for path in args.gguf.split(",") if path}
    pairs = [("minimal", "tutorial"), ("tutorial", "transformers"), ("minimal", "transformers"),
             ("minimal", "minimal-rule"), ("minimal", "minimal-speedups-off"), ("minimal", "minimal-small-pages"),
             ("tutorial-beam5", "transformers-beam5")]
    pairs += [(ours, peer) for peer in peers for ours in PEER_OF_FORMAT[PEER_FORMATS.get(peer.split()[-1])]]
    columns = " | ".join("short prompt" if d == 0 else f"at {d}" for d in depths)
    lines += ["", f"| ratio of decode tokens/s | {columns} |", "|---" * (len(depths) + 1) + "|"]
    lines += [f"| {a} / {b} | " + " | ".join(ratio(get(a, d), get(b, d)) for d in depths) + " |"
              for a, b in pairs if get(a, 0) and get(b, 0)]
    lines += [f"| {name}: at depth / short prompt | "
              + " | ".join(ratio(get(name, d), get(name, 0)) for d in depths) + " |"
              for name in timed if get(name, depths[-1])]
    lines += prompt_report(summary, args, peers)
    lines += ["", "| other ratio | value |", "|---|---|",
              *(f"| decode wall time, {beams} / {greedy} | "
                f"{ratio(get(beams, 0, 'decode_s'), get(greedy, 0, 'decode_s'))} |"
                for beams, greedy in (("tutorial-beam5", "tutorial"), ("transformers-beam5", "transformers")))]
    lines += ["", f"Roofline: {best[1] / 1e9:.1f} GB/s ({best[0]}), the best read rate measured here, over the bytes "
              "a decode step reads in each format; each configuration's weights read per second at a short prompt:" if
              best[1] else "Roofline: not measured (add the bandwidth configuration)", "",
              "| configuration | format | GB/s of weights at a short prompt | share of the roofline |",
              "|---|---|---|---|"]
    rates = {}
    for name in timed:  # llama.cpp's configurations among them
        fmt = PEER_FORMATS.get(name.split()[-1]) if name in peers else FORMAT_OF.get(name)
        if fmt and get(name, 0):
            rates[name] = get(name, 0) * peer_bytes.get(name, per_token[fmt])  # llama.cpp reads its file's tensors
            share = ratio(rates[name], best[1]) if best[1] else "—"
            lines.append(f"| {name} | {fmt} | {rates[name] / 1e9:.1f} | {share} |")
    if "llama.cpp Q8_0" in rates:
        lines += ["", "Weights read per second, ours in bf16 / llama.cpp Q8_0's: " + ", ".join(
            f"{name} {ratio(rates[name], rates['llama.cpp Q8_0'])}"
            for name in ("minimal", "tutorial") if name in rates)]
    if bandwidth:
        lines += ["", "Read bandwidth, GB/s, the best of 5 reads of 1 GiB (the best over the rounds): " +
                  ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bandwidth.items()) + ".",
                  f"Roofline: the best of them ({best[0]}) / the bytes a decode step reads: " +
                  ", ".join(f"{fmt} {n / 1e9:.3f} GB" for fmt, n in per_token.items()) + "."]
    accuracy = get("accuracy", 0, "relative_error")
    if accuracy:
        lines += ["", f"Logits over a {ACCURACY_TOKENS}-token prompt, mean relative error against each reference:", "",
                  "| format | " + " | ".join(f"against {reference}" for reference in accuracy) + " |",
                  "|---" * (len(accuracy) + 1) + "|"]
        names = sorted({name for errors in accuracy.values() for name in errors}, key=list(ACCURACY_ORDER).index)
        lines += [f"| {name} | "
                  + " | ".join(f"{errors[name]:.2%}" if name in errors else "—" for errors in accuracy.values())
                  + " |" for name in names]
    return "\n".join(lines + speculation_tables(summary, args))


def speculation_tables(summary, args):
    """The verify pass's cost against a step (verify-cost rows), and each proposer against plain decoding of
    the same prompt on the stand-in (stand-in rows)."""
    lines = []
    costs = {name: by_depth["0"]["verify_s"] for name, by_depth in summary.items() if "verify_s" in by_depth["0"]}
    if costs:
        lines += ["", "A verify pass of k drafts (k + 1 tokens, every position's logits) against a one-token step, "
                  "1B shapes, after a 16-token prompt: ms, and the ratio to the step (the fastest of the rounds):", "",
                  "| k | " + " | ".join(costs) + " |", "|---" * (len(costs) + 1) + "|"]
        for k in range(MAX_VERIFY_DRAFTS + 1):
            cells = [f"{s[str(k)] * 1e3:.1f} ms ({s[str(k)] / s['0']:.2f}x)" for s in costs.values()]
            lines.append(f"| {k}{' (a step)' if k == 0 else ''} | " + " | ".join(cells) + " |")
    rows = [name for name in summary if name.startswith("stand-in-") and summary[name]["0"].get("tally")]
    if rows:
        lines += ["", f"Speculative decoding on the stand-in ({STAND_IN}, real weights, {devices.dtype_name(DTYPE)}), "
                  f"greedy, DRAFT_TOKENS={args.draft_tokens}, {args.new_tokens} new tokens; decode tok/s over "
                  "every new token after the prompt's pass:", "",
                  "| configuration | accepted drafts | tokens per verify pass | decode tok/s | plain decode tok/s "
                  "| speedup |", "|---|---|---|---|---|---|"]
        for name in rows:
            numbers, plain = summary[name]["0"], summary.get(f"stand-in-{CONFIGURATIONS[name][1]['stand_in']}", {})
            tally, plain_rate = numbers["tally"], plain.get("0", {}).get("decode")
            accepted = tally["accepted"] / tally["drafted"] if tally["drafted"] else 0
            lines.append(f"| {name} | {accepted:.0%} of {tally['drafted']} | "
                         f"{(tally['passes'] + tally['accepted']) / tally['passes']:.2f} | {numbers['decode']:.2f} | "
                         f"{f'{plain_rate:.2f}' if plain_rate else '—'} | {ratio(numbers['decode'], plain_rate)} |")
    return lines


def prompt_report(summary, args, peers):
    """Prompt tokens/s of each configuration that read a --prompt-tokens prompt, and llama.cpp's ppN, with
    the ratio of ours to the peer of the same format."""
    def prompt_rate(name):
        numbers = summary.get(name, {}).get("prompt" if name not in peers else "0", {})
        return numbers.get("prefill" if name not in peers else "prompt")

    rated = [name for name in (*PROMPT_CONFIGURATIONS, *peers) if prompt_rate(name)]
    if not rated:
        return []
    lines = ["", f"A {args.prompt_tokens}-token prompt (ours: the prompt and its first token; llama.cpp: "
                 f"pp{args.prompt_tokens}), tokens/s:", "",
             "| configuration | prompt tokens/s | / llama.cpp, same format |", "|---|---|---|"]
    for name in rated:
        fmt = FORMAT_OF.get(name)
        peer = next((p for p in peers if PEER_FORMATS.get(p.split()[-1]) == fmt and p.split()[-1] != "F16"), None)
        versus = ratio(prompt_rate(name), prompt_rate(peer)) if peer and name not in peers else "—"
        lines.append(f"| {name} | {prompt_rate(name):.1f} | {versus}{f' ({peer})' if versus != '—' else ''} |")
    return lines


def plot(summary, depths, path):
    import matplotlib  # benchmarks/requirements.txt
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.5))
    for name, by_depth in summary.items():
        points = [(d, by_depth.get(str(d), {}).get("decode")) for d in depths]
        points = [(d, v) for d, v in points if v]
        family = name.split()[0].split("-")[0]  # this project's configurations, transformers, llama.cpp
        line, marker = {"llama.cpp": ("--", "s"), "transformers": (":", "^")}.get(family, ("-", "o"))
        if points:  # configurations measured at a short prompt only are single points
            axes.plot(*zip(*points), line, marker=marker if len(points) > 1 else "x", markersize=7, label=name)
    axes.set(xlabel="tokens of context", ylabel="decode tokens/s", ylim=(0, None),
             title="Decode speed against context, Llama 3.2 1B shapes, bf16 unless named")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(CONFIGURATIONS),
                        help="comma-separated configurations (default: all)")
    parser.add_argument("--depths", default="0,4096", help="tokens of context before decoding (default %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens per run (default %(default)s)")
    parser.add_argument("--original-new-tokens", type=int, default=8,
                        help="the original approach's (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each configuration (default %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=512,
                        help="the prompt whose tokens/s is measured beside llama.cpp's (0: none; default %(default)s)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--llama-bench", help="llama.cpp's llama-bench binary, to measure llama.cpp in the same run")
    parser.add_argument("--gguf", default="", help="comma-separated GGUF files of the checkpoint, for --llama-bench")
    parser.add_argument("--plot", help="draw decode tokens/s against --depths into this PNG (needs matplotlib)")
    parser.add_argument("--draft-tokens", type=int, default=run_inference.DRAFT_TOKENS,
                        help="stand-in rows: drafts per round (default: run_inference.py's DRAFT_TOKENS, %(default)s)")
    parser.add_argument("--checkpoint-dir", type=Path, default=CHECKPOINT_DIR, help="default %(default)s")
    parser.add_argument("--json", type=Path, default=RESULTS_FILE, help="everything measured (default %(default)s)")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: one child run
    parser.add_argument("--depth", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.only.split(",")) - set(CONFIGURATIONS)
    if unknown:
        parser.error(f"unknown configuration {', '.join(sorted(unknown))}; choose from {', '.join(CONFIGURATIONS)}")
    if args.new_tokens < 3 or args.rounds < 1 or (args.gguf and not args.llama_bench):
        parser.error("--new-tokens must be at least 3, --rounds at least 1, and --gguf needs --llama-bench")
    return args


def main():
    args = parse_args()
    if args.run:
        return child(args)
    depths = sorted({int(d) for d in args.depths.split(",")} | {0})
    model_dir = args.checkpoint_dir / CHECKPOINT_NAME
    ensure_checkpoint(model_dir)
    args.machine = cpu_name() if args.device == "cpu" else torch.cuda.get_device_name()
    chosen = [name for name in CONFIGURATIONS if name in args.only.split(",")]
    gguf_files = [path for path in args.gguf.split(",") if path]
    runs = {}
    for round_ in range(args.rounds):
        for name in chosen:
            kind, _, at_every_depth = CONFIGURATIONS[name]
            if kind == "accuracy" and round_ > 0:  # the same every time: once is enough
                continue
            for depth in depths if at_every_depth else [0]:
                print(f"[{round_ + 1}/{args.rounds}] {name} at depth {depth} ...", file=sys.stderr, flush=True)
                runs.setdefault(name, {}).setdefault(str(depth), []).append(run_child(args, name, depth))
            if name in PROMPT_CONFIGURATIONS and args.prompt_tokens:  # the prompt and its first token only
                print(f"[{round_ + 1}/{args.rounds}] {name}, a {args.prompt_tokens}-token prompt ...", file=sys.stderr,
                      flush=True)
                result = run_child(args, name, args.prompt_tokens, new_tokens=3)
                runs.setdefault(name, {}).setdefault("prompt", []).append(result)
        for gguf in gguf_files:
            name = peer_name(gguf)
            print(f"[{round_ + 1}/{args.rounds}] {name} ...", file=sys.stderr, flush=True)
            result = run_llama_bench(args, gguf, depths)
            for depth in depths:
                runs.setdefault(name, {}).setdefault(str(depth), []).append(result)
    summary = summarise(runs)
    print(report(summary, depths, args, bytes_per_token(model_dir)))
    if args.plot:
        plot(summary, depths, args.plot)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                     "summary": summary}, indent=1))
    print(f"\nwritten to {args.json}" + (f" and {args.plot}" if args.plot else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
