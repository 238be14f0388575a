"""Kernel runtime estimate: seconds for the hidden test set on a Kaggle machine, from per-image figures.

Public names (stable; the figures will be replaced by measured ones): `estimate_runtime(n_images, *,
hardware, ...) -> Estimate`, `Estimate` (``seconds``, ``hours``, ``fits``, ``lines()``), `run_figures(run_config)`
(the estimate's keyword arguments read from a run's resolved config), `HARDWARE`, `BACKBONE_GFLOPS_224`,
`FIXED_OVERHEAD_S`, `KAGGLE_TIME_LIMIT_H`, `DEFAULT_N_TEST`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kit.errors import ConfigError

KAGGLE_TIME_LIMIT_H = 9.0  # the competition's notebook limit (GPU and CPU)
DEFAULT_N_TEST = 559  # images in the competition's hidden test set

# Per-image figures used by `estimate_runtime`, with their sources. "here" = this project's dev
# machine (2 cores, AVX2, no GPU; medians on a shared machine).
# CNN speed is modelled as (backbone GFLOPs at 224 px) x (side/224)^2 / effective GFLOP/s.
BACKBONE_GFLOPS_224 = {  # torchvision model docs (GFLOPS at 224 x 224, 3 channels; the 4-channel stem adds 1-2%)
    "resnet18": 1.81, "resnet34": 3.66, "resnet50": 4.09, "resnet101": 7.80, "resnet152": 11.51,
    "efficientnet_b0": 0.39, "efficientnet_b3": 1.83, "densenet121": 2.83,
}
# CPU work per 2048 px field, one core (medians; the machine was shared, so these are upper-ish):
#   PNG decode of 4 channels: 16-bit 0.236 s (measured here); classical segmentation at 1/4 scale 0.262 s,
#   cell table 0.174 s, tiles 0.127 s per 25 cells (benchmarks/bench_segment.py, run 2026-11-25 18:25 UTC,
#   3 synthetic 2048 px fields) -> 0.8 s. It does not shrink on a GPU machine (decoding and the
#   classical segmenter stay on the CPU).
CPU_S_PER_FIELD = 0.8
_CPU_SOURCE = "CPU work per field measured here (bench_segment.py)"
# effective_gflops: CNN inference throughput; hpacellseg_s: the HPA Cell Segmentator per field; every
# kind also gets cpu_s_per_image = CPU_S_PER_FIELD (decoding and the classical segmenter stay on the CPU)
_CNN = {
    "here-cpu": dict(effective_gflops=50.0, hpacellseg_s=30.0,
                     source="measured here, 2 cores: ResNet-50@224 ~11 tiles/s (45 GFLOP/s), ResNet-18@128 "
                            "~95 tiles/s (56 GFLOP/s); hpacellseg on CPU: assumption"),
    "kaggle-cpu": dict(effective_gflops=100.0, hpacellseg_s=30.0,
                       source="assumption: a Kaggle CPU session has 4 cores, twice the CNN rate measured on 2 here"),
    "t4": dict(effective_gflops=2000.0, hpacellseg_s=1.5,
               source="CNN: assumption, not measured: ~25% of the T4's 8.1 TFLOPS fp32 peak (NVIDIA T4 "
                      "datasheet), i.e. ~490 ResNet-50 tiles/s at 224 px; hpacellseg ~1.5 s/field (assumption)"),
    "p100": dict(effective_gflops=2300.0, hpacellseg_s=1.5,
                 source="CNN: assumption, not measured: ~25% of the P100's 9.3 TFLOPS fp32 peak (NVIDIA P100 "
                        "datasheet); hpacellseg ~1.5 s/field (assumption)"),
}
HARDWARE = {name: dict(row, cpu_s_per_image=CPU_S_PER_FIELD, source=f"{row['source']}; {_CPU_SOURCE}")
            for name, row in _CNN.items()}
FIXED_OVERHEAD_S = 180.0  # pip install from the bundle + model loading (assumption; the kernel prints its own)


@dataclass
class Estimate:
    """A kernel runtime estimate; `lines()` is what `kernel build` prints."""

    n_images: int
    hardware: str
    seconds: float
    per_image_s: float
    parts: dict[str, float] = field(default_factory=dict)
    source: str = ""

    @property
    def hours(self) -> float:
        return self.seconds / 3600.0

    @property
    def fits(self) -> bool:
        return self.hours <= KAGGLE_TIME_LIMIT_H

    def lines(self) -> list[str]:
        parts = ", ".join(f"{k} {v:.3f} s" for k, v in self.parts.items())
        verdict = (f"fits in Kaggle's {KAGGLE_TIME_LIMIT_H:g} h with {KAGGLE_TIME_LIMIT_H - self.hours:.1f} h to spare"
                   if self.fits else f"WILL NOT FINISH within Kaggle's {KAGGLE_TIME_LIMIT_H:g} h limit")
        return [
            f"runtime estimate ({self.hardware}): {self.n_images} test images x {self.per_image_s:.2f} s/image "
            f"+ {FIXED_OVERHEAD_S:.0f} s set-up = {self.hours:.2f} h: {verdict}",
            f"  per image: {parts}",
            f"  figures: {self.source}",
        ]


def measured_hardware(hardware: str, backbone: str = "resnet50", figures: dict | None = None) -> dict:
    """`HARDWARE[hardware]` with the figures this machine has measured put in (`kit.runtime`, written by
    `kit bench` / `kit estimate`): the CPU work per field for every kind (decoding and the classical
    segmenter stay on the CPU), and for ``here-cpu`` the achieved CNN rate. `kit bench` counts FLOPs
    (2 per multiply-add); `BACKBONE_GFLOPS_224` counts multiply-adds as torchvision's docs do, hence / 2."""
    from kit import runtime

    hw = dict(HARDWARE[hardware])
    figures = runtime.load_figures() if figures is None else figures
    cpu = runtime.cpu_s_per_field(figures)
    if cpu:
        hw["cpu_s_per_image"] = cpu[0]
        hw["source"] += f"; CPU work per field {cpu[0]:.2f} s: {cpu[1]}"
    if hardware == "here-cpu":
        rate = runtime.measured_gflops(figures, backbone)
        if rate:
            hw["effective_gflops"] = rate[0] / 2.0
            hw["source"] += f"; CNN rate {rate[0] / 2.0:.1f} G multiply-adds/s {rate[1]}"
    return hw


def estimate_runtime(n_images: int = DEFAULT_N_TEST, *, hardware: str = "t4", cell_backbone: str = "resnet50",
                     image_backbone: str | None = None, tile_size: int = 128, field_size: int = 512,
                     n_folds: int = 5, cells_per_image: float = 25.0, tta: int = 1,
                     segmenter: str = "classical", mean_field_px: float = 2048.0) -> Estimate:
    """Seconds for `n_images` test fields on `hardware` (a `HARDWARE` key), from the figures above.

    Cost per image = CPU work (decode, segmentation, tiles; scaled by field area) + cell CNN
    (cells x folds x TTA tiles) + image CNN (folds x TTA fields), without overlap (an upper bound).
    """
    if hardware not in HARDWARE:
        raise ConfigError(f"--hardware {hardware!r}: choose one of {sorted(HARDWARE)}")
    hw = measured_hardware(hardware, cell_backbone)

    def gflops(backbone: str, side: int) -> float:
        base = BACKBONE_GFLOPS_224.get(backbone, BACKBONE_GFLOPS_224["resnet50"])
        return base * (side / 224.0) ** 2

    area = (mean_field_px / 2048.0) ** 2
    cpu = hw["cpu_s_per_image"] * area
    seg = hw["hpacellseg_s"] * area if segmenter == "hpacellseg" else 0.0
    cell = cells_per_image * n_folds * tta * gflops(cell_backbone, tile_size) / hw["effective_gflops"]
    image = n_folds * tta * gflops(image_backbone or cell_backbone, field_size) / hw["effective_gflops"]
    parts = {"decode+classical seg+tiles": cpu, "cell CNN": cell, "image CNN": image}
    if seg:
        parts["hpacellseg"] = seg
    per_image = sum(parts.values())
    source = hw["source"]
    unknown = sorted({b for b in (cell_backbone, image_backbone or cell_backbone) if b not in BACKBONE_GFLOPS_224})
    if unknown:
        source += f"; no GFLOPs figure for {', '.join(unknown)}: ResNet-50's used"
    return Estimate(n_images, hardware, n_images * per_image + FIXED_OVERHEAD_S, per_image, parts, source)


def run_figures(run_config: dict) -> dict:
    """The estimate's inputs read from a run's resolved config.yaml (missing keys keep defaults)."""
    out: dict[str, Any] = {}
    data = run_config.get("data") or {}
    cell = run_config.get("cell_model") or run_config.get("model") or {}
    image = run_config.get("image_model") or run_config.get("model") or {}
    if data.get("tile_size"):
        out["tile_size"] = int(data["tile_size"])
    if data.get("field_size"):
        out["field_size"] = int(data["field_size"])
    if data.get("segment_backend"):
        out["segmenter"] = str(data["segment_backend"])
    if cell.get("backbone"):
        out["cell_backbone"] = str(cell["backbone"])
    if image.get("backbone"):
        out["image_backbone"] = str(image["backbone"])
    tta = (run_config.get("predict") or {}).get("tta")
    if tta:
        out["tta"] = int(tta)
    return out
