"""Offline Kaggle kernels: bundle the kit, its wheels and a run's weights; validate; push.

Command ``python -m kit kernel build|push|estimate``. One module a job:

- `kit.kaggle.metadata`: the kaggle CLI's rules for dataset/kernel metadata, checked before it sees them;
- `kit.kaggle.runtime`: the kernel runtime estimate against Kaggle's 9 hours;
- `kit.kaggle.wheels`: which wheels a code dataset bundles (the closure of the kit's run-time
  requirements over the installed distributions, minus the torch stack) and the kit's own wheel;
- `kit.kaggle.render`: kernel scripts from the templates shipped in `kit.kernels` (settings + prelude);
- `kit.kaggle.staging`: the build folder, built fresh and moved into place, with a record of its files;
- `kit.kaggle.bundle`: `build` (the code dataset, the weights dataset, the kernel folders);
- `kit.kaggle.credentials`: presence of Kaggle credentials, and none inside a bundle;
- `kit.kaggle.push`: `push` (the kaggle CLI; only what the build recorded);
- `kit.kaggle.commands`: the ``kernel`` command.

Inside Kaggle the kernel finds both datasets under ``/kaggle/input`` by their manifests, installs the
wheels with ``pip install --no-index --find-links`` while pinning the image's own torch stack (torch,
torchvision and everything they require: never replaced, never bundled), runs ``kit predict`` on the
competition's ``test/`` and writes ``/kaggle/working/submission.csv``.
"""
from __future__ import annotations

from kit.kaggle.bundle import BuildOptions, build, copy_run, slim_checkpoint
from kit.kaggle.commands import configure_kernel
from kit.kaggle.credentials import check_no_credentials, have_credentials
from kit.kaggle.metadata import (DEFAULT_COMPETITION, DEFAULT_LICENSE, DEFAULT_PREFIX, dataset_metadata,
                                 dataset_metadata_problems, kernel_metadata, kernel_metadata_problems,
                                 kernel_title_warning, slugify)
from kit.kaggle.push import load_build, push, push_commands
from kit.kaggle.render import as_notebook, render_kernel
from kit.kaggle.runtime import HARDWARE, Estimate, estimate_runtime, run_figures
from kit.kaggle.wheels import (build_kit_wheel, canonical_name, dependency_closure, gather_wheels,
                               installed_distributions, kernel_pins, protected_names, repack_installed)

__all__ = [
    "BuildOptions", "build", "copy_run", "slim_checkpoint", "configure_kernel", "check_no_credentials",
    "have_credentials", "DEFAULT_COMPETITION", "DEFAULT_LICENSE", "DEFAULT_PREFIX", "dataset_metadata",
    "dataset_metadata_problems", "kernel_metadata", "kernel_metadata_problems", "kernel_title_warning", "slugify",
    "load_build", "push", "push_commands", "as_notebook", "render_kernel", "HARDWARE", "Estimate",
    "estimate_runtime", "run_figures", "build_kit_wheel", "canonical_name", "dependency_closure", "gather_wheels",
    "installed_distributions", "kernel_pins", "protected_names", "repack_installed",
]
