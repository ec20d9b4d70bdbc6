"""Benchmark the project's decoding against transformers, the original approach and the memory roofline.

Run it from the repository root:

    python benchmarks/bench_decode.py                                  # everything: CPU, 256 new tokens, 2 runs each
    python benchmarks/bench_decode.py --only project-greedy,bandwidth --new-tokens 32 --repeats 1

The model is a random-weight checkpoint with the exact shapes of Llama 3.2 1B in Meta's layout (bf16, tied
output layer, the real tokenizer), written once by tests/random_checkpoint.py into --checkpoint-dir and
reused afterwards (2.5 GB). Random weights cost exactly what real ones cost to read; they only talk nonsense.

Every configuration runs in its own process (this script started again with --run NAME, printing one JSON
line), so its peak memory is its own; each is run --repeats times and the report gives the median. The
project's configurations call run_inference.py's own functions: what is timed is the scripts' code path.
The report (a markdown table, targets with pass/FAIL) goes to stdout and everything measured to --json.
A full run takes a long while on a small CPU (the original approach alone recomputes the whole text at
every step, in float32); --only picks configurations.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the scripts and the tests' helpers, imported below

import run_inference  # noqa: E402  (needs the path above)
from llama_models.llama3.args import ModelArgs  # noqa: E402
from llama_models.llama3.model import Transformer  # noqa: E402
from llama_models.llama3.tokenizer import Tokenizer  # noqa: E402
from random_checkpoint import LLAMA_3_2_1B, random_weights, write_checkpoint  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# Settings: the defaults of the command-line options (python benchmarks/bench_decode.py --help).
# ---------------------------------------------------------------------------------------------------------
CHECKPOINT_DIR = REPO / "benchmarks" / "checkpoints"  # git-ignored; the checkpoint goes in a subfolder
CHECKPOINT_NAME = "Llama3.2-1B-random"  # a base model: the prompt is plain text, not the chat format
RESULTS_FILE = REPO / "benchmarks" / "results" / "latest.json"  # git-ignored
NEW_TOKENS = 256  # new tokens per generation (exactly this many: no stop tokens)
PROMPT_TOKENS = 256  # prompt length for every generation
LONG_PROMPT_TOKENS = 1000  # the prefill-only configuration's prompt
ORIGINAL_NEW_TOKENS = 8  # the original approach recomputes everything per token: keep its run short
REPEATS = 2  # runs per configuration; the report gives the median of each number
BEAM_WIDTH = 5
LENGTH_PENALTY = 1.0  # run_inference.py's default
WINDOW = 16  # per-token latency: the first and the last WINDOW decode steps are compared
BANDWIDTH_GIB = 1.5  # size of the array read to measure memory bandwidth
BANDWIDTH_TRIES = 5  # the best (fastest) read counts
DTYPE = torch.bfloat16  # the checkpoint's format, for the project and transformers alike
PROMPT_TEXT = (  # repeated and cut to the prompt length; any English text does
    "The history of the city begins with a small fishing village on the banks of a wide river. Over the "
    "centuries, merchants built warehouses, bridges and markets, and the village grew into a busy port that "
    "traded grain, wool and timber with distant kingdoms. "
)

# Targets from the project's issue, checked in the report: (what, comparison, goal).
DECODE_VS_TRANSFORMERS = 1.25  # project greedy decode tokens/s >= this x transformers greedy
SHARE_OF_ROOFLINE = 0.80  # project greedy decode tokens/s >= this x the memory-bandwidth limit
LAST_OVER_FIRST = 1.15  # last-16 / first-16 per-token latency <= this (the step cost stays flat)
BEAM_OVER_GREEDY = 1.6  # beam-5 decode wall time / greedy decode wall time <= this
MEMORY_HEADROOM_GIB = 0.6  # peak memory <= checkpoint bytes + this
LOAD_SECONDS = 3.0  # load time with the file in the page cache <= this
INT8_OVER_BF16 = 1.6  # int8 greedy decode tokens/s >= this x the bf16 greedy decode
INT8_MEMORY_SHARE = 0.55  # int8 peak memory <= this x checkpoint bytes + MEMORY_HEADROOM_GIB

BUSY_WARNING = 0.05  # other programs' CPU share during a run above which the report warns

GIB = 2**30


# ---------------------------------------------------------------------------------------------------------
# The checkpoint: written once, then reused.
# ---------------------------------------------------------------------------------------------------------
def ensure_checkpoint(model_dir):
    """Write the random 1B checkpoint into model_dir unless a complete one is there already."""
    params_file = model_dir / "params.json"
    complete = (model_dir / "checklist.chk").exists()  # write_checkpoint writes it last
    if complete and json.loads(params_file.read_text()) == LLAMA_3_2_1B:
        return
    print(f"writing a random Llama 3.2 1B checkpoint to {model_dir} (2.5 GB, once) ...", file=sys.stderr)
    (model_dir / "checklist.chk").unlink(missing_ok=True)
    write_checkpoint(model_dir, LLAMA_3_2_1B, random_weights(LLAMA_3_2_1B, tie_embeddings=True))


def weight_files(model_dir):
    return sorted(model_dir.glob("consolidated.*.pth"))


def describe_checkpoint(model_dir):
    """Its size on disk, and the bytes a decode step reads (the roofline's denominator; see the formula)."""
    weights = {}
    for path in weight_files(model_dir):
        weights.update(torch.load(path, mmap=True, weights_only=True))
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in weights.values()}
    embeddings, output = weights["tok_embeddings.weight"], weights["output.weight"]
    tied = embeddings.untyped_storage().data_ptr() == output.untyped_storage().data_ptr()
    row_bytes = embeddings.shape[1] * embeddings.element_size()
    unread_rows = 0 if tied else embeddings.shape[0] - 1  # a step looks up one row; tied: the output layer reads all
    return {
        "path": str(model_dir),
        "file_bytes": sum(path.stat().st_size for path in weight_files(model_dir)),
        "unique_tensor_bytes": sum(storages.values()),
        "tied_embeddings": tied,
        "vocab_size": embeddings.shape[0],
        "bytes_per_token": sum(storages.values()) - unread_rows * row_bytes,
        "bytes_per_token_formula": "unique tensor bytes in the checkpoint (every linear layer, the norms, the output "
                                   "layer) - unread embedding rows ((vocab - 1) x dim x 2 B if untied, 0 if tied: "
                                   "the output layer then reads the whole table); KV-cache reads not counted",
    }


def warm_page_cache(model_dir):
    """Read the weight files once so that loading measures the code, not the disk. Returns seconds."""
    start = time.perf_counter()
    buffer = bytearray(64 * 2**20)
    for path in weight_files(model_dir):
        with open(path, "rb", buffering=0) as file:
            while file.readinto(buffer):
                pass
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------
# Helpers shared by the configurations (these run in the child process).
# ---------------------------------------------------------------------------------------------------------
def clock(device):
    """Seconds, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def benchmark_prompt(model_dir, n_tokens):
    """Exactly n_tokens prompt ids: <|begin_of_text|> and English text, built by the scripts' encode_prompt."""
    tokenizer = Tokenizer(model_dir / "tokenizer.model")
    copies = n_tokens // len(tokenizer.encode(PROMPT_TEXT, bos=False, eos=False)) + 1
    prompt_ids = run_inference.encode_prompt(tokenizer, PROMPT_TEXT * copies, "", instruct=False)
    return prompt_ids[:n_tokens]


def timed(device, load):
    start = clock(device)
    model = load()
    return model, clock(device) - start


def peak_memory_bytes(device):
    """The device's peak: CUDA's max_memory_allocated, or this process's peak resident set size.

    On Linux ru_maxrss would do, but after fork + exec it keeps the parent's peak when that was higher
    (the kernel carries the old image's high-water mark over), so /proc/self/status's VmHWM, the peak of
    this program image alone, is read instead."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    if status.exists():
        high_water = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(high_water.split()[1]) * 1024  # kB
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss if sys.platform == "darwin" else max_rss * 1024  # bytes on macOS, KiB elsewhere


# ---------------------------------------------------------------------------------------------------------
# The configurations. Each returns load_s, prompt_tokens, token_ids and marks: seconds since generation
# started at which each new token was ready (marks[0] = 0, marks[1] = after the prefill's token, ...).
# ---------------------------------------------------------------------------------------------------------
def project_model(device, model_dir, prompt_tokens, new_tokens, batch_size, quantize=""):
    """The prompt, and the model loaded by the scripts' own load_model, sized for the job, with its load time."""
    run_inference.init_distributed(device)
    prompt_ids = benchmark_prompt(model_dir, prompt_tokens)
    model, load_s = timed(device, lambda: run_inference.load_model(
        model_dir, device, DTYPE, len(prompt_ids) + new_tokens, batch_size, quantize))
    return prompt_ids, model, load_s


def project_greedy(args, device, model_dir, quantize=""):
    prompt_ids, model, load_s = project_model(device, model_dir, args.prompt_tokens, args.new_tokens, 1, quantize)
    marks = [clock(device)]
    on_token = lambda step, token_id, logits: marks.append(clock(device))
    token_ids = list(run_inference.generate(model, prompt_ids, args.new_tokens, set(), device, on_token=on_token))
    return dict(load_s=load_s, prompt_tokens=len(prompt_ids), token_ids=token_ids, marks=marks)


def project_beam(args, device, model_dir):
    prompt_ids, model, load_s = project_model(device, model_dir, args.prompt_tokens, args.new_tokens, BEAM_WIDTH)
    marks = [clock(device)]
    on_step = lambda step, beams, beam_scores, finished: marks.append(clock(device))
    finished = run_inference.beam_search(model, prompt_ids, args.new_tokens, set(), device,
                                         BEAM_WIDTH, LENGTH_PENALTY, on_step=on_step)
    if len(marks) == args.new_tokens:  # on_step is not called after the last step
        marks.append(clock(device))
    return dict(load_s=load_s, prompt_tokens=len(prompt_ids), token_ids=finished[0][1], marks=marks)


def project_prefill_long(args, device, model_dir):
    """Prefill only, of a long prompt: its peak memory shows whether all-position logits were materialised."""
    prompt_ids, model, load_s = project_model(device, model_dir, args.long_prompt_tokens, 0, 1)
    marks = [clock(device)]
    token_id = run_inference.pick_greedy(run_inference.prefill(model, prompt_ids, device))
    marks.append(clock(device))
    return dict(load_s=load_s, prompt_tokens=len(prompt_ids), token_ids=[token_id], marks=marks)


def transformers_generate(args, device, model_dir, num_beams):
    """transformers' LlamaForCausalLM.generate on the same weights, dtype, prompt and number of new tokens."""
    from hf_reference import transformers_llama  # tests/hf_reference.py: Meta's layout to transformers'
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StepClock(StoppingCriteria):  # called once per step, after the step's tokens are chosen
        def __call__(self, input_ids, scores, **kwargs):
            marks.append(clock(device))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    prompt_ids = benchmark_prompt(model_dir, args.prompt_tokens)
    model, load_s = timed(device, lambda: transformers_llama(model_dir, dtype=DTYPE).to(device).eval())
    input_ids = torch.tensor([prompt_ids], device=device)
    marks = [clock(device)]
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                            num_beams=num_beams, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                            pad_token_id=Tokenizer(model_dir / "tokenizer.model").eos_id,
                            stopping_criteria=StoppingCriteriaList([StepClock()]))
    return dict(load_s=load_s, prompt_tokens=len(prompt_ids), token_ids=output[0, len(prompt_ids):].tolist(),
                marks=marks)


def original_approach(args, device, model_dir):
    """How the project first ran: float32, ModelArgs' default sizes (a 4.3 GB KV cache for 32 x 2048 tokens),
    a normally built model filled by a plain torch.load, and the whole text recomputed for every token."""
    run_inference.init_distributed(device)
    prompt_ids = benchmark_prompt(model_dir, args.prompt_tokens)

    def load():
        torch.set_default_dtype(torch.float32)
        model = Transformer(ModelArgs(**json.loads((model_dir / "params.json").read_text())))
        model.load_state_dict(torch.load(weight_files(model_dir)[0], map_location="cpu"))  # no mmap
        return model.to(device)

    model, load_s = timed(device, load)
    token_ids, marks = [], [clock(device)]
    for _ in range(args.original_new_tokens):
        logits = model(torch.tensor([prompt_ids + token_ids], device=device), 0)  # every position, every step
        token_ids.append(int(logits[0, -1].argmax()))
        marks.append(clock(device))
    return dict(load_s=load_s, prompt_tokens=len(prompt_ids), token_ids=token_ids, marks=marks)


def memory_bandwidth(args, device, model_dir):
    """Bytes per second of the best of several sums over a large float32 array (a read-only stream)."""
    data = torch.ones(int(args.bandwidth_gib * GIB) // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(BANDWIDTH_TRIES):
        start = clock(device)
        data.sum().item()
        best = min(best, clock(device) - start)
    return dict(array_bytes=data.nbytes, best_s=best, bandwidth_bytes_per_s=data.nbytes / best)


CONFIGURATIONS = {  # name: (function, extra arguments); run in this order
    "bandwidth": (memory_bandwidth, {}),
    "project-greedy": (project_greedy, {}),
    "project-beam5": (project_beam, {}),
    "project-greedy-int8": (project_greedy, {"quantize": "int8"}),
    "transformers-greedy": (transformers_generate, {"num_beams": 1}),
    "transformers-beam5": (transformers_generate, {"num_beams": BEAM_WIDTH}),
    "project-prefill-long": (project_prefill_long, {}),
    "original-fp32-recompute": (original_approach, {}),
}


def run_configuration(args):
    """In the child: run one configuration and print its measurements as one JSON line on stdout."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    function, extra = CONFIGURATIONS[args.run]
    model_dir = args.checkpoint_dir / CHECKPOINT_NAME  # written by the parent
    with redirect_stdout(sys.stderr):  # fairscale, llama-models and transformers print
        result = function(args, device, model_dir, **extra)
    if torch.distributed.is_initialized():  # the project's configurations joined a one-process group
        run_inference.close_distributed()
    result.update(peak_memory_bytes=peak_memory_bytes(device), peak_rss_bytes=peak_memory_bytes(torch.device("cpu")),
                  threads=torch.get_num_threads())
    print(json.dumps(result), file=sys.__stdout__, flush=True)


def busy_cpu_seconds():
    """CPU seconds spent by every process on the machine since boot (Linux), or None elsewhere."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return None
    user, nice, system, idle, iowait, irq, softirq = map(int, stat.read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def run_child(name, args):
    """In the parent: one configuration in a fresh process. Returns its measurements, or {"error": ...}.

    Also measures how busy the CPUs were with other work meanwhile: the machine's CPU time minus the child's,
    as a share of all cores. Timings taken while other programs compete for the cores are not trustworthy."""
    command = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--run", name]
    start, busy_before = time.perf_counter(), busy_cpu_seconds()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return {"error": tail[0]}
    result = json.loads(lines[-1])
    if busy_before is not None:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        child_cpu = (children.ru_utime - children_before.ru_utime) + (children.ru_stime - children_before.ru_stime)
        others = busy_cpu_seconds() - busy_before - child_cpu
        result["others_cpu_share"] = max(0.0, others) / ((time.perf_counter() - start) * os.cpu_count())
    return result


# ---------------------------------------------------------------------------------------------------------
# From raw measurements to the numbers in the report.
# ---------------------------------------------------------------------------------------------------------
def derive(raw):
    """The reported numbers of one generation run, from its token marks."""
    marks = raw["marks"]
    steps = [later - earlier for earlier, later in zip(marks[1:], marks[2:])]  # decode step latencies, s
    numbers = {
        "load_s": raw["load_s"],
        "prompt_tokens": raw["prompt_tokens"],
        "new_tokens": len(marks) - 1,
        "prefill_s": marks[1] - marks[0],  # the prompt's pass and the first new token
        "prefill_tokens_per_s": raw["prompt_tokens"] / (marks[1] - marks[0]),
        "peak_memory_bytes": raw["peak_memory_bytes"],
        "others_cpu_share": raw.get("others_cpu_share"),
    }
    if steps:
        window = min(WINDOW, max(1, len(steps) // 2))  # half the steps each when a run is short
        numbers.update(
            decode_s=marks[-1] - marks[1],  # tokens 2 .. N, one decode step each
            decode_tokens_per_s=len(steps) / (marks[-1] - marks[1]),
            window=window,
            first_ms=1000 * statistics.mean(steps[:window]),
            last_ms=1000 * statistics.mean(steps[-window:]),
        )
        numbers["last_over_first"] = numbers["last_ms"] / numbers["first_ms"]
    return numbers


def summarise(runs):
    """The median over the runs of each number (None when every run failed)."""
    good = [derive(run) if "marks" in run else run for run in runs if "error" not in run]
    if not good:
        return None
    keys = [key for key, value in good[0].items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return {key: statistics.median(run[key] for run in good) for key in keys}


def divide(a, b):
    return None if a is None or not b else a / b


def target_rows(summary, checkpoint, roofline_tokens_per_s):
    """(check, measured, target, status) for every target of the issue, plus a few ratios for information."""
    def get(name, key):
        return (summary.get(name) or {}).get(key)

    def speed(name):
        return get(name, "decode_tokens_per_s")

    rows = [
        ("decode tokens/s, project / transformers (greedy)",
         divide(speed("project-greedy"), speed("transformers-greedy")), ">=", DECODE_VS_TRANSFORMERS, "x"),
        ("decode tokens/s, project greedy / roofline",
         divide(speed("project-greedy"), roofline_tokens_per_s), ">=", SHARE_OF_ROOFLINE, "x"),
        ("per-token latency, last / first window (project greedy)",
         get("project-greedy", "last_over_first"), "<=", LAST_OVER_FIRST, "x"),
        ("decode wall time, beam-5 / greedy (project)",
         divide(get("project-beam5", "decode_s"), get("project-greedy", "decode_s")), "<=", BEAM_OVER_GREEDY, "x"),
    ]
    rows.append(("decode tokens/s, project int8 / bf16 (greedy)",
                 divide(speed("project-greedy-int8"), speed("project-greedy")), ">=", INT8_OVER_BF16, "x"))
    int8_limit = INT8_MEMORY_SHARE * checkpoint["file_bytes"] + MEMORY_HEADROOM_GIB * GIB
    rows.append(("peak memory, project-greedy-int8", divide(get("project-greedy-int8", "peak_memory_bytes"), GIB),
                 "<=", int8_limit / GIB, " GiB"))
    memory_limit = checkpoint["file_bytes"] + MEMORY_HEADROOM_GIB * GIB
    for name in ("project-greedy", "project-beam5", "project-prefill-long"):
        peak_gib = divide(get(name, "peak_memory_bytes"), GIB)
        rows.append((f"peak memory, {name}", peak_gib, "<=", memory_limit / GIB, " GiB"))
    for name in ("project-greedy", "project-beam5"):
        rows.append((f"load time, {name} (file in page cache)", get(name, "load_s"), "<=", LOAD_SECONDS, " s"))
    info = [
        ("decode wall time, beam-5 / greedy (transformers)",
         divide(get("transformers-beam5", "decode_s"), get("transformers-greedy", "decode_s"))),
        ("decode wall time, project / transformers (beam-5)",
         divide(get("project-beam5", "decode_s"), get("transformers-beam5", "decode_s"))),
        ("per-token latency, last / first window (transformers greedy)", get("transformers-greedy", "last_over_first")),
        ("peak memory / checkpoint bytes (project greedy)",
         divide(get("project-greedy", "peak_memory_bytes"), checkpoint["file_bytes"])),
        ("decode tokens/s, project greedy / original approach",
         divide(speed("project-greedy"), speed("original-fp32-recompute"))),
        ("peak memory, original approach / project greedy",
         divide(get("original-fp32-recompute", "peak_memory_bytes"), get("project-greedy", "peak_memory_bytes"))),
    ]
    return [check(*row) for row in rows] + [(label, fmt(value, "x"), "(information)", "") for label, value in info]


def check(label, value, comparison, goal, unit):
    if value is None:
        return label, "not measured", f"{comparison} {goal:.2f}{unit}", "NOT MEASURED"
    passed = value >= goal if comparison == ">=" else value <= goal
    return label, fmt(value, unit), f"{comparison} {goal:.2f}{unit}", "pass" if passed else "FAIL"


def fmt(value, unit=""):
    return "—" if value is None else f"{value:.2f}{unit}"


def agreement(a, b):
    """How many leading token ids two runs share."""
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same


# ---------------------------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------------------------
def machine(args, runs):
    device = torch.device(args.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
        name = names[0] if names else platform.processor() or platform.machine()
    threads = next((run["threads"] for name_runs in runs.values() for run in name_runs if "threads" in run), None)
    return {"device": str(device), "name": name, "cpu_cores": os.cpu_count(), "torch": torch.__version__,
            "threads": threads, "python": platform.python_version()}


def table_row(name, numbers, runs, checkpoint):
    """One configuration's line of the markdown table."""
    if numbers is None:
        return f"| {name} | 0 | error: {runs[-1]['error']} |"
    get = numbers.get
    window = f" ({get('window'):.0f})" if get("window") else ""
    cells = [
        name, str(sum("error" not in run for run in runs)), fmt(get("load_s")), f"{get('prompt_tokens'):.0f}",
        f"{get('prefill_tokens_per_s'):.1f}", f"{get('new_tokens'):.0f}", fmt(get("decode_tokens_per_s")),
        fmt(get("first_ms"), window), fmt(get("last_ms")), fmt(get("last_over_first")),
        fmt(get("peak_memory_bytes") / GIB), fmt(get("peak_memory_bytes") / checkpoint["file_bytes"]),
        "—" if get("others_cpu_share") is None else f"{100 * get('others_cpu_share'):.0f}%",
    ]
    return "| " + " | ".join(cells) + " |"


def report(result):
    m, checkpoint, roofline, settings = result["machine"], result["checkpoint"], result["roofline"], result["settings"]
    header = ("| configuration | runs | load s | prompt | prefill tok/s | new | decode tok/s | first ms/tok "
              "| last ms/tok | last/first | peak GiB | peak/ckpt | others' CPU |")
    bandwidth_gb_per_s = divide(roofline["bandwidth_bytes_per_s"], 1e9)
    lines = [
        f"## Decode benchmark: {m['name']} ({m['device']}, {m['cpu_cores']} cores, {m['threads']} torch threads), "
        f"torch {m['torch']}",
        "",
        f"Checkpoint: {checkpoint['path']}, random weights with Llama 3.2 1B's shapes, bf16, "
        f"{checkpoint['file_bytes'] / GIB:.2f} GiB on disk ({checkpoint['file_bytes']:,} bytes). Each number is "
        f"the median of {settings['repeats']} runs, each run "
        "in its own process.",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
        *(table_row(name, numbers, result["runs"][name], checkpoint)
          for name, numbers in result["summary"].items() if name != "bandwidth"),
        "",
        "load s: model ready from the checkpoint (file in the page cache). prefill tok/s: prompt tokens / time to "
        "the first new token. decode tok/s: tokens 2..N / their time (one step each; a beam-5 step makes 5 "
        "candidates but counts as one token). first/last ms/tok: mean step latency over the first and last window "
        "of decode steps (window size in brackets). peak GiB: the process's peak resident set size, VmHWM "
        "(max_memory_allocated on CUDA). others' CPU: the share of all cores that other programs used during the "
        f"run; above {BUSY_WARNING:.0%} the timings are not trustworthy.",
        "",
        f"Roofline: memory bandwidth {fmt(bandwidth_gb_per_s)} GB/s (best of {BANDWIDTH_TRIES} sums of a "
        f"{settings['bandwidth_gib']} GiB float32 array) / {checkpoint['bytes_per_token'] / 1e9:.3f} GB read per "
        f"decoded token = {fmt(roofline['tokens_per_s'])} tokens/s. Bytes per token = "
        f"{checkpoint['bytes_per_token_formula']}.",
        "",
        "| check | measured | target | status |",
        "|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in result["targets"]),
    ]
    lines += [f"\n{note}" for note in result["notes"]]
    return "\n".join(lines)


def notes(runs, summary, checkpoint):
    """Warnings and sanity lines: was the machine busy, how the long prefill's peak compares with the logits it
    must not materialise, do the implementations pick the same tokens (random weights, bf16: they may drift)."""
    lines = []
    busy = [name for name, name_runs in runs.items()
            if any(run.get("others_cpu_share", 0) > BUSY_WARNING for run in name_runs)]
    if busy:
        lines.append(f"WARNING: other programs used more than {BUSY_WARNING:.0%} of the CPUs during runs of "
                     f"{', '.join(busy)}: their timings are unreliable; rerun on an idle machine.")
    long, greedy = summary.get("project-prefill-long"), summary.get("project-greedy")
    if long:
        logits_bytes = long["prompt_tokens"] * checkpoint["vocab_size"] * 4
        above = ""
        if greedy:
            extra = long["peak_memory_bytes"] - greedy["peak_memory_bytes"]
            above = f", {extra / GIB:.2f} GiB above project-greedy's"
        lines.append(f"project-prefill-long: float32 logits for all {long['prompt_tokens']:.0f} positions would take "
                     f"{logits_bytes / GIB:.2f} GiB; its peak is {long['peak_memory_bytes'] / GIB:.2f} GiB{above}.")
    for ours, theirs in (("project-greedy", "transformers-greedy"), ("project-beam5", "transformers-beam5")):
        a = next((run["token_ids"] for run in runs.get(ours, []) if "token_ids" in run), None)
        b = next((run["token_ids"] for run in runs.get(theirs, []) if "token_ids" in run), None)
        if a and b:
            lines.append(f"{theirs} picks the same tokens as {ours} for the first {agreement(a, b)} of {len(a)} "
                         "(bf16 rounding differs between implementations; information only).")
    return lines


# ---------------------------------------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------------------------------------
def parse_args():
    parser = argparse.ArgumentParser(description="Benchmark decoding of a random Llama 3.2 1B checkpoint: the "
                                     "project's scripts, transformers, the original approach and the roofline.")
    parser.add_argument("--only", default=",".join(CONFIGURATIONS),
                        help=f"comma-separated configurations to run (default: all): {', '.join(CONFIGURATIONS)}")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS,
                        help="new tokens per generation (default %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS, help="prompt length (default %(default)s)")
    parser.add_argument("--long-prompt-tokens", type=int, default=LONG_PROMPT_TOKENS,
                        help="prompt of project-prefill-long (default %(default)s)")
    parser.add_argument("--original-new-tokens", type=int, default=ORIGINAL_NEW_TOKENS,
                        help="new tokens of original-fp32-recompute (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=REPEATS,
                        help="runs per configuration; the median is reported (default %(default)s)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default %(default)s")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each run (default: torch's choice)")
    parser.add_argument("--bandwidth-gib", type=float, default=BANDWIDTH_GIB,
                        help="array size for the bandwidth read (default %(default)s)")
    parser.add_argument("--checkpoint-dir", type=Path, default=CHECKPOINT_DIR,
                        help="where the checkpoint is cached (default %(default)s)")
    parser.add_argument("--json", type=Path, default=RESULTS_FILE, help="results file (default %(default)s)")
    parser.add_argument("--run", choices=list(CONFIGURATIONS), help=argparse.SUPPRESS)  # internal: one child run
    args = parser.parse_args()
    unknown = set(args.only.split(",")) - set(CONFIGURATIONS)
    if unknown:
        parser.error(f"unknown configuration {', '.join(sorted(unknown))}; choose from {', '.join(CONFIGURATIONS)}")
    if min(args.new_tokens, args.original_new_tokens) < 2 or args.prompt_tokens < 1 or args.repeats < 1:
        parser.error("--new-tokens and --original-new-tokens must be at least 2, "
                     "--prompt-tokens and --repeats at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    return args


def progress_line(result):
    if "error" in result:
        return f"error: {result['error']}"
    numbers = summarise([result])
    return ", ".join(f"{key} {value:.3g}" for key, value in numbers.items() if key.endswith(("_s", "_per_s")))


def run_all(args, model_dir):
    """Every chosen configuration, --repeats times, round-robin, each in a fresh process."""
    chosen = [name for name in CONFIGURATIONS if name in args.only.split(",")]
    runs = {name: [] for name in chosen}
    for repeat in range(args.repeats):
        for name in chosen:
            warm = f" (page cache warmed in {warm_page_cache(model_dir):.1f} s)" if name != "bandwidth" else ""
            print(f"[{repeat + 1}/{args.repeats}] {name}{warm} ...", file=sys.stderr)
            runs[name].append(run_child(name, args))
            print(f"    {progress_line(runs[name][-1])}", file=sys.stderr)
    return runs


def main():
    args = parse_args()
    if args.run:
        return run_configuration(args)
    model_dir = args.checkpoint_dir / CHECKPOINT_NAME
    ensure_checkpoint(model_dir)
    checkpoint = describe_checkpoint(model_dir)
    runs = run_all(args, model_dir)
    summary = {name: summarise(name_runs) for name, name_runs in runs.items()}
    bandwidth = (summary.get("bandwidth") or {}).get("bandwidth_bytes_per_s")
    roofline = {"bandwidth_bytes_per_s": bandwidth, "bytes_per_token": checkpoint["bytes_per_token"],
                "tokens_per_s": bandwidth and bandwidth / checkpoint["bytes_per_token"]}
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    result = {"machine": machine(args, runs), "settings": settings, "checkpoint": checkpoint, "roofline": roofline,
              "summary": summary, "runs": runs,
              "targets": target_rows(summary, checkpoint, roofline["tokens_per_s"]),
              "notes": notes(runs, summary, checkpoint)}
    print(report(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"\nwritten to {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
