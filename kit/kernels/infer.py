"""Kaggle inference kernel of the HPA single-cell kit (internet off).

What it does, in order (every step prints what it found and how long it took):
1. finds, under the input root (``/kaggle/input``; env ``KAGGLE_INPUT_ROOT``), the code dataset (the
   folder holding ``kit-bundle.json``), the weights dataset (``kit-weights.json``) and the competition
   data (``<competition>/test/`` + ``sample_submission.csv``);
2. installs the kit and its pinned extras from the code dataset's wheels, the image's torch stack
   pinned, nothing downloaded (the prelude's `install`, from kit/kernels/prelude.py);
3. reads the run's inputs from its manifest (`kit.manifest.read_manifest`: folds, segmentation backend
   and options, sizes) and runs ``python -m kit predict`` on the test images with the weights dataset's
   run folder (mirrored, files symlinked, into a scratch folder: /kaggle/input is read-only and predict
   caches per image; the test masks go to the scratch folder with ``--mask-cache``; env
   ``KIT_SCRATCH_DIR``, default /kaggle/tmp or the system temp folder), on the GPU when there is one,
   writing ``submission.csv`` in the working folder (``/kaggle/working``; env ``KAGGLE_WORKING_DIR``);
4. validates it with ``python -m kit validate-submission``; a failed check fails the kernel.

Only the standard library is imported before step 2. ``kit kernel build`` fills the settings block
below and renders the shared prelude (kit/kernels/prelude.py) between the prelude lines; the
datasets are found by their manifests even when Kaggle mounts them under other names.
"""
from __future__ import annotations

# >>> kit build settings (rewritten by `python -m kit kernel build`)
SETTINGS = {
    "competition": "hpa-single-cell-image-classification",
    "code_dataset": "hpa-kit-code",
    "weights_dataset": "hpa-kit-weights",
    "predict_args": [],
}
# <<< kit build settings

# >>> kit prelude (rendered by `python -m kit kernel build` from kit/kernels/prelude.py)
# <<< kit prelude


def writable_run(run_dir: Path) -> Path:
    """A writable mirror of the read-only run folder: real folders, symlinked files.

    `kit predict` caches per-image results under RUN_DIR/predict/, and /kaggle/input is read-only.
    """
    mirror = scratch_dir() / "run"
    if mirror.exists():
        shutil.rmtree(mirror)
    for src in sorted(run_dir.rglob("*")):
        dst = mirror / src.relative_to(run_dir)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(src.resolve(), dst)
    return mirror


def main() -> int:
    code = find_dataset("kit-bundle.json", SETTINGS["code_dataset"])
    weights = find_dataset("kit-weights.json", SETTINGS["weights_dataset"])
    comp = find_competition(SETTINGS["competition"], "test", "sample_submission.csv")
    log(f"code dataset {code}; weights dataset {weights}; competition data {comp}")
    install(code)
    run_dir = writable_run(unpacked(weights, json.loads((weights / "kit-weights.json").read_text()).get("run_dir", "run")))
    from kit.manifest import read_manifest  # installed from the bundle a moment ago

    manifest = read_manifest(run_dir)
    log(f"run trained by kit {manifest.kit_version}: folds {manifest.folds}, segmentation {manifest.mask_backend}, "
        f"tiles {manifest.tile_size} px, fields {manifest.field_size} px")
    out = working_dir() / "submission.csv"
    n_images = len({p.name.rsplit("_", 1)[0] for p in (comp / "test").glob("*_green.*")})
    extra = list(SETTINGS.get("predict_args", []))
    if "--device" not in extra:
        extra += ["--device", "auto"]  # the run's train.device may say cpu; use the kernel's GPU when there is one
    if "--workers" not in extra:
        extra += ["--workers", str(max(1, min(4, os.cpu_count() or 1)))]
    t = time.time()
    kit("predict", "--run", str(run_dir), "--images", str(comp / "test"), "--out", str(out),
        "--ids-from", str(comp / "sample_submission.csv"), "--mask-cache", str(scratch_dir() / "cache" / "masks"), *extra)
    took = time.time() - t
    log(f"predict: {n_images} images in {took:.1f} s ({took / max(n_images, 1):.2f} s/image)")
    kit("validate-submission", str(out), "--sample", str(comp / "sample_submission.csv"))
    log(f"done: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
