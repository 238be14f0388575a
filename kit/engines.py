"""Runners: a fold ensemble as one callable, uint8 tiles in, fold-mean probabilities out, per path.

``build_runner(models, path, device, example)`` returns ``run(batch) -> float32 N x C`` where
``batch`` is a uint8 numpy array ``N x 4 x S x S`` and the result is the mean over the fold models
of sigmoid (or softmax) of their logits: exactly what the plain loop computes, ::

    with torch.no_grad():
        probs = sum(torch.sigmoid(m(preprocess(x))) for m in models) / len(models)

but run the way the `kit.throughput.InferencePath` says. The folds are one module
(`EnsembleModule`: `kit.models.preprocess`, every fold, the activation, the mean), so one call runs
all folds on one batch, and the ONNX engine exports them as one graph (one ``session.run`` per
batch, uint8 input, the normalisation inside the graph).

Engines: ``torch`` (eager; NCHW or channels_last; no_grad or inference_mode; autocast on CUDA),
``jit`` (torch.jit.trace + freeze + optimize_for_inference: folds BatchNorm into the convolutions),
``onnx`` (ONNX Runtime, CPU execution provider; the exported file is cached at `onnx_path` when
given), ``compile`` (torch.compile, inductor).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from kit.throughput import InferencePath


def _ensemble_module(models: Sequence, activation: str, channels_last: bool):
    import torch
    import torch.nn as nn

    from kit.models import preprocess

    class EnsembleModule(nn.Module):
        """uint8 N x 4 x S x S -> mean over folds of the activation of the logits (float32 N x C)."""

        def __init__(self):
            super().__init__()
            self.folds = nn.ModuleList(models)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = preprocess(x)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            acc = None
            for m in self.folds:
                logits = m(x).float()
                p = torch.softmax(logits, 1) if activation == "softmax" else torch.sigmoid(logits)
                acc = p if acc is None else acc + p
            return acc / len(self.folds)

    mod = EnsembleModule().eval()
    if channels_last:
        mod = mod.to(memory_format=torch.channels_last)
    return mod


def _copies(models: Sequence, device) -> list:
    """Private copies (a path changes layout or folds BatchNorm; the caller's models stay as they are)."""
    import copy

    return [copy.deepcopy(m).to(device).eval() for m in models]


def build_runner(models: Sequence, path: InferencePath, device, example=None, *, activation: str = "sigmoid",
                 onnx_path: str | Path | None = None, cache: dict | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A callable running `models` as `path` says (module doc). `example`: uint8 tiles for tracing.

    `cache` (a dict the caller keeps) shares the built modules, ONNX graphs and sessions between
    runners that differ only in batch size (and, for torch, threads): a probe builds each once.
    """
    import torch

    device = torch.device(device)
    cache = {} if cache is None else cache
    if path.engine == "onnx":
        return _onnx_runner(models, path, example, activation, onnx_path, cache)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(path.cudnn_benchmark)
    amp_dtype = getattr(torch, path.amp) if path.amp else None
    grad_mode = torch.inference_mode if path.inference_mode else torch.no_grad
    if path.engine not in ("torch", "jit", "compile"):
        raise ValueError(f"unknown engine {path.engine!r}")
    key = (path.engine, path.channels_last, str(device))
    if key not in cache:
        mod = _ensemble_module(_copies(models, device), activation, path.channels_last)
        if path.engine == "jit":
            import warnings

            ex = torch.from_numpy(np.ascontiguousarray(example[:2])).to(device)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarning; TorchScript's deprecation notice
                traced = torch.jit.trace(mod, ex, check_trace=False)
                mod = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        elif path.engine == "compile":
            mod = torch.compile(mod, dynamic=False)
        cache[key] = mod
    mod = cache[key]
    if path.engine == "jit":
        grad_mode = torch.no_grad

    def run(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch))
        if device.type != "cpu":
            x = x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)
        with grad_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = mod(x)
        return out.float().cpu().numpy()

    return run


def export_onnx(models: Sequence, example: np.ndarray, path: str | Path | None = None,
                activation: str = "sigmoid") -> bytes | Path:
    """The fold ensemble as one ONNX graph (uint8 input ``x`` with a dynamic batch axis, output
    ``probs``); written atomically to `path` when given (returns the path), else returned as bytes."""
    import warnings

    import torch

    from kit.atomic import atomic_path

    mod = _ensemble_module(_copies(models, "cpu"), activation, channels_last=False)
    ex = torch.from_numpy(np.ascontiguousarray(example[:2]))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarning / the TorchScript exporter's deprecation notice
        torch.onnx.export(mod, (ex,), buf, input_names=["x"], output_names=["probs"],
                          dynamic_axes={"x": {0: "n"}, "probs": {0: "n"}}, opset_version=17, dynamo=False)
    data = buf.getvalue()
    if path is None:
        return data
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def onnx_session(model: bytes | str | Path, threads: int = 0):
    """An ONNX Runtime CPU session with every graph optimisation on and `threads` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads or os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _onnx_runner(models, path: InferencePath, example, activation: str, onnx_path, cache: dict) -> Callable:
    if ("onnx",) not in cache:
        if onnx_path is not None and Path(onnx_path).is_file():
            cache[("onnx",)] = Path(onnx_path)
        else:
            cache[("onnx",)] = export_onnx(models, example, onnx_path, activation)
    if ("onnx", path.threads) not in cache:
        cache[("onnx", path.threads)] = onnx_session(cache[("onnx",)], path.threads)
    session = cache[("onnx", path.threads)]

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {"x": np.ascontiguousarray(batch, dtype=np.uint8)})[0].astype(np.float32, copy=False)

    return run
