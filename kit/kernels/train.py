"""Kaggle training kernel of the HPA single-cell kit: trains ONE fold (internet off).

A Kaggle session lasts at most 9-12 hours, so each fold is its own kernel run: build with
``python -m kit kernel build ... --train-kernel --train-fold K`` (or edit ``SETTINGS["fold"]``), push,
and repeat per fold. Steps (each prints its time):
1. finds the code dataset (``kit-bundle.json``) and the competition data (``train/`` + ``train.csv``)
   under the input root (``/kaggle/input``; env ``KAGGLE_INPUT_ROOT``);
2. installs the kit from the bundled wheels exactly as the inference kernel does (the image's torch
   stack pinned, nothing downloaded: the prelude's `install`, from kit/kernels/prelude.py);
3. ``kit folds`` (the config's seed; same labels + seed = the same folds as at home), then
   ``kit train --fold K`` from the bundled config, with the data paths pointed at this machine: it
   segments, tiles and downscales every train image from one decode (mask, tile and field caches in
   a scratch folder, not in the saved output) and writes the run's manifest;
4. leaves the run folder in ``/kaggle/working/run`` (env ``KAGGLE_WORKING_DIR``): attach this kernel's
   output as a dataset to collect the folds, then build the inference kernel from them.

Only the standard library is imported before step 2. ``kit kernel build`` fills the settings block
below and renders the shared prelude (kit/kernels/prelude.py) between the prelude lines.
"""
from __future__ import annotations

# >>> kit build settings (rewritten by `python -m kit kernel build`)
SETTINGS = {
    "competition": "hpa-single-cell-image-classification",
    "code_dataset": "hpa-kit-code",
    "fold": 0,
    "n_splits": 5,
    "train_args": [],
}
# <<< kit build settings

# >>> kit prelude (rendered by `python -m kit kernel build` from kit/kernels/prelude.py)
# <<< kit prelude


def main() -> int:
    code = find_dataset("kit-bundle.json", SETTINGS["code_dataset"])
    comp = find_competition(SETTINGS["competition"], "train", "train.csv")
    log(f"code dataset {code}; competition data {comp}; fold {SETTINGS['fold']}")
    bundle = install(code)
    import yaml  # from the bundle

    config = code / "configs" / "train.yaml"
    cfg = yaml.safe_load(config.read_text()) or {}
    seed = int((cfg.get("train") or {}).get("seed", 42))
    cache = scratch_dir() / "cache"
    folds = scratch_dir() / "folds" / "train.csv"
    kit("folds", "--labels", str(comp / "train.csv"), "--n-splits", str(SETTINGS["n_splits"]),
        "--seed", str(seed), "--out", str(folds))
    overrides = [  # `kit train` makes the masks, tiles and fields from one decode of each image (kit.prepare)
        f"data.data_dir={comp}", f"data.train_csv={comp / 'train.csv'}", "data.images_subdir=train",
        f"data.folds_file={folds}", f"data.mask_cache={cache / 'masks'}", f"data.tile_cache={cache / 'tiles'}",
        f"data.field_cache={cache / 'fields'}", "train.device=auto",
    ]
    for kind in ("cell_model", "image_model"):  # bundled ImageNet weights, when the build found them
        pre = (bundle.get("pretrained") or {}).get(kind)
        overrides.append(f"{kind}.pretrained={code / pre}" if pre else f"{kind}.pretrained=null")
    run_dir = working_dir() / "run"
    kit("train", "--config", str(config), "--fold", str(SETTINGS["fold"]), "--run-dir", str(run_dir),
        *overrides, *SETTINGS.get("train_args", []))
    from kit.manifest import read_manifest

    manifest = read_manifest(run_dir)
    log(f"done: {run_dir} (folds {manifest.folds}; masks {manifest.mask_cache}, tiles {manifest.tile_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
