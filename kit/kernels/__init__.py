"""Templates of the kit's offline Kaggle kernels, shipped inside the package (see README.md here).

- ``infer.py``: the inference kernel (installs the bundle, runs ``kit predict``, validates the submission);
- ``train.py``: the training kernel (one fold per kernel run);
- ``prelude.py``: their shared standard-library prelude (dataset discovery, the offline wheel install).

They are data, not library code: `kit.kaggle.render.render_kernel` fills each template's settings block
and renders the prelude into it, and `kit kernel build` writes the result into a kernel folder.
"""
