"""``python -m kit bench``: tiles/s of every candidate path against the plain baseline, in one run.

For each backbone (default: every registered one) at the configured tile size (cell model) and
field size (image model), on the current device:

* inference: every `kit.throughput` candidate (engine torch / TorchScript / ONNX Runtime /
  torch.compile; NCHW vs channels_last; no_grad vs inference_mode; batch sizes; threads; on CUDA
  AMP fp16/bf16 and cudnn.benchmark) interleaved with the baseline (torch, NCHW, no_grad, fp32) in
  the same rounds, medians over `--repeats` rounds, max |difference| of probabilities vs the baseline;
* training: a forward + backward step, NCHW vs channels_last (and AMP on CUDA), interleaved;
* the bound: GFLOPs per tile (counted by ``torch.utils.flop_counter``, 2 FLOPs per multiply-add)
  x tiles/s = achieved GFLOP/s, against the device's peak measured in the same run with a large
  fp32 matmul (``--peak-n``, default 2048): "% peak".

Prints one table and writes it as JSON (``--json``, default ``bench_throughput.json``). On a shared
machine only the ratios (same run, interleaved) say anything; `uptime`'s load is printed with them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from kit.atomic import atomic_open


def peak_gflops(device, n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """Median GFLOP/s of an n x n x n matmul (2 n^3 FLOPs) on `device`: what the device can do."""
    import torch

    device = torch.device(device)
    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        (a @ b).sum().item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / statistics.median(times) / 1e9


def gflops_per_tile(model, side: int, in_chans: int = 4) -> float:
    """Forward GFLOPs of one `side` x `side` input (torch.utils.flop_counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval()
    x = torch.zeros(1, in_chans, side, side)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def bench_inference(models, side: int, device, *, batch_sizes: Sequence[int], repeats: int, compile: bool,
                    onnx: bool, reduced: bool, base_batch: int) -> list[dict]:
    """Rows for one backbone at one input size: the probe's staged search (`kit.throughput`), every
    candidate of every stage with its ratio to the baseline measured in the same stage."""
    from kit import throughput as tp

    rng = np.random.default_rng(0)
    example = rng.integers(0, 256, (max(batch_sizes), 4, side, side), dtype=np.uint8)
    stages, chosen, _ = tp.staged_search(models, example, device, batch_size=base_batch, rounds=repeats,
                                         allow_reduced=reduced, onnx=onnx, compile=compile, batch_sizes=batch_sizes)
    base = tp.baseline_path(base_batch)
    rows = []
    for k, ms in enumerate(stages, start=1):
        base_m = next(m for m in ms if m.path == base)
        for m in ms:
            rows.append({
                "stage": k, "path": m.path.name, "engine": m.path.engine, "tiles_s": round(m.tiles_per_s, 2),
                "ratio": round(base_m.median_s_per_tile / m.median_s_per_tile, 3) if m.seconds else None,
                "max_abs_diff": m.max_abs_diff, "baseline": m.path == base,
                "chosen": k == len(stages) and m.path == chosen.path, "error": m.error,
                "settings": m.path.to_dict(),
            })
    return rows


def bench_training(model, side: int, device, *, batch_size: int, repeats: int) -> list[dict]:
    """Training step rows: NCHW fp32 (baseline) vs channels_last (vs AMP on CUDA), interleaved."""
    import copy

    import torch

    from kit import throughput as tp

    x = torch.rand(batch_size, 4, side, side, device=device)
    y = torch.randint(0, 2, (batch_size, 19), device=device).float()
    variants = {"NCHW fp32": (False, False), "channels_last fp32": (True, False)}
    if device.type == "cuda":
        variants.update({"channels_last amp-float16": (True, True), "NCHW amp-float16": (False, True)})
    nets, opts = {}, {}
    for name, (cl, _) in variants.items():
        m = copy.deepcopy(model).to(device).train()
        nets[name] = m.to(memory_format=torch.channels_last) if cl else m
        opts[name] = torch.optim.SGD(nets[name].parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")

    def step(name):
        cl, amp = variants[name]

        def run(_):
            xin = x.contiguous(memory_format=torch.channels_last) if cl else x
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(nets[name](xin).float(), y)
            opts[name].zero_grad(set_to_none=True)
            if amp:
                scaler.scale(loss).backward()
                scaler.step(opts[name])
                scaler.update()
            else:
                loss.backward()
                opts[name].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return run

    times = tp.interleaved({n: step(n) for n in variants}, lambda n: None, repeats)
    base = statistics.median(times["NCHW fp32"])
    return [{"path": f"train {n} b{batch_size}", "engine": "torch",
             "tiles_s": round(batch_size / statistics.median(t), 2),
             "ratio": round(base / statistics.median(t), 3), "baseline": n == "NCHW fp32",
             "chosen": False, "max_abs_diff": None, "error": ""} for n, t in times.items()]


def run_bench(backbones: Sequence[str], tile_size: int, field_size: int, device="cpu", *, repeats: int = 3,
              tile_batches: Sequence[int] = (16, 32, 64, 128), field_batches: Sequence[int] = (2, 4, 8),
              train: bool = True, train_batch: int = 16, compile: bool = False, onnx: bool | None = None,
              reduced: bool | None = None, peak_n: int = 2048, log=print) -> dict:
    """The whole bench as a dict (see the module doc); `log` gets progress lines."""
    import torch

    from kit import throughput as tp
    from kit.models import build_model

    device = torch.device(device)
    onnx = tp.onnxruntime_available() if onnx is None else onnx
    reduced = (device.type == "cuda") if reduced is None else reduced
    peak = peak_gflops(device, peak_n)
    result = {"machine": tp.machine_info(), "device": str(device), "threads": torch.get_num_threads(),
              "load_before": tp.load_average(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "peak_gflops_fp32": round(peak, 1), "peak_matmul_n": peak_n, "repeats": repeats, "rows": []}
    log(f"device {device}: peak {peak:.1f} GFLOP/s (fp32 matmul {peak_n}^3), load {result['load_before']}")
    for name in backbones:
        torch.manual_seed(0)
        model = build_model(name).eval()
        for kind, side, batches in (("cell", tile_size, tile_batches), ("image", field_size, field_batches)):
            gf = gflops_per_tile(model, side)
            t0 = time.perf_counter()
            rows = bench_inference([model], side, device, batch_sizes=batches, repeats=repeats,
                                   compile=compile, onnx=onnx, reduced=reduced, base_batch=batches[len(batches) // 2])
            if train and kind == "cell":
                rows += bench_training(model, side, device, batch_size=train_batch, repeats=repeats)
            for r in rows:
                train_row = r["path"].startswith("train")
                flops = gf * (3.0 if train_row else 1.0)  # backward ~ 2x forward
                r.update(backbone=name, kind=kind, side=side, mode="train" if train_row else "infer",
                         gflops_per_tile=round(flops, 4),
                         achieved_gflops=round(flops * r["tiles_s"], 2),
                         pct_peak=round(100.0 * flops * r["tiles_s"] / peak, 1))
            result["rows"] += rows
            best = next((r for r in rows if r["chosen"]), rows[0])
            log(f"  {name} {kind} {side}px: chosen {best['path']} {best['ratio']}x ({time.perf_counter() - t0:.0f} s)")
    result["load_after"] = tp.load_average()
    return result


def format_table(result: dict) -> str:
    """The one printed table."""
    head = ("backbone", "input", "mode", "stage", "path", "tiles/s", "x base", "max|diff|", "GFLOP/tile", "GFLOP/s", "% peak", "")
    lines = [head]
    for r in result["rows"]:
        diff = r.get("max_abs_diff")
        mark = "baseline" if r.get("baseline") else ("chosen" if r.get("chosen") else "")
        if r.get("error"):
            mark = "failed: " + r["error"][:60]
        lines.append((r["backbone"], f"{r['kind']} {r['side']}", r["mode"], str(r.get("stage", "train")), r["path"], f"{r['tiles_s']:.1f}",
                      f"{r['ratio']:.2f}" if r.get("ratio") else "-",
                      "-" if diff is None or diff == float("inf") else f"{diff:.1e}",
                      f"{r['gflops_per_tile']:.3f}", f"{r['achieved_gflops']:.1f}", f"{r['pct_peak']:.1f}", mark))
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    out = [" | ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    m = result["machine"]
    out.insert(0, f"{m.get('cpu', '')} ({m.get('cores')} cores{', ' + m['cuda'] if 'cuda' in m else ''}), "
                  f"torch {m.get('torch')}, {result['threads']} threads; peak {result['peak_gflops_fp32']} GFLOP/s "
                  f"(fp32 matmul); load {result['load_before']} -> {result['load_after']}; {result['when']}")
    return "\n".join(out)


def configure_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="run config (tile and field sizes, backbones); default: the kit's defaults")
    parser.add_argument("--backbones", default="all", help="comma list, 'all' (every registered backbone) or 'config' (the config's two)")
    parser.add_argument("--tile-size", type=int, help="cell tile side (default: the config's data.tile_size)")
    parser.add_argument("--field-size", type=int, help="field side (default: the config's data.field_size)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians (default 3)")
    parser.add_argument("--tile-batches", default="16,32,64,128")
    parser.add_argument("--field-batches", default="2,4,8")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step rows")
    parser.add_argument("--compile", action="store_true", help="also torch.compile (slow to build on a CPU)")
    parser.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
    parser.add_argument("--reduced", action=argparse.BooleanOptionalAction, default=None,
                        help="also reduced-precision paths (default: on CUDA only)")
    parser.add_argument("--json", type=Path, default=Path("bench_throughput.json"), help="where the table goes as JSON")
    g = parser.add_argument_group("runtime figures (kit/runtime.py)")
    g.add_argument("--fields", type=Path, help="real fields (<ID>_{red,green,blue,yellow}.png) to measure the CPU stages on")
    g.add_argument("--cells-table", type=Path, help="real train table with ImageWidth and cells columns (cells per field by size)")
    g.add_argument("--from-json", type=Path, help="take the CNN rows from this earlier bench JSON instead of measuring")
    g.add_argument("--sample", type=Path, help="sample_submission.csv whose size mix the estimate uses (default: the real 559 test fields)")
    g.add_argument("--figures-out", type=Path, help="write the runtime figures here (kit/data/runtime_figures.json ships them)")
    g.add_argument("--folds", type=int, default=5, help="fold models in the estimate (default 5)")
    g.add_argument("--tta", type=int, default=1, help="TTA passes in the estimate (default 1)")
    parser.set_defaults(func=_run_bench)


def _backbone_list(text: str, cfg) -> list[str]:
    from kit.models import BACKBONES

    if text == "all":
        return [b for b in BACKBONES if not b.startswith("tiny")]
    if text == "config":
        return list(dict.fromkeys([cfg.cell_model.backbone, cfg.image_model.backbone]))
    return [b.strip() for b in text.split(",") if b.strip()]


def _run_bench(args) -> int:
    from kit.config import load_config

    cfg = load_config(args.config)
    device = _device(args.device)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        print(format_table(result))
    else:
        result = _measure(args, cfg, device)
    if args.fields:
        _runtime_figures(args, cfg, result)
    return 0


def _measure(args, cfg, device) -> dict:
    result = run_bench(_backbone_list(args.backbones, cfg), args.tile_size or cfg.data.tile_size,
                       args.field_size or cfg.data.field_size, device, repeats=args.repeats,
                       tile_batches=[int(b) for b in args.tile_batches.split(",")],
                       field_batches=[int(b) for b in args.field_batches.split(",")], train=not args.no_train,
                       compile=args.compile, onnx=False if args.no_onnx else None, reduced=args.reduced,
                       log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(result))
    with atomic_open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")
    return result


def _runtime_figures(args, cfg, bench: dict) -> None:
    """Measure the CPU stages on real fields, join the CNN rows, print the estimate (kit/runtime.py)."""
    from kit import runtime

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    figures = runtime.measure_stages(args.fields, backend=cfg.data.segment_backend,
                                     tile_size=args.tile_size or cfg.data.tile_size,
                                     field_size=args.field_size or cfg.data.field_size, log=log)
    if args.cells_table:
        figures["cells_per_field"] = runtime.cells_per_field_table(args.cells_table)
    figures["cnn"] = runtime.cnn_table_from_bench(bench)
    if args.figures_out:
        runtime.save_figures(figures, args.figures_out)
        print(f"wrote {args.figures_out}")
    mix = runtime.size_mix(args.sample)
    tile, fsize = args.tile_size or cfg.data.tile_size, args.field_size or cfg.data.field_size
    for backbone in dict.fromkeys([cfg.cell_model.backbone] + [k.split("@")[0] for k in figures["cnn"]]):
        cell, image = runtime.cnn_rate(figures, backbone, tile), runtime.cnn_rate(figures, backbone, fsize)
        if not cell or not image:
            continue
        est = runtime.estimate_predict(mix, figures, cell_tiles_s=cell[0], image_fields_s=image[0],
                                       n_folds=args.folds, tta=args.tta, cnn_label=cell[1], image_label=image[1],
                                       device=bench.get("device", "cpu"))
        print(f"\n{backbone}, tiles {tile} px, fields {fsize} px:")
        print("\n".join(est.lines()))


def _device(name: str):
    import torch

    if name in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
