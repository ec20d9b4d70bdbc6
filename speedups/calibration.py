"""How each linear layer's layout and kernels are chosen: measured on this CPU, or a fixed rule; the cache of
what was measured; and StepThreads, which picks the number of threads while decoding.

The setting KERNELS (each script has it; support/settings.py checks it with `kernel_choice`):
    measure          (the default) measure on a CPU, or read the timings measured there before
    rule             no measuring, threads left alone: the fixed rule (deterministic: the tests use it)
    mv,w8a8          these kernels (names in kernels.KERNELS) wherever they serve the format and rows;
                     the rule elsewhere

Measuring (`calibrate`). Every candidate in KERNELS that serves the format on a CPU is first tried on a
sample of the model's own weights, once per weight shape and row class: a layout this CPU cannot build, a
kernel that raises, and a kernel whose product is wrong are skipped, named, and remembered. Right means
within CHECK_TOLERANCE (relative to the norm of the output, for its dtype) of a float32 product of the
same quantised weights and of the input rounded as the kernel declares (kernels.Kernel.activations):
oneDNN's int8 x int8 on a CPU without VNNI adds pairs of products in 16 bits, which saturate, and was 7-9%
off here; a correct kernel differs by its output's rounding only. The survivors are then timed within
CALIBRATION_SECONDS, and `choose` picks from the timings (a pure function). Timings and skips are cached in
a small JSON file under the user's cache directory ($XDG_CACHE_HOME when it is an absolute path, as the
XDG specification says, else ~/.cache; folder CACHE_FOLDER), keyed by the CPU, torch version, threads,
format, rows and weight shape, so later loads measure nothing.

Other devices, and KERNELS=rule, keep a fixed rule (`rule_seconds`), whose choices are tried the same way
(built and run once per shape), falling back to the base layout's own kernels where they fail.
"""

import contextlib
import functools
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from speedups import native
from speedups.kernels import DEFAULT_KERNEL, KERNELS, base_layout, round_activations
from speedups.layouts import FORMATS, ROW_CLASSES, PlainLinear

CALIBRATION_SECONDS = 2.0  # the most the timing may take, once per cache key (paging the weights in aside)
CALIBRATION_ROUNDS = 3  # each candidate is timed up to this many times, interleaved; the fastest counts
CALIBRATION_VERSION = 8  # part of the cache key: raise it when what is measured or how it is chosen changes
# A stock kernel replaces the project's own (C++) one only when it times faster by more than this factor. Timed one
# layer at a time, a stock kernel's extra PyTorch operations per call (w8a8 rounds the input in six) cost less
# than they do in the model's order: a choice of w8a8 timed 4% faster than q8 on three shapes decoded 13% slower
# than q8 everywhere, in one process, the two taking turns (benchmarks/README.md, "A margin for our kernels").
OURS_MARGIN = 1.15
SWEEP_BYTES = 2**30  # the weights one timed pass streams: more than this machine's caches (a 480 MiB L3)
CHUNK_ROWS = 256  # a prompt chunk is timed with the scripts' PREFILL_CHUNK rows (compute-bound: one layer per shape)
FEW_TIMED = 8  # a few rows (a short prompt's) are timed with this many, where beam search does not say
SAMPLE_MAX_WEIGHTS = 2**26  # larger weights (the output layer) are not copied into another layout to be timed
CHECK_ROWS = 64  # output rows of the sample compared with the float32 product (a multiple of INT4_PACK_ROWS)
# The largest relative error (Frobenius norm over the checked outputs) a right kernel may have: the
# rounding of its output, about half a unit in the last place of the output's dtype (bfloat16: 2^-9 of a
# value, 0.2%; 0.1% of the norm on a random input), twice over for the summation order. A float32 output
# may differ in its summation order only.
CHECK_TOLERANCE = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 1e-5}
CACHE_FOLDER = "llama-scripts"  # under $XDG_CACHE_HOME or ~/.cache
CACHE_FILE = "kernels.json"
REASON_CHARS = 60  # a skipped kernel's reason is cut to this


def kernel_choice(value):
    """The KERNELS setting: "measure", "rule", or a list of kernel names; ValueError says what is wrong."""
    value = value.strip() or "measure"
    if value in ("measure", "rule"):
        return value
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in KERNELS]
    if unknown or not names:
        named = ", ".join(unknown) if unknown else repr(value)
        raise ValueError(f"unknown kernel {named}; choose measure, rule, or names from: {', '.join(KERNELS)}")
    return names


def plan_kernels(modules, device, dtype, quantize, few_rows, setting="measure", ours=False):
    """({weight shape: (layout, {row class: kernel name})}, {kernel: why it was skipped}, a short report of
    what was chosen and how, a TimingsCheck or None). modules: the model's linear layers in their base
    layout, in the model's order; ours: whether the project's own kernels were built (native.py)."""
    setting = kernel_choice(setting) if isinstance(setting, str) else setting
    decode_class = "one" if few_rows == 1 else "few"
    shapes = {module.shape for module in modules}
    if setting == "measure" and device.type == "cpu":
        seconds, skipped, how = calibrate(modules, dtype, quantize, few_rows, ours)
        plans = {shape: choose(seconds[shape], decode_class) for shape in shapes}
        linears = sum(seconds[m.shape][decode_class].get(plans[m.shape][1][decode_class], 0) for m in modules)
        keys = [cache_key(shape, rows, dtype, quantize, few_rows, ours) for shape in shapes for rows in ROW_CLASSES]
        report = how + "; " + rates_report(seconds, modules, plans, dtype, quantize, few_rows) + native_report(ours)
        return plans, skipped, report, TimingsCheck(linears, keys)
    seconds = rule_seconds(quantize, device, dtype, few_rows)
    how = f"kernels by the fixed rule on {device.type}"
    if setting == "rule":
        how = "kernels by the fixed rule (KERNELS=rule)"
    elif setting != "measure":
        seconds = forced_seconds(setting, quantize, device, dtype, few_rows)
        how = f"kernels forced by KERNELS={','.join(setting)}"
    plan = choose(seconds, decode_class)
    used = ", ".join(f"{rows} {plan[1][rows]}" for rows in ROW_CLASSES)
    return dict.fromkeys(shapes, plan), {}, f"{how}: {used}", None


def native_report(ours):
    """The project's own kernels, in a clause: the instruction sets they run here, or why there are none."""
    if ours:
        return (f"; our C++ kernels ({native.variants('int8')[0]} for 8 and 4 bits, {native.variants('bf16')[0]} for "
                "bfloat16)")
    return f"; our C++ kernels: not available ({native.why_unavailable()}), PyTorch's only"


def choose(seconds, decode_class):
    """The choice for one weight shape, a pure function of timings: seconds {row class: {kernel: seconds per
    product}} (measured, cached, or the rule's stand-ins) -> (layout, {row class: kernel}). The layout is
    that of the kernel fastest for the rows decoding uses (decode_class: "one", or "few" for beam search);
    every row class then takes the fastest kernel timed on that layout, or the layout's default. Stock kernels'
    times count OURS_MARGIN times longer beside our own."""
    def weighed(times):
        return {name: s if KERNELS[name].ours else s * OURS_MARGIN for name, s in times.items()}

    decoding = weighed(seconds[decode_class])
    layout = KERNELS[min(decoding, key=decoding.get)].layout
    kernels = {}
    for rows in ROW_CLASSES:
        options = {name: s for name, s in weighed(seconds.get(rows, {})).items()
                   if KERNELS[name].layout is layout and rows in KERNELS[name].rows}
        kernels[rows] = min(options, key=options.get) if options else DEFAULT_KERNEL[layout][rows]
    return layout, kernels


def rule_seconds(quantize, device, dtype, few_rows):
    """Stand-in timings (1 s each) for the fixed rule: what runs on devices other than CPUs, and with
    KERNELS=rule. One row: PyTorch's own kernel on CPUs; several rows: oneDNN's, on weights packed for it
    (beam search); int8: PyTorch's int8-weight kernel (CPU, mps), a 16-bit copy for prompt chunks."""
    if quantize == "int4":
        return {rows: {"int4": 1.0} for rows in ROW_CLASSES}
    if quantize == "int8":
        kernel = "w8" if device.type in KERNELS["w8"].devices else "w8-copy"
        return {"one": {kernel: 1.0}, "few": {kernel: 1.0}, "chunk": {"w8-copy": 1.0}}
    if device.type != "cpu":
        return {rows: {"linear": 1.0} for rows in ROW_CLASSES}
    if packs_weights(device, dtype, few_rows):
        return {rows: {"packed": 1.0} for rows in ROW_CLASSES}
    return {"one": {"linear-native": 1.0}, "few": {"linear": 1.0}, "chunk": {"linear": 1.0}}


def packs_weights(device, dtype, rows):
    """The fixed rule's packing: several rows per step (beam search), on an x86 CPU where oneDNN has fast
    kernels for the dtype (bfloat16 needs AVX-512 bfloat16 or AMX instructions)."""
    if device.type != "cpu" or rows == 1 or not torch.backends.mkldnn.is_available():
        return False
    x86 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    if dtype == torch.bfloat16:
        return x86 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return x86 and dtype == torch.float32


def forced_seconds(names, quantize, device, dtype, few_rows):
    """The rule's stand-ins, with the named kernels (KERNELS=mv,w8a8) at 0 s wherever they serve."""
    seconds = rule_seconds(quantize, device, dtype, few_rows)
    for name in names:
        kernel = KERNELS[name]
        if kernel.layout.FORMAT == quantize and device.type in kernel.devices:
            for rows in kernel.rows:
                seconds[rows] = {**seconds.get(rows, {}), name: 0.0}
    return seconds


def rates_report(seconds, modules, plans, dtype, quantize, few_rows):
    """Per row class: GB/s of weights per kernel timed (over all the model's layers where timed), and the
    kernels chosen."""
    bits = FORMATS[quantize].bits or torch.finfo(dtype).bits
    count = {}
    for module in modules:
        count[module.shape] = count.get(module.shape, 0) + 1
    labels = {rows: f"{count} row{'s' if count > 1 else ''}" for rows, count in rows_timed(few_rows).items()}
    parts = []
    for rows in ROW_CLASSES:
        weight_bytes, total = {}, {}
        for shape, by_rows in seconds.items():
            for name, s in by_rows.get(rows, {}).items():
                weight_bytes[name] = weight_bytes.get(name, 0) + count[shape] * shape[0] * shape[1] * bits / 8
                total[name] = total.get(name, 0) + count[shape] * s
        if not total:
            continue
        rates = sorted(((weight_bytes[name] / total[name] / 1e9, name) for name in total), reverse=True)
        chosen = sorted({plans[shape][1][rows] for shape in count})
        rates_text = ", ".join(f"{name} {rate:.1f}" for rate, name in rates)
        parts.append(f"{labels[rows]}: {rates_text} GB/s -> {'/'.join(chosen)}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Trying a kernel: does it build, run, and compute the right product?
# ---------------------------------------------------------------------------------------------------------
def build_layout(layout, module, dtype, few_rows, release=True):
    """(the module converted to `layout`, None) or (None, why it cannot be built here)."""
    try:
        return layout(module, dtype, few_rows, release=release), None
    except Exception as error:  # an instruction set or a build of PyTorch without it: raises anything
        return None, f"cannot build {layout.__name__}: {reason(error)}"


def product_error(kernel, target, sample, x):
    """(relative error of the kernel's product on x against the float32 product of the same weights, None), or
    (None, why it failed). sample: the layer in its base layout (source of the reference)."""
    try:
        out = kernel.run(target, x)
    except Exception as error:
        return None, f"fails: {reason(error)}"
    expected = round_activations(kernel, x).float() @ sample.dequantized(CHECK_ROWS).T
    got = out[:, :CHECK_ROWS].float()
    return ((got - expected).norm() / expected.norm().clamp(min=torch.finfo(torch.float32).tiny)).item(), None


def check_input(rows, in_features, dtype):
    """A sample input: uniform in [-1, 1), so that 8-bit codes of the activations fill their whole range (a
    kernel whose integer sums saturate shows it)."""
    generator = torch.Generator().manual_seed(rows * 100003 + in_features)
    return (2 * torch.rand(rows, in_features, generator=generator) - 1).to(dtype)


def vet(kernel, target, sample, rows_count, dtype):
    """None if the kernel builds on, runs and computes the product of `target` (the sample in the kernel's
    layout) within CHECK_TOLERANCE; else why not, in a few words."""
    error, why = product_error(kernel, target, sample, check_input(rows_count, sample.in_features, dtype))
    if why:
        return why
    if not error <= CHECK_TOLERANCE.get(dtype, CHECK_TOLERANCE[torch.float32]):  # NaN fails too
        return f"wrong here: {error:.1%} off"
    return None


def reason(error):
    """An exception in a few words: its first line, cut short."""
    text = (str(error).splitlines() or [type(error).__name__])[0]
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3].rsplit(" ", 1)[0] + "..."


# ---------------------------------------------------------------------------------------------------------
# Measuring the candidates on this CPU, once per cache key.
# ---------------------------------------------------------------------------------------------------------
def calibrate(modules, dtype, quantize, few_rows, ours=False):
    """({weight shape: {row class: {kernel: seconds per product}}}, {kernel: why skipped}, how they were
    obtained): from the cache file where it holds every key, else measured on the model's own weights and
    written to it.

    The base layout's kernels (PlainLinear, Int8Linear, ...) run on every layer of a pass that streams
    SWEEP_BYTES of the model's weights, as decoding does; another layout's (PackedLinear, PackedInt8Linear)
    on a copy of one layer per shape, timed in the same pass (the rest of the pass evicts it from the caches
    between timings) and freed before the model is converted. Prompt chunks (compute-bound) are timed on that
    one layer per shape. Candidates take turns, up to CALIBRATION_ROUNDS rounds within CALIBRATION_SECONDS
    (one round at least); the fastest round counts."""
    keys = {(shape, rows): cache_key(shape, rows, dtype, quantize, few_rows, ours)
            for shape in {module.shape for module in modules} for rows in ROW_CLASSES}
    cache = read_cache()
    if all(key in cache for key in keys.values()):
        seconds, skipped = {}, {}
        for (shape, rows), key in keys.items():
            if cache[key]["seconds"]:
                seconds.setdefault(shape, {})[rows] = cache[key]["seconds"]
            skipped.update(cache[key]["skipped"])
        return seconds, skipped, f"kernels measured on this CPU earlier (cached in {cache_path()})"
    seconds, skipped, warmup_s, timing_s = time_candidates(modules, dtype, quantize, few_rows, ours)
    entries = {key: {"seconds": seconds.get(shape, {}).get(rows, {}), "skipped": skipped}
               for (shape, rows), key in keys.items()}
    stored = write_cache(entries)
    return seconds, skipped, (f"kernels measured on this CPU in {timing_s:.1f} s (+ {warmup_s:.1f} s reading the "
                              f"weights in and trying each kernel), {stored}")


def rows_timed(few_rows):
    """{row class: the rows its products are timed with}: a few are beam search's (few_rows), or FEW_TIMED."""
    return {"one": 1, "few": few_rows if few_rows > 1 else FEW_TIMED, "chunk": CHUNK_ROWS}


def time_candidates(modules, dtype, quantize, few_rows, ours=False):
    """({shape: {row class: {kernel: seconds}}}, {kernel: why skipped}, seconds preparing, seconds timing)."""
    start = time.perf_counter()
    base, decode_class = base_layout(quantize, ours), "one" if few_rows == 1 else "few"
    candidates = [kernel for kernel in KERNELS.values() if kernel.layout.FORMAT == quantize and "cpu" in kernel.devices
                  and kernel.candidate and (ours or not kernel.ours) and dtype in (kernel.dtypes or (dtype,))]
    if decode_class == "one":
        # Decoding one row keeps the base layout. Another layout is timed on one copied layer, which cannot show
        # how a whole model in it streams its weights, and one row is all streaming: on a copy, oneDNN's packed
        # bfloat16 layout timed faster than PyTorch's kernel, and the model it was then chosen for decoded
        # slower than with PyTorch's kernel everywhere (benchmarks/README.md, 2026-12-07).
        candidates = [kernel for kernel in candidates if kernel.layout is base]
    sweep = timing_sweep(modules, dtype)
    samples = {}  # shape: its first layer in the sweep
    for module in sweep:
        samples.setdefault(module.shape, module)
    copies, skipped = other_layouts(candidates, base, samples, dtype, few_rows)
    chunk_samples = [sample for shape, sample in samples.items() if shape[0] * shape[1] <= SAMPLE_MAX_WEIGHTS]
    rows_in = rows_timed(few_rows)
    inputs = {(rows, n): torch.randn(rows_in[rows], n, dtype=dtype) for rows in ROW_CLASSES
              for n in {module.in_features for module in sweep}}
    evict = KERNELS[DEFAULT_KERNEL[base]["one"]].run

    def target(kernel, module):  # the layer in the kernel's layout, or None where it is not timed on it
        if kernel.layout is base:
            return module
        return copies.get((kernel.layout, module.shape)) if module is samples[module.shape] else None

    def one_pass(kernel, rows):  # {shape: seconds per product}
        total, calls = {}, {}
        for module in sweep if rows != "chunk" else chunk_samples:
            x = inputs[rows, module.in_features]
            layer = target(kernel, module)
            if layer is None:
                if rows != "chunk":
                    evict(module, x[:1])  # streams the weight as decoding would, untimed
                continue
            begin = time.perf_counter()
            kernel.run(layer, x)
            total[module.shape] = total.get(module.shape, 0.0) + time.perf_counter() - begin
            calls[module.shape] = calls.get(module.shape, 0) + 1
        return {shape: total[shape] / calls[shape] for shape in total}

    with torch.inference_mode():
        for module in sweep:  # reads the memory-mapped weights in, and starts the threads
            evict(module, inputs["one", module.in_features])
        tasks = []  # (kernel, row class) to time: those that run right on every sample
        for rows in sorted(ROW_CLASSES, key=lambda rows: rows != decode_class):
            for kernel in candidates:
                if rows not in kernel.candidate_rows or kernel.name in skipped:
                    continue
                for sample in samples.values() if rows != "chunk" else chunk_samples:  # also builds oneDNN's
                    layer = target(kernel, sample)
                    why = vet(kernel, layer, sample, rows_in[rows], dtype) if layer is not None else None
                    if why:
                        skipped[kernel.name] = why
                        break
                else:
                    tasks.append((kernel, rows))
        timing_start = time.perf_counter()
        seconds = {}
        for round_ in range(CALIBRATION_ROUNDS):
            for kernel, rows in tasks:
                if kernel.name in skipped:
                    continue
                if round_ and time.perf_counter() - timing_start > CALIBRATION_SECONDS:
                    break  # out of time: what was timed decides (every kernel for every row class once at least)
                for shape, s in one_pass(kernel, rows).items():
                    best = seconds.setdefault(shape, {}).setdefault(rows, {})
                    best[kernel.name] = min(best.get(kernel.name, s), s)
    return seconds, skipped, timing_start - start, time.perf_counter() - timing_start


def other_layouts(candidates, base, samples, dtype, few_rows):
    """({(layout, shape): a temporary copy of the shape's sample in that layout}, {kernel: why skipped}) for
    the candidates' layouts other than the base one; a layout this CPU cannot build skips its kernels."""
    copies, broken = {}, {}
    for layout in dict.fromkeys(kernel.layout for kernel in candidates if kernel.layout is not base):
        for shape, sample in samples.items():
            if shape[0] * shape[1] <= SAMPLE_MAX_WEIGHTS and layout not in broken:
                copies[layout, shape], why = build_layout(layout, sample, dtype, few_rows, release=False)
                if why:
                    broken[layout] = why
    skipped = {kernel.name: broken[kernel.layout] for kernel in candidates if kernel.layout in broken}
    return {key: copy for key, copy in copies.items() if copy is not None}, skipped


def timing_sweep(modules, dtype):
    """The layers one timed pass runs: the last (the output layer) and the first ones in the model's order,
    up to SWEEP_BYTES; floating-point weights in another dtype than the run's are copied into it."""
    chosen, total = [modules[-1]], modules[-1].weight.nbytes
    for module in modules[:-1]:
        if total < SWEEP_BYTES or module.shape not in {other.shape for other in chosen}:  # every shape once
            chosen.append(module)
            total += module.weight.nbytes
    chosen = [copy_in_dtype(module, dtype) for module in chosen]
    return chosen


def copy_in_dtype(module, dtype):
    """The module itself, its scales in dtype (as model.to(dtype) leaves them), or, for a plain weight in another
    dtype, a stand-in holding a copy in dtype (converting the layer here would untie a tied weight)."""
    if not isinstance(module, PlainLinear):
        return module.to(dtype)
    if module.weight.dtype == dtype:
        return module
    weight = module.weight.detach().to(dtype)
    return SimpleNamespace(weight=weight, shape=module.shape, in_features=module.in_features,
                           out_features=module.out_features, reduce=module.reduce, gather=module.gather,
                           dequantized=lambda rows: weight[:rows].float())


# ---------------------------------------------------------------------------------------------------------
# The cache of timings: a small JSON file, one entry per key.
# ---------------------------------------------------------------------------------------------------------
@functools.cache
def machine_key():
    """This CPU (its model name and a digest of its feature flags), the torch version and its threads."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = [line.split(":", 1)[1].strip() for line in lines if line.startswith(("flags", "Features"))]
    cpu = names[0] if names else platform.processor() or platform.machine()
    digest = hashlib.sha256((flags[0] if flags else "").encode()).hexdigest()[:12]
    return f"{cpu} flags:{digest} {platform.machine()} torch {torch.__version__} threads {torch.get_num_threads()}"


def cache_key(shape, rows, dtype, quantize, few_rows, ours=False):
    format_ = f"{str(dtype).removeprefix('torch.')}{'/' + quantize if quantize else ''}"
    rows_count = rows_timed(few_rows)[rows]
    return (f"{machine_key()} | {format_} | {rows} rows {rows_count} | weight {shape[0]}x{shape[1]} "
            f"| {'with' if ours else 'without'} our kernels | choice v{CALIBRATION_VERSION}")


def cache_folder():
    """$XDG_CACHE_HOME/CACHE_FOLDER, or ~/.cache/CACHE_FOLDER where it is unset, empty or relative (the XDG
    specification says to ignore a relative path)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return root / CACHE_FOLDER


def cache_path():
    return cache_folder() / CACHE_FILE


def read_cache():
    """The cached entries, or {} where the file is missing, unreadable or not what this module writes."""
    try:
        cache = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict):
        return {}
    return {key: value for key, value in cache.items() if well_formed(value)}


def well_formed(entry):
    """{"seconds": {kernel: number}, "skipped": {kernel: text}}, naming kernels that exist."""
    if not isinstance(entry, dict) or set(entry) != {"seconds", "skipped"}:
        return False
    seconds, skipped = entry["seconds"], entry["skipped"]
    return (isinstance(seconds, dict) and isinstance(skipped, dict)
            and all(name in KERNELS and isinstance(s, (int, float)) for name, s in seconds.items())
            and all(name in KERNELS and isinstance(why, str) for name, why in skipped.items()))


def write_cache(entries, dropped=()):
    """Add entries to the cache file (and drop the keys `dropped`) atomically (a temporary file renamed over
    it): readers never see half a file, and a corrupt one is replaced. Returns what happened, in words:
    "cached in PATH", or "not cached (why)". A temporary file left by a process killed while writing is removed."""
    path = cache_path()
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(path)
        kept = {key: entry for key, entry in read_cache().items() if key not in dropped}
        temporary.write_text(json.dumps({**kept, **entries}, indent=1, sort_keys=True))
        os.replace(temporary, path)
        return f"cached in {path}"
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        return f"not cached ({path.parent}: {error.strerror or type(error).__name__})"


def remove_abandoned(path):
    """Temporary files of the cache whose writing process no longer runs."""
    for temporary in path.parent.glob(f"{path.name}.*.tmp"):
        pid = temporary.name[len(path.name) + 1 : -len(".tmp")]
        if pid.isdigit() and not process_exists(int(pid)):
            temporary.unlink(missing_ok=True)


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


# ---------------------------------------------------------------------------------------------------------
# While decoding: do the cached timings still hold, and how many threads.
# ---------------------------------------------------------------------------------------------------------
class TimingsCheck:
    """Whether the kernel timings this load used (measured now or cached earlier) still describe this machine.
    A calibration taken while another job kept the cores busy times every kernel slow and may choose
    wrongly, and the cache would keep that choice for good. The timings say how long one decode step's linear
    layers take; a whole step takes longer than that. So when the median of the first STEPS decode steps
    (at the thread count that was timed) is shorter than FASTER times it, the machine was busier when it was
    measured: the entries are dropped from the cache, and the next load measures again (said on stderr)."""

    STEPS = 8  # decode steps compared
    FASTER = 0.7  # steps this much shorter than the timings' linear layers alone: measured on a busier machine

    def __init__(self, linear_seconds, keys):
        self.linear_seconds, self.keys = linear_seconds, keys
        self.threads = torch.get_num_threads()
        self.steps = []
        self.last = None

    def step(self, decoding):
        now = time.perf_counter()
        if decoding and self.last is not None and torch.get_num_threads() == self.threads:
            self.steps.append(now - self.last)
            if len(self.steps) == self.STEPS and median(self.steps) < self.FASTER * self.linear_seconds:
                said = write_cache({}, dropped=self.keys)
                print(f"(the kernel timings were taken while this machine was busier than now: "
                      f"{1000 * median(self.steps):.0f} ms decode steps, {1000 * self.linear_seconds:.0f} ms "
                      f"timed for their linear layers alone; measured again at the next load; {said})",
                      file=sys.stderr)
        self.last = time.perf_counter() if decoding and len(self.steps) < self.STEPS else None


# The number of threads while decoding.
# ---------------------------------------------------------------------------------------------------------
class StepThreads:
    """The number of CPU threads, chosen while decoding by timing steps. PyTorch's threads wait for each
    other at the end of every operation: when another process occupies one of the cores, a 2-thread decode
    step waits for the thread that is not running, and took 3 to 6 times as long as a 1-thread step here
    (benchmarks/README.md). So TRIAL decode steps run with the other count (1 or all the threads PyTorch had),
    and the count whose median step was shorter is kept. A trial costs: its steps run at the slower count
    when nothing is busy. So trials come seldom while they keep all the threads (after TRIAL steps, then
    PERIOD steps, then twice as many each time, up to MAX_PERIOD), at once when the kept count's steps become
    SLOWDOWN times slower than when it was kept (the machine got busier), and every PERIOD steps while one thread is
    kept (so that all come back soon after the machine is quiet again). One thread is kept only where its median
    step is FEWER_MARGIN times shorter than all threads': on a quiet machine a 1-thread step of the 1B model took
    1.13 (int4) to 1.21 (int8) times a 2-thread one, close enough that four noisy steps could pick one thread for
    the next PERIOD steps; a busy core made it 3 to 6 times shorter. A trial whose first step already loses by
    that rule (taken as the trial's median) ends there: on a quiet machine every trial of one thread does, so it
    costs one slower step, not TRIAL (in a 64-token run, two full trials made 8 of its steps 13-21% slower).
    Steps are timed from one decode step's end to the next, so the prompt's chunks and what the script does
    between steps are left out as long as they are alike for both counts."""

    TRIAL = 4  # steps of each trial
    PERIOD = 32  # decode steps between the first trial and the second; doubled after each trial that keeps
    MAX_PERIOD = 1024  # the count, up to this
    SLOWDOWN = 1.5  # kept count's median step over the one it was kept with, beyond which a trial starts at once
    FEWER_MARGIN = 1.1  # how much shorter one thread's median step must be to be kept instead of all threads

    def __init__(self, threads):
        self.counts = (threads, 1)
        self.current = threads
        self.steps = {count: [] for count in self.counts}  # recent step times per count
        self.last = None
        self.taken = 0
        self.period = self.PERIOD
        self.next_trial = self.TRIAL  # decode steps taken when the next trial starts
        self.kept_step = None  # the median step of the kept count when it was kept

    def step(self, decoding):
        now = time.perf_counter()
        if decoding and self.last is not None:
            recent = self.steps[torch.get_num_threads()]
            recent.append(now - self.last)
            del recent[: -self.TRIAL]
            self.taken += 1
            self.switch()
        self.last = time.perf_counter() if decoding else None

    def switch(self):
        threads = torch.get_num_threads()
        if threads != self.current:  # a trial of the other count: over once it has TRIAL steps
            trial = self.steps[threads]
            lost = len(trial) == 1 and not self.wins(threads, trial[0], median(self.steps[self.current]))
            if lost or len(trial) >= self.TRIAL:
                kept = self.current if lost else self.faster()
                backing_off = kept == self.current == self.counts[0]  # on one thread, try all again every PERIOD
                self.period = min(2 * self.period, self.MAX_PERIOD) if backing_off else self.PERIOD
                self.current, self.kept_step = kept, median(self.steps[kept])
                self.steps[kept].clear()  # slower steps from now on are measured against kept_step
                self.next_trial = self.taken + self.period
                torch.set_num_threads(kept)
        elif self.taken >= self.next_trial or self.busier():
            other = self.counts[1] if self.current == self.counts[0] else self.counts[0]
            self.steps[other].clear()
            torch.set_num_threads(other)

    def faster(self):
        """All threads, unless one thread's median step is FEWER_MARGIN times shorter."""
        every, one = (median(self.steps[count]) for count in self.counts)
        return self.counts[1] if self.wins(1, one, every) else self.counts[0]

    def wins(self, count, step, other_step):
        """Whether `count` threads taking `step` seconds a step are kept against the other count taking
        `other_step`."""
        one, every = (step, other_step) if count == 1 else (other_step, step)
        return (one * self.FEWER_MARGIN < every) == (count == 1)

    def busier(self):
        recent = self.steps[self.current]
        return (self.kept_step is not None and len(recent) >= self.TRIAL
                and median(recent) > self.SLOWDOWN * self.kept_step)

    def __repr__(self):
        return f"StepThreads(now {torch.get_num_threads()}, choosing between {self.counts[0]} and 1)"


def median(values):
    return sorted(values)[len(values) // 2] if values else float("inf")
