"""The cell policy: which segmented cells to train on and to predict, and how much to trust each.

One policy (`kit.config.CellPolicyConfig`, the ``cells:`` section of a run config) is applied to
the training cells (`kit.torchdata.CellTileDataset`) and to the predicted cells (`kit.predict`), so
the model never learns from cells that are never scored and vice versa. It reads the per-cell
table of `kit.cells.cell_table` (made with the image, as the mask cache does); each rule is off at 0:

=========================== =============================================================================
rule                        what it does (field = one image; medians are over the field's own cells)
=========================== =============================================================================
border_nucleus_fraction f   drop a cell touching the border whose nucleus area is below f x the median
                            nucleus area of the interior cells (2nd/23rd place: f = 0.5, +0.004)
min_signal_fraction f       drop a nearly invisible cell: whole-cell signal (mean of red, blue and yellow
                            over the cell) or nucleus signal (mean blue over the nucleus) below f x the
                            field's median of the same (5th/36th place: 20% of the image's, +0.03-0.04)
edge_area_fraction a        scale the confidences of a border cell by min(1, area / (a x field area))
inner_area_fraction a       the same for interior cells (7th place: 80,000 and 32,000 px at 2048 px,
                            i.e. a = 0.019 and 0.0076 of the field; here relative to the field size)
=========================== =============================================================================

The green channel (the protein) is never used: a Negative cell is dim in green on purpose.
`keep_mask` and `confidence_scale` take a table of one field, or of several with an ``ID``
column (each field uses its own medians); `field_area` is H x W in pixels of the masks.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from kit.errors import ConfigError

RULES = ("border_nucleus_fraction", "min_signal_fraction", "edge_area_fraction", "inner_area_fraction")


def is_active(policy: Any) -> bool:
    """True when any rule of `policy` is on."""
    return policy is not None and any(float(getattr(policy, r, 0.0) or 0.0) > 0 for r in RULES)


def drops_cells(policy: Any) -> bool:
    return policy is not None and (float(policy.border_nucleus_fraction) > 0 or float(policy.min_signal_fraction) > 0)


def _groups(table) -> list[np.ndarray]:
    """Row positions of each field of `table` (one group when there is no ID column)."""
    if "ID" not in table.columns:
        return [np.arange(len(table))]
    codes = np.unique(table["ID"].to_numpy(), return_inverse=True)[1]
    return [np.flatnonzero(codes == g) for g in range(codes.max() + 1)] if len(codes) else []


def _signal(table) -> tuple[np.ndarray, np.ndarray]:
    missing = [c for c in ("mean_red", "mean_blue", "mean_yellow", "nucleus_blue") if c not in table.columns]
    if missing:
        raise ConfigError(f"cells.min_signal_fraction needs the cell table's intensity columns ({', '.join(missing)} "
                          "missing): build the table with the image (the mask cache does)")
    whole = table[["mean_red", "mean_blue", "mean_yellow"]].to_numpy(np.float64).mean(axis=1)
    return whole, table["nucleus_blue"].to_numpy(np.float64)


def keep_mask(table, policy: Any) -> np.ndarray:
    """Boolean per row of `table`: the cell survives the policy's drop rules."""
    n = len(table)
    keep = np.ones(n, bool)
    if n == 0 or not drops_cells(policy):
        return keep
    border = table["touches_border"].to_numpy(bool)
    f_border = float(policy.border_nucleus_fraction)
    f_signal = float(policy.min_signal_fraction)
    if f_signal > 0:
        whole, nucleus = _signal(table)
    nuc_area = table["nucleus_area"].to_numpy(np.float64)
    for rows in _groups(table):
        if f_border > 0:
            inner = rows[~border[rows]]
            ref = nuc_area[inner] if len(inner) else nuc_area[rows]
            median = float(np.median(ref)) if len(ref) else 0.0
            small = border[rows] & (nuc_area[rows] < f_border * median)
            keep[rows[small]] = False
        if f_signal > 0:
            for values in (whole, nucleus):
                median = float(np.median(values[rows]))
                keep[rows[values[rows] < f_signal * median]] = False
    return keep


def kept_cells(table, policy: Any, nuclei: np.ndarray | None = None, cells: np.ndarray | None = None,
               image: np.ndarray | None = None):
    """The rows of one field's cell table that `policy` keeps (index reset). A table without the
    intensity columns (e.g. of true masks) is rebuilt from the label images and `image` first when
    the signal rule needs them."""
    if not drops_cells(policy) or len(table) == 0:
        return table
    from kit.cells import INTENSITY_COLUMNS, cell_table

    if float(policy.min_signal_fraction) > 0 and not set(INTENSITY_COLUMNS) <= set(table.columns) \
            and image is not None and nuclei is not None and cells is not None:
        table = cell_table(nuclei, cells, image)
    return table[keep_mask(table, policy)].reset_index(drop=True)


def confidence_scale(table, policy: Any, field_area: float | np.ndarray) -> np.ndarray:
    """Factor in (0, 1] per row: min(1, area / (a x field_area)), a by border/interior (1 when off).

    `field_area`: one number, or one per row (tables of fields of several sizes)."""
    n = len(table)
    scale = np.ones(n)
    if n == 0 or policy is None:
        return scale
    a_edge, a_inner = float(policy.edge_area_fraction), float(policy.inner_area_fraction)
    if a_edge <= 0 and a_inner <= 0:
        return scale
    area = table["area"].to_numpy(np.float64)
    border = table["touches_border"].to_numpy(bool)
    field = np.broadcast_to(np.asarray(field_area, dtype=np.float64), (n,))
    for mask, a in ((border, a_edge), (~border, a_inner)):
        if a > 0:
            scale[mask] = np.minimum(1.0, area[mask] / (a * field[mask]))
    return np.clip(scale, 1e-6, 1.0)


def check_policy(policy: Any) -> None:
    """ConfigError naming the key for a negative or out-of-range value."""
    for r in RULES:
        v = float(getattr(policy, r))
        if v < 0 or (r in ("border_nucleus_fraction", "min_signal_fraction") and v >= 1.0) or v > 1.0:
            raise ConfigError(f"config key cells.{r}: must be in [0, 1), got {v}")
