"""Batched inference for predict: the fold ensemble and TTA on one batch (`kit.predict` packs the
cells of several images into those batches).

* `EnsembleRunner(models, device, tta=...)`: uint8 tiles ``N x 4 x S x S`` -> float32 ``N x C``,
  the mean over folds and over the first `tta` dihedral transforms (0 identity, 1 h-flip, 2 v-flip,
  3 both, 4.. the same after a transpose) of the activation of the logits. Each model call gets
  `batch_size` inputs: the TTA copies of ``batch_size // tta`` tiles stacked, all folds run on that
  one batch (`kit.engines`), the path (engine, layout, mode, batch size, threads) chosen by
  measurement (`kit.throughput.inference_path`) unless given.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from kit.labels import NUM_CLASSES
from kit.throughput import InferencePath


def dihedral_np(x: np.ndarray, k: int) -> np.ndarray:
    """Transform k (0..7) of the dihedral group on the last two axes: bit 4 transpose, 1 h-flip, 2 v-flip
    (the same order as training's augmentation and `kit.predict`'s TTA)."""
    if k & 4:
        x = np.swapaxes(x, -1, -2)
    if k & 1:
        x = x[..., ::-1]
    if k & 2:
        x = x[..., ::-1, :]
    return x


class EnsembleRunner:
    """The fold models of one kind, run as one batch per call (module doc)."""

    def __init__(self, models: Sequence, device="cpu", *, tta: int = 1, activation: str = "sigmoid",
                 path: InferencePath | None = None, example: np.ndarray | None = None, batch_size: int = 64,
                 engine: str = "auto", onnx_path=None, log: Callable[[str], None] | None = None):
        import torch

        from kit.engines import build_runner
        from kit.errors import ConfigError
        from kit.throughput import inference_path, probe_record

        if tta not in (1, 2, 4, 8):
            raise ConfigError(f"tta must be 1, 2, 4 or 8, got {tta}")
        self.device = torch.device(device)
        self.tta = int(tta)
        self.activation = activation
        self.n_models = len(models)
        if example is None:
            raise ValueError("EnsembleRunner needs an example batch (uint8 N x 4 x S x S) to probe and trace")
        example = np.ascontiguousarray(example)
        self.record = None  # the probe's figures (tiles/s of one fold model on the chosen path)
        if path is None and engine == "auto":
            # probed on one fold: the fastest path for one model is the fastest for their ensemble
            self.record = probe_record(models[:1], example, self.device, batch_size=batch_size,
                                       activation=activation, log=log)
        self.path = path or inference_path(models[:1], example, self.device, batch_size=batch_size,
                                           activation=activation, engine=engine, log=log)
        self._run = build_runner(models, self.path, self.device, example, activation=activation, onnx_path=onnx_path)
        self.tiles_per_call = max(1, self.path.batch_size // self.tta)

    @classmethod
    def from_export(cls, onnx_path, signature: dict, n_models: int, device="cpu", *, tta: int = 1,
                    activation: str = "sigmoid", example: np.ndarray, batch_size: int = 64, engine: str = "auto",
                    log: Callable[[str], None] | None = None) -> "EnsembleRunner | None":
        """The runner of an ensemble already exported to `onnx_path`, without its PyTorch models:
        for engine "onnx", or "auto" when this machine's cached probe record for the model
        (`signature`: `kit.throughput.model_signature` of one fold) chose ONNX Runtime. None
        otherwise (no record yet, another path chosen): the caller builds the models."""
        import dataclasses

        from kit.throughput import baseline_path, probe_record

        record = None
        if engine == "auto":
            record = probe_record(None, example, device, batch_size=batch_size, activation=activation,
                                  signature=signature, log=log)
            if not record or record["path"].get("engine") != "onnx":
                return None
            path = InferencePath.from_dict(record["path"])
        elif engine == "onnx":
            path = dataclasses.replace(baseline_path(batch_size), engine="onnx")
        else:
            return None
        # no models: with an ONNX path and its export on disk, the runner reads the file
        runner = cls([], device, tta=tta, activation=activation, path=path, example=example,
                     batch_size=batch_size, onnx_path=onnx_path)
        runner.record, runner.n_models = record, n_models
        return runner

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 N x 4 x S x S -> float32 N x C (fold and TTA mean)."""
        from kit.throughput import torch_threads

        n = len(tiles)
        if n == 0:
            return np.zeros((0, NUM_CLASSES), np.float32)
        out = []
        with torch_threads(self.path.threads):
            for start in range(0, n, self.tiles_per_call):
                chunk = tiles[start:start + self.tiles_per_call]
                batch = np.concatenate([dihedral_np(chunk, k) for k in range(self.tta)]) if self.tta > 1 else chunk
                probs = self._run(np.ascontiguousarray(batch))
                out.append(probs.reshape(self.tta, len(chunk), -1).mean(axis=0))
        return np.concatenate(out).astype(np.float32, copy=False)
