"""The fastest measured way to run a CNN on this machine: candidate paths, a quick probe, a cache.

A *path* is how a batch goes through a model: the engine (``torch`` eager, ``jit`` = TorchScript
traced and frozen, ``onnx`` = ONNX Runtime, ``compile`` = torch.compile), the memory layout (NCHW
or channels_last), the grad mode (``no_grad`` or ``inference_mode``), the batch size, the number of
CPU threads, and on CUDA the autocast dtype and ``cudnn.benchmark``. Which one is fastest depends
on the CPU or GPU, the backbone and the tile size (issue 17: channels_last + inference_mode was
0.84-0.94x the plain loop on one 2-core CPU, 1.6x on another), so the kit never fixes one: it
measures.

The rule (`choose`): the baseline (torch, NCHW, ``no_grad``, fp32, the configured batch size and
threads) is always measured in the same run, interleaved with the candidates (round-robin, the
order rotated every round; medians over rounds). A candidate is adopted only when

* its probabilities match the baseline's on the probe batch: max |difference| <= ``EXACT_ATOL``
  (1e-5) for fp32 paths; reduced-precision paths (AMP fp16/bf16) only when the caller allows them
  (default: on CUDA only) and within ``REDUCED_ATOL``; and
* its median time per tile is at least ``MARGIN`` (5%) below the baseline's (noise on a shared
  machine must not flip the choice to a slower path).

Otherwise the baseline is kept. The search is staged (engine x layout x mode at the configured
batch size, then batch size, then threads), each stage against the baseline in the same run.
The probe that `predict` runs is bounded (``PROBE_BUDGET_S`` per model kind,
``$KIT_THROUGHPUT_BUDGET_S`` to change it, 0 for none): stage 1 always runs (its rounds stop at
the budget), a later stage only when its cost estimated from stage 1 fits in what is left; the
record lists the skipped stages. `kit bench` searches without a budget.

Cache: one JSON file (``$KIT_THROUGHPUT_CACHE``, default ``~/.cache/kit/throughput.json``)::

    {"<key>": {"path": {...InferencePath...}, "ratio": 1.9, "baseline_tiles_s": 70.1,
               "tiles_s": 133.0, "max_abs_diff": 1.5e-06, "when": "...", "machine": {...}}}

``<key>`` hashes the machine (CPU model, cores, CUDA device), the torch and onnxruntime versions
and the model signature (class names, parameter count, input shape, number of fold models), so a
new machine, library or backbone probes again; ``KIT_THROUGHPUT_PROBE=0`` skips probing (baseline).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from kit.atomic import atomic_open

EXACT_ATOL = 1e-5  # fp32 paths must give the baseline's probabilities to this
REDUCED_ATOL = 1e-2  # AMP paths, when allowed
MARGIN = 0.05  # a candidate must be this much faster than the baseline to be adopted
PROBE_BUDGET_S = 45.0  # the first predict's probe of one model kind: later stages are skipped past it
ENGINES = ("torch", "jit", "onnx", "compile")


@dataclass(frozen=True)
class InferencePath:
    """One way to run a model (see the module doc). The default is the plain baseline."""

    engine: str = "torch"
    channels_last: bool = False
    inference_mode: bool = False
    batch_size: int = 64
    threads: int = 0  # 0 = leave torch's setting alone
    amp: str = ""  # "" fp32, "float16" or "bfloat16" (autocast)
    cudnn_benchmark: bool = False

    @property
    def reduced_precision(self) -> bool:
        return bool(self.amp)

    @property
    def name(self) -> str:
        parts = [self.engine]
        if self.engine in ("torch", "compile", "jit"):
            parts.append("channels_last" if self.channels_last else "NCHW")
        if self.engine in ("torch", "compile"):
            parts.append("inference_mode" if self.inference_mode else "no_grad")
        if self.amp:
            parts.append(f"amp-{self.amp}")
        if self.cudnn_benchmark:
            parts.append("cudnn.benchmark")
        parts.append(f"b{self.batch_size}")
        if self.threads:
            parts.append(f"t{self.threads}")
        return " ".join(parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "InferencePath":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Measurement:
    """Timing of one path in an interleaved run: seconds per batch of `n` tiles, one per round."""

    path: InferencePath
    seconds: list[float]
    n: int
    max_abs_diff: float = 0.0
    error: str = ""

    @property
    def median_s_per_tile(self) -> float:
        return statistics.median(self.seconds) / self.n if self.seconds else float("inf")

    @property
    def tiles_per_s(self) -> float:
        s = self.median_s_per_tile
        return 1.0 / s if s > 0 and s != float("inf") else 0.0


# --------------------------------------------------------------------------------------------
# candidates and the rule


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def compile_available(device_type: str) -> bool:
    """torch.compile works offline on CUDA (Triton) and on a CPU with a C++ compiler (inductor)."""
    import shutil

    import torch

    if not hasattr(torch, "compile"):
        return False
    if device_type == "cuda":
        return True
    return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("cc") is not None


def baseline_path(batch_size: int = 64, threads: int = 0) -> InferencePath:
    return InferencePath(batch_size=int(batch_size), threads=int(threads))


def engine_candidates(device_type: str, base: InferencePath, *, onnx: bool | None = None,
                      compile: bool = False, reduced_precision: bool | None = None) -> list[InferencePath]:
    """Stage 1 of the search: engine x layout x mode (x AMP, cudnn.benchmark on CUDA), baseline first."""
    onnx = onnxruntime_available() if onnx is None else onnx
    reduced = (device_type == "cuda") if reduced_precision is None else reduced_precision
    rep = dataclasses.replace
    out = [base]
    for cl in (False, True):
        for im in (False, True):
            out.append(rep(base, channels_last=cl, inference_mode=im))
    out.append(rep(base, engine="jit", channels_last=False))
    out.append(rep(base, engine="jit", channels_last=True))
    if device_type == "cpu" and onnx:
        out.append(rep(base, engine="onnx"))  # the CPU execution provider (CUDA: the torch paths)
    if compile and compile_available(device_type):
        out.append(rep(base, engine="compile", channels_last=True, inference_mode=True))
    if device_type == "cuda":
        out += [rep(base, channels_last=cl, inference_mode=True, cudnn_benchmark=True) for cl in (False, True)]
        if reduced:
            for dtype in ("float16", "bfloat16"):
                out += [rep(base, channels_last=True, inference_mode=True, cudnn_benchmark=True, amp=dtype)]
    elif reduced:  # CPU bf16 autocast (AMX/AVX512-bf16 CPUs); only when the caller accepts it
        out.append(rep(base, channels_last=True, inference_mode=True, amp="bfloat16"))
    return _unique(out)


def batch_candidates(best: InferencePath, sizes: Sequence[int] | None = None) -> list[InferencePath]:
    """The batch sizes to try: `sizes`, or a quarter, half, once and twice the path's own."""
    if sizes is None:
        sizes = [max(1, best.batch_size // 4), max(1, best.batch_size // 2), best.batch_size, 2 * best.batch_size]
    return _unique([best] + [dataclasses.replace(best, batch_size=int(b)) for b in sizes])


def default_batch(side: int, batch_size: int = 64, ref_side: int = 128) -> int:
    """The configured batch size (meant for `ref_side` px tiles) scaled to keep the pixels per batch:
    64 tiles of 128 px, 4 fields of 512 px. Never above `batch_size`, never below 1."""
    return int(max(1, min(batch_size, round(batch_size * (ref_side / max(side, 1)) ** 2))))


def thread_candidates(best: InferencePath, cores: int | None = None) -> list[InferencePath]:
    cores = cores or os.cpu_count() or 1
    counts = sorted({cores, max(1, cores // 2), max(1, cores - 1)})
    return _unique([best] + [dataclasses.replace(best, threads=t) for t in counts])


def _unique(paths: Iterable[InferencePath]) -> list[InferencePath]:
    seen, out = set(), []
    for p in paths:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def acceptable(m: Measurement, allow_reduced: bool) -> bool:
    """Same probabilities as the baseline (EXACT_ATOL; REDUCED_ATOL for allowed AMP paths), no error."""
    if m.error or not m.seconds:
        return False
    if m.path.reduced_precision:
        return allow_reduced and m.max_abs_diff <= REDUCED_ATOL
    return m.max_abs_diff <= EXACT_ATOL


def choose(measurements: Sequence[Measurement], baseline: InferencePath, *, allow_reduced: bool = False,
           margin: float = MARGIN) -> Measurement:
    """The rule of the module doc: the fastest acceptable path if it beats the baseline by `margin`,
    else the baseline's measurement. `measurements` must contain the baseline, measured in the same run."""
    base = next((m for m in measurements if m.path == baseline), None)
    if base is None or not base.seconds:
        raise ValueError("the baseline must be measured in the same run")
    ok = [m for m in measurements if m.path != baseline and acceptable(m, allow_reduced)]
    if not ok:
        return base
    best = min(ok, key=lambda m: m.median_s_per_tile)
    if best.median_s_per_tile <= base.median_s_per_tile * (1.0 - margin):
        return best
    return base


# --------------------------------------------------------------------------------------------
# measuring


def interleaved(runners: dict, make_batch: Callable[[int], object], rounds: int,
                sizes: dict | None = None, deadline: float | None = None) -> dict:
    """{key: [seconds per call]}: every runner called once per round, order rotated each round.

    `runners` maps a key to a callable(batch); `sizes` maps a key to its batch size (the batch is
    made once per size by `make_batch`). Each runner is warmed up once (not timed). Past
    `deadline` (a `time.perf_counter()` value) no new round starts, but one round always runs.
    """
    keys = list(runners)
    sizes = sizes or {k: 0 for k in keys}
    batches = {s: make_batch(s) for s in set(sizes.values())}
    for k in keys:
        runners[k](batches[sizes[k]])
    times = {k: [] for k in keys}
    for r in range(rounds):
        if r and deadline is not None and time.perf_counter() > deadline:
            break
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for k in order:
            t0 = time.perf_counter()
            runners[k](batches[sizes[k]])
            times[k].append(time.perf_counter() - t0)
    return times


@contextlib.contextmanager
def torch_threads(n: int):
    """Temporarily run torch with `n` intra-op threads (0: unchanged)."""
    import torch

    old = torch.get_num_threads()
    if n and n != old:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if n and n != old:
            torch.set_num_threads(old)


def measure(models: Sequence, paths: Sequence[InferencePath], example, device, *, rounds: int = 5,
            activation: str = "sigmoid", reference_path: InferencePath | None = None,
            cache: dict | None = None, deadline: float | None = None) -> list[Measurement]:
    """Interleaved timings of `paths` on the fold `models` with uint8 tiles like `example`
    (``N x 4 x S x S``, repeated to each path's batch size); max |difference| of probabilities vs
    `reference_path` (default: the first path) on the same tiles."""
    import torch

    from kit.engines import build_runner

    example = np.asarray(example)
    runners, sizes, errors = {}, {}, {}
    for p in paths:
        try:
            runners[p] = build_runner(models, p, device, example, activation=activation, cache=cache)
            sizes[p] = p.batch_size
        except Exception as exc:  # an engine that does not work here (no compiler, export failure)
            errors[p] = f"{type(exc).__name__}: {exc}"[:300]

    def make_batch(n: int):
        reps = int(np.ceil(n / len(example)))
        return np.ascontiguousarray(np.concatenate([example] * reps)[:n])

    def call(p):
        r = runners[p]
        return lambda b: (_with_threads(p.threads, r, b))

    ref_key = reference_path or paths[0]
    check = make_batch(min(len(example), 16))
    outputs = {}
    for p, r in runners.items():
        try:
            outputs[p] = _with_threads(p.threads, r, check)
        except Exception as exc:
            errors[p] = f"{type(exc).__name__}: {exc}"[:300]
    for p in errors:
        runners.pop(p, None)
    times = interleaved({p: call(p) for p in runners}, make_batch, rounds, {p: sizes[p] for p in runners},
                        deadline)
    ref = outputs.get(ref_key)
    out = []
    for p in paths:
        if p in errors:
            out.append(Measurement(p, [], p.batch_size, float("inf"), errors[p]))
            continue
        diff = float(np.abs(outputs[p] - ref).max()) if ref is not None else float("nan")
        out.append(Measurement(p, times[p], p.batch_size, diff))
    del torch
    return out


def _with_threads(n: int, runner, batch):
    with torch_threads(n):
        return runner(batch)


def staged_search(models: Sequence, example, device, *, batch_size: int = 64, threads: int = 0, rounds: int = 3,
                  activation: str = "sigmoid", allow_reduced: bool | None = None, onnx: bool | None = None,
                  compile: bool = False, batch_sizes: Sequence[int] | None = None,
                  budget_s: float | None = None, skipped: list | None = None
                  ) -> tuple[list[list[Measurement]], Measurement, Measurement]:
    """The staged search of the module doc: (measurements per stage, chosen, baseline of the last stage).

    Stage 1 engine x layout x mode (x AMP / cudnn.benchmark); stage 2 batch sizes of the stage-1
    choice; stage 3 thread counts (CPU). Every stage measures the baseline in the same rounds, so
    each choice is a same-run ratio.

    `budget_s` bounds the search: stage 1 always runs (rounds stop at the budget, one always
    runs); a later stage runs only when its cost, estimated from stage 1's times, fits in what is
    left; its number goes into `skipped` otherwise (the choice so far stands)."""
    import torch

    device = torch.device(device)
    allow = (device.type == "cuda") if allow_reduced is None else allow_reduced
    base = baseline_path(batch_size, threads)
    stage_lists = [
        lambda b: engine_candidates(device.type, base, onnx=onnx, compile=compile, reduced_precision=allow),
        lambda b: [base] + batch_candidates(b, batch_sizes),
        lambda b: ([base] + thread_candidates(b)) if device.type == "cpu" else [base],
    ]
    built: dict = {}
    start = time.perf_counter()
    deadline = None if budget_s is None else start + float(budget_s)
    stages, best, base_m, best_path = [], None, None, base
    for number, make in enumerate(stage_lists, 1):
        cands = _unique(make(best_path))
        if len(cands) <= 1 and best is not None:
            continue
        if deadline is not None and best is not None:
            cost = _stage_cost(cands, stages[0], rounds)
            if time.perf_counter() + cost > deadline:
                if skipped is not None:
                    skipped.append(number)
                continue
        ms = measure(models, cands, example, device, rounds=rounds, activation=activation, reference_path=base,
                     cache=built, deadline=deadline)
        best = choose(ms, base, allow_reduced=allow)
        base_m = next(m for m in ms if m.path == base)
        best_path = best.path
        stages.append(ms)
    return stages, best, base_m


def _stage_cost(cands: Sequence[InferencePath], first: Sequence[Measurement], rounds: int) -> float:
    """Seconds a stage of `cands` should take: per candidate, its batch at the per-tile time stage 1
    measured for its engine + layout + mode (the slowest there when unmeasured), warm-up + check +
    `rounds` calls."""
    def key(p):
        return p.engine, p.channels_last, p.inference_mode, p.amp, p.cudnn_benchmark

    per_tile = {key(m.path): m.median_s_per_tile for m in first if m.seconds}
    worst = max(per_tile.values(), default=0.0)
    return sum(per_tile.get(key(p), worst) * p.batch_size * (rounds + 2) for p in cands)


def probe_budget_s() -> float | None:
    """Seconds one probe may take: ``$KIT_THROUGHPUT_BUDGET_S`` (0 or below: no bound), else PROBE_BUDGET_S."""
    raw = os.environ.get("KIT_THROUGHPUT_BUDGET_S", "").strip()
    if not raw:
        return PROBE_BUDGET_S
    try:
        value = float(raw)
    except ValueError:
        from kit.errors import ConfigError

        raise ConfigError(f"KIT_THROUGHPUT_BUDGET_S must be a number of seconds, got {raw!r}") from None
    return value if value > 0 else None


def probe(models: Sequence, example, device, *, batch_size: int = 64, threads: int = 0, rounds: int = 3,
          activation: str = "sigmoid", allow_reduced: bool | None = None, onnx: bool | None = None,
          compile: bool = False, batch_sizes: Sequence[int] | None = None, budget_s: float | None = None) -> dict:
    """`staged_search`, as the cache record (path, ratio, tiles/s, max |diff|, every stage's figures,
    the stages the budget skipped)."""
    skipped: list = []
    stages, best, base_m = staged_search(models, example, device, batch_size=batch_size, threads=threads,
                                         rounds=rounds, activation=activation, allow_reduced=allow_reduced,
                                         onnx=onnx, compile=compile, batch_sizes=batch_sizes, budget_s=budget_s,
                                         skipped=skipped)
    return {
        "path": best.path.to_dict(),
        "name": best.path.name,
        "ratio": round(base_m.median_s_per_tile / best.median_s_per_tile, 3),
        "baseline_tiles_s": round(base_m.tiles_per_s, 2),
        "tiles_s": round(best.tiles_per_s, 2),
        "max_abs_diff": best.max_abs_diff,
        "rounds": rounds,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load": load_average(),
        "stages": [[_record(m) for m in ms] for ms in stages],
        "budget_s": budget_s,
        "skipped_stages": skipped,
    }


def _record(m: Measurement) -> dict:
    return {"name": m.path.name, "tiles_s": round(m.tiles_per_s, 2), "max_abs_diff": m.max_abs_diff,
            "error": m.error, "rounds_run": len(m.seconds)}


# --------------------------------------------------------------------------------------------
# the cache per machine + model + library versions


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cores": os.cpu_count() or 1, "torch": torch.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(ImportError):
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    return info


def model_signature(models: Sequence, example_shape: Sequence[int], activation: str = "sigmoid") -> dict:
    m = models[0]
    return {
        "classes": sorted({type(x).__name__ for x in m.modules()}),
        "params": int(sum(p.numel() for p in m.parameters())),
        "input": [int(v) for v in example_shape[1:]],
        "folds": len(models),
        "activation": activation,
    }


def cache_path() -> Path:
    env = os.environ.get("KIT_THROUGHPUT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kit" / "throughput.json"


def cache_key(machine: dict, signature: dict, device: str, settings: dict) -> str:
    blob = json.dumps({"machine": machine, "model": signature, "device": device, "settings": settings},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_cache(path: Path | None = None) -> dict:
    path = path or cache_path()
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_cache_entry(key: str, record: dict, path: Path | None = None) -> None:
    path = path or cache_path()
    data = read_cache(path)
    data[key] = record
    with contextlib.suppress(OSError):
        with atomic_open(path, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)


def inference_path(models: Sequence, example, device, *, batch_size: int = 64, threads: int = 0,
                   activation: str = "sigmoid", engine: str = "auto", allow_reduced: bool | None = None,
                   compile: bool = False, log: Callable[[str], None] | None = None) -> InferencePath:
    """The path predict uses: `engine` "auto" = the cached probe result for this machine + model
    (probing once when missing; ``KIT_THROUGHPUT_PROBE=0`` = the baseline), or a named engine
    (``torch``, ``jit``, ``onnx``, ``compile``) with the baseline's other settings, or ``baseline``."""
    base = baseline_path(batch_size, threads)
    if engine == "baseline":
        return base
    if engine != "auto":
        if engine not in ENGINES:
            from kit.errors import ConfigError

            raise ConfigError(f"predict.engine must be auto, baseline or one of {', '.join(ENGINES)}; got {engine!r}")
        return dataclasses.replace(base, engine=engine)
    record = probe_record(models, example, device, batch_size=batch_size, threads=threads, activation=activation,
                          allow_reduced=allow_reduced, compile=compile, log=log)
    return InferencePath.from_dict(record["path"]) if record else base


def probe_record(models: Sequence | None, example, device, *, batch_size: int = 64, threads: int = 0,
                 activation: str = "sigmoid", allow_reduced: bool | None = None, compile: bool = False,
                 log: Callable[[str], None] | None = None, signature: dict | None = None) -> dict | None:
    """The cached `probe` record for this machine + model + settings (probing once when missing);
    None when probing is switched off (``KIT_THROUGHPUT_PROBE=0``). Its ``tiles_s`` are per call of
    `models` (pass one fold model: the path that is fastest for one is fastest for their ensemble).

    `signature` (`model_signature` of those models, saved earlier) looks the cache up without the
    models; with `models` None a miss returns None (nothing to probe with)."""
    import torch

    if os.environ.get("KIT_THROUGHPUT_PROBE", "1") == "0":
        return None
    device = torch.device(device)
    example = np.asarray(example)
    machine = machine_info()
    settings = {"batch_size": batch_size, "threads": threads, "allow_reduced": allow_reduced, "compile": compile}
    signature = signature or model_signature(models, example.shape, activation)
    key = cache_key(machine, signature, str(device), settings)
    hit = read_cache().get(key)
    if hit and "path" in hit:
        return hit
    if models is None:
        return None
    t0 = time.perf_counter()
    record = probe(models, example, device, batch_size=batch_size, threads=threads, activation=activation,
                   allow_reduced=allow_reduced, compile=compile, budget_s=probe_budget_s())
    record["machine"] = machine
    record["probe_s"] = round(time.perf_counter() - t0, 1)
    write_cache_entry(key, record)
    if log:
        log(f"throughput probe ({record['probe_s']} s, cached in {cache_path()}): {record['name']}, "
            f"{record['ratio']:.2f}x the plain no_grad NCHW loop, max |diff| {record['max_abs_diff']:.1e}"
            + (f"; stage(s) {', '.join(map(str, record['skipped_stages']))} skipped: over the "
               f"{record['budget_s']:.0f} s budget (KIT_THROUGHPUT_BUDGET_S)" if record.get("skipped_stages") else ""))
    return record


def training_layout(model, example, device, *, amp: bool = True, rounds: int = 3, cache: bool = False) -> dict:
    """Training step settings by measurement: channels_last or NCHW (the faster of the two in an
    interleaved run of forward + backward; NCHW, the plain choice, unless channels_last beats it by
    MARGIN), AMP only on CUDA, cudnn.benchmark on CUDA. Returns {"channels_last", "amp",
    "cudnn_benchmark", "ratio"}; `cache`: kept in the throughput cache per machine + model + input."""
    import torch

    device = torch.device(device)
    example = np.asarray(example)
    key = None
    if cache:
        key = cache_key(machine_info(), model_signature([model], example.shape), str(device),
                        {"train": True, "amp": amp, "batch": len(example)})
        hit = read_cache().get(key)
        if hit and "train" in hit:
            return hit["train"]
    x = torch.as_tensor(example).to(device).float().div_(255.0)
    layouts = {}
    for cl in (False, True):
        m = _copy_model(model).to(device).train()
        if cl:
            m = m.to(memory_format=torch.channels_last)
        layouts[cl] = m
    use_amp = bool(amp and device.type == "cuda")

    def step(cl):
        def run(xb):
            m = layouts[cl]
            xin = xb.contiguous(memory_format=torch.channels_last) if cl else xb
            with torch.autocast(device.type, enabled=use_amp):
                out = m(xin)
            out.float().mean().backward()
            m.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return run

    times = interleaved({cl: step(cl) for cl in layouts}, lambda n: x, rounds)
    t_nchw, t_cl = statistics.median(times[False]), statistics.median(times[True])
    out = {"channels_last": bool(t_cl <= t_nchw * (1 - MARGIN)), "amp": use_amp,
           "cudnn_benchmark": device.type == "cuda", "ratio": round(t_nchw / t_cl, 3)}
    if key:
        write_cache_entry(key, {"train": out, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "load": load_average()})
    return out


def _copy_model(model):
    import copy

    return copy.deepcopy(model)


def load_average() -> str:
    with contextlib.suppress(OSError, AttributeError):
        one, five, fifteen = os.getloadavg()
        return f"{one:.2f} {five:.2f} {fifteen:.2f}"
    return "n/a"
