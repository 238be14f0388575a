"""The hpacellseg adapter against a fake package that behaves like HPA Cell Segmentator 0.1.8.

The fake reproduces the release's traps on the kit's pinned stack: ``transform.rescale(...,
multichannel=True)`` (rejected by current scikit-image), ``np.bool`` in `label_cell` (absent from
NumPy 1.24-1.26: simulated by the fake's own ``np``), positional ``remove_small_objects(x, n)``
(deprecated in scikit-image 0.26), whole pickled models of a `pytorch_zoo` class (refused by
``torch.load``'s default), a U-Net that crashes unless the scaled sides are multiples of 32
(1728 px without padding), a download when given a path that does not exist, and predictions
resized back with (rows, cols) swapped. A last test runs the real package when it is installed
with its weights (skipped otherwise).
"""
from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kit.errors import ConfigError, KitError  # noqa: E402
from kit.segment import instance_f1, segment_image, segment_images  # noqa: E402
from kit.segment.cache import MaskCache, segment_folder  # noqa: E402
from test_segment import check_contract, ellipse_field  # noqa: E402  (tests/ is on sys.path)

CELLSEGMENTATOR_SRC = '''
import os
import cv2
import numpy as np
import torch
from skimage import transform, util


def download_with_url(url, path):
    raise AssertionError(f"the package tried to download {url} to {path}")


class CellSegmentator:
    instances = []

    def __init__(self, nuclei_model="./nuclei_model.pth", cell_model="./cell_model.pth", scale_factor=0.25,
                 device="cuda", padding=False, multi_channel_model=True):
        if isinstance(nuclei_model, str):
            if not os.path.exists(nuclei_model):
                download_with_url("nuclei-url", nuclei_model)
            nuclei_model = torch.load(nuclei_model, map_location=torch.device(device))
        if isinstance(nuclei_model, torch.nn.DataParallel) and device == "cpu":
            nuclei_model = nuclei_model.module
        if isinstance(cell_model, str):
            if not os.path.exists(cell_model):
                download_with_url("cell-url", cell_model)
            cell_model = torch.load(cell_model, map_location=torch.device(device))
        self.nuclei_model = nuclei_model.to(device)
        self.cell_model = cell_model.to(device)
        self.scale_factor, self.padding, self.device = scale_factor, padding, device
        self.multi_channel_model = multi_channel_model
        self.calls = []
        CellSegmentator.instances.append(self)

    def _preprocess(self, image):
        self.target_shape = image.shape
        x = transform.rescale(image, self.scale_factor, multichannel=True)
        if self.padding:
            rows, cols = x.shape[:2]
            self.scaled_shape = rows, cols
            x = cv2.copyMakeBorder(x, 32, 32 - rows % 32, 32, 32 - cols % 32, cv2.BORDER_REFLECT)
        return x.transpose([2, 0, 1])

    def _net(self, model, x):
        with torch.no_grad():
            return torch.softmax(model(torch.tensor(x[None]).float()), dim=1)[0].numpy()

    def _restore_scaling_padding(self, pred):
        pred = pred.transpose([1, 2, 0])
        if self.padding:
            pred = pred[32:32 + self.scaled_shape[0], 32:32 + self.scaled_shape[1], ...]
        pred = np.ascontiguousarray(pred)
        pred[..., 0] = 0
        # (rows, cols) passed as cv2's (width, height), as in 0.1.8
        return cv2.resize(pred, (self.target_shape[0], self.target_shape[1]), interpolation=cv2.INTER_AREA)

    def pred_nuclei(self, images):
        self.calls.append(("pred_nuclei", [(im.shape, im.dtype) for im in images]))
        out = []
        for im in images:
            x = self._preprocess(np.dstack((im, im, im)) if im.ndim == 2 else im)
            out.append(self._restore_scaling_padding(util.img_as_ubyte(self._net(self.nuclei_model, x))))
        return out

    def pred_cells(self, images, precombined=False):
        red, er, blue = images
        if self.multi_channel_model and er is None:
            raise ValueError("Please specify the image path(s) for er channels!")
        if not isinstance(red, list) or not isinstance(blue, list):
            raise ValueError("The microtubule images should be a list")
        if not len(red) == len(er) == len(blue):
            raise ValueError("The lists of images needs to be the same length")
        self.calls.append(("pred_cells", [(im.shape, im.dtype) for im in red]))
        out = []
        for r, y, b in zip(red, er, blue):
            x = self._preprocess(np.dstack((r, y, b)))
            out.append(util.img_as_ubyte(self._restore_scaling_padding(self._net(self.cell_model, x))))
        return out
'''

UTILS_SRC = '''
import numpy as np
from skimage import measure, segmentation
from skimage.morphology import remove_small_objects


def label_cell(nuclei_pred, cell_pred):
    nuclei = measure.label((nuclei_pred[..., 2] > 128).astype(np.bool))
    nuclei = remove_small_objects(nuclei, 20)
    nuclei = measure.label(nuclei > 0)
    cells = segmentation.watershed(np.zeros(nuclei.shape), nuclei, mask=(cell_pred[..., 2] > 128) | (nuclei > 0))
    corner = np.zeros(cells.shape, bool)
    corner[:6, :6] = True  # a region without a nucleus: the adapter must drop it
    cells = np.where((cells == 0) & corner, cells.max() + 1, cells)
    return (nuclei * (cells > 0)).astype(np.uint16), cells.astype(np.uint16)
'''


class TinyUNet(torch.nn.Module):
    """Stands in for pytorch_zoo's DPN U-Net: foreground logits from a channel; sides % 32 == 0 or it crashes."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.up = torch.nn.Upsample(scale_factor=32, mode="nearest")

    def forward(self, x):
        x = x + 0 * self.up(torch.nn.functional.avg_pool2d(x, 32))  # shape mismatch unless sides % 32 == 0
        sig = x[:, 2:3] if self.kind == "nuclei" else torch.maximum(x[:, 0:1], x[:, 1:2])
        fg = 60 * (sig - (0.3 if self.kind == "nuclei" else 0.06))
        return torch.cat([torch.zeros_like(fg), torch.full_like(fg, -30.0), fg], dim=1)


TinyUNet.__module__ = "pytorch_zoo"


class _NumpyWithoutBool:
    """numpy as NumPy 1.24-1.26 had it: no ``np.bool``."""

    def __getattr__(self, name):
        if name == "bool":
            raise AttributeError("module 'numpy' has no attribute 'bool'")
        return getattr(np, name)


def _module(name: str, source: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    exec(compile(source, f"<fake {name}>", "exec"), mod.__dict__)
    return mod


@pytest.fixture
def fake_hpacellseg(monkeypatch, tmp_path):
    import kit.segment.hpacellseg as adapter

    zoo = types.ModuleType("pytorch_zoo")
    zoo.TinyUNet = TinyUNet
    monkeypatch.setitem(sys.modules, "pytorch_zoo", zoo)
    pkg = types.ModuleType("hpacellseg")
    cs = _module("hpacellseg.cellsegmentator", CELLSEGMENTATOR_SRC)
    utils = _module("hpacellseg.utils", UTILS_SRC)
    utils.np = _NumpyWithoutBool()
    pkg.cellsegmentator, pkg.utils = cs, utils
    monkeypatch.setitem(sys.modules, "hpacellseg", pkg)
    monkeypatch.setitem(sys.modules, "hpacellseg.cellsegmentator", cs)
    monkeypatch.setitem(sys.modules, "hpacellseg.utils", utils)
    monkeypatch.setattr(adapter, "_SEGMENTATORS", {})
    weights = tmp_path / "weights"
    weights.mkdir()
    # whole pickled models, as the release's weight files are (the nuclei one DataParallel-wrapped)
    torch.save(torch.nn.DataParallel(TinyUNet("nuclei")), weights / "nuclei-model.pth")
    torch.save(TinyUNet("cell"), weights / "cell-model.pth")
    return types.SimpleNamespace(weights=weights, cs=cs, utils=utils)


def _quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message="hpacellseg runs on the CPU")
    warnings.simplefilter("error", FutureWarning)  # a deprecated call that the shims missed fails the test
    return ctx


def test_fake_has_the_release_traps(fake_hpacellseg):
    """Without the adapter, the fake fails where 0.1.8 fails on the pinned stack."""
    weights, cs, utils = fake_hpacellseg.weights, fake_hpacellseg.cs, fake_hpacellseg.utils
    with pytest.raises(Exception, match="[Ww]eights only load failed|weights_only"):
        torch.load(weights / "cell-model.pth")
    models = [torch.load(weights / n, weights_only=False) for n in ("nuclei-model.pth", "cell-model.pth")]
    seg = cs.CellSegmentator(*models, device="cpu", padding=False)
    with pytest.raises(TypeError, match="multichannel"):
        seg.pred_nuclei([np.zeros((256, 256), np.uint8)])
    with pytest.raises(AssertionError, match="download"):
        cs.CellSegmentator("/nowhere/nuclei.pth", models[1], device="cpu")
    with pytest.raises(AttributeError, match="bool"):
        utils.label_cell(np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64, 3), np.uint8))


def test_adapter_calls_shapes_ids_and_restores_the_package(fake_hpacellseg):
    cs, utils = fake_hpacellseg.cs, fake_hpacellseg.utils
    originals = (cs.transform, utils.np, utils.remove_small_objects)
    a, _, true_a = ellipse_field(size=256, grid=2, seed=3)
    b, _, true_b = ellipse_field(size=200, grid=2, seed=4, bits=16)  # 200 * 0.25 = 50: needs padding
    c, _, true_c = ellipse_field(size=256, grid=2, seed=5)
    ctx = _quiet()
    try:
        results = segment_images([a, b, c], "hpacellseg", weights_dir=str(fake_hpacellseg.weights), device="cpu")
    finally:
        ctx.__exit__(None, None, None)
    assert (cs.transform, utils.np, utils.remove_small_objects) == originals  # shims were scoped
    insts = cs.CellSegmentator.instances
    assert len(insts) == 2  # one per padding setting; each shape group is one call
    by_pad = {i.padding: i for i in insts}
    assert by_pad[False].calls == [("pred_nuclei", [((256, 256), np.uint8)] * 2),
                                   ("pred_cells", [((256, 256), np.uint8)] * 2)]
    assert by_pad[True].calls == [("pred_nuclei", [((200, 200), np.uint8)]),  # 16-bit sent as uint8
                                  ("pred_cells", [((200, 200), np.uint8)])]
    assert all(i.scale_factor == 0.25 and i.device == "cpu" and i.multi_channel_model for i in insts)
    assert not isinstance(insts[0].nuclei_model, torch.nn.DataParallel) and not insts[0].nuclei_model.training
    for image, truth, (nuclei, cells) in zip([a, b, c], [true_a, true_b, true_c], results):
        check_contract(image, nuclei, cells)
        assert cells.max() == 4  # the nucleus-free corner region was dropped
        assert cells[:3, :3].max() == 0
        assert instance_f1(cells, truth)["f1"] == 1.0
    import kit.segment.hpacellseg as adapter

    assert adapter._needs_padding((1728, 1728), 0.25)  # 432 px: not a multiple of 32
    assert not adapter._needs_padding((2048, 2048), 0.25) and not adapter._needs_padding((3072, 3072), 0.25)
    ctx = _quiet()
    try:
        segment_image(a, "hpacellseg", weights_dir=str(fake_hpacellseg.weights), device="cpu")
        assert len(cs.CellSegmentator.instances) == 2  # built once per process and setting
        # padding forced off on a shape that needs it: the U-Net crashes, as 0.1.8 does on 1728 px
        with pytest.raises(RuntimeError, match="size of tensor"):
            segment_image(b, "hpacellseg", weights_dir=str(fake_hpacellseg.weights), device="cpu", padding=False)
    finally:
        ctx.__exit__(None, None, None)


def test_non_square_image_comes_back_in_its_shape(fake_hpacellseg):
    image, _, truth = ellipse_field(size=256, grid=2, seed=6)
    image, truth = image[:, :192], truth[:, :192]
    ctx = _quiet()
    try:
        nuclei, cells = segment_image(image, "hpacellseg", weights_dir=str(fake_hpacellseg.weights), device="cpu")
    finally:
        ctx.__exit__(None, None, None)
    assert cells.shape == (256, 192)
    check_contract(image, nuclei, cells)
    assert instance_f1(cells, truth)["f1"] >= 0.75


def test_missing_weights_name_the_file(fake_hpacellseg, tmp_path, monkeypatch):
    image = ellipse_field(size=64, grid=1)[0]
    monkeypatch.delenv("KIT_HPACELLSEG_WEIGHTS", raising=False)
    with pytest.raises(ConfigError, match="weights_dir"):
        segment_image(image, "hpacellseg", device="cpu")
    half = tmp_path / "half"
    half.mkdir()
    (half / "nuclei-model.pth").write_bytes((fake_hpacellseg.weights / "nuclei-model.pth").read_bytes())
    with pytest.raises(ConfigError, match="not found") as err:
        segment_image(image, "hpacellseg", weights_dir=str(half), device="cpu")
    assert str(half / "cell-model.pth") in str(err.value) and "nuclei-model.pth," not in str(err.value)
    cache = MaskCache(tmp_path / "masks", "hpacellseg", {"weights_dir": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="not found"):  # checked before the first image
        segment_folder(tmp_path, ["a", "b"], cache, progress=False)
    assert not cache.dir.exists()
    assert fake_hpacellseg.cs.CellSegmentator.instances == []  # never constructed, so it could not download
    monkeypatch.setenv("KIT_HPACELLSEG_WEIGHTS", str(fake_hpacellseg.weights))
    ctx = _quiet()
    try:
        nuclei, cells = segment_image(image, "hpacellseg", device="cpu")
    finally:
        ctx.__exit__(None, None, None)
    assert cells.max() == 1


def test_missing_pytorch_zoo_or_bad_weight_file_is_explained(fake_hpacellseg, tmp_path, monkeypatch):
    import kit.segment.hpacellseg as adapter

    image = ellipse_field(size=64, grid=1)[0]
    monkeypatch.setitem(sys.modules, "pytorch_zoo", None)  # not installed
    with pytest.raises(KitError, match="pytorch_zoo"):
        segment_image(image, "hpacellseg", weights_dir=str(fake_hpacellseg.weights), device="cpu")
    with pytest.raises(KitError, match="pytorch_zoo"):
        adapter._check({"weights_dir": str(fake_hpacellseg.weights)})
    monkeypatch.setitem(sys.modules, "pytorch_zoo", types.SimpleNamespace(TinyUNet=TinyUNet))
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save(TinyUNet("cell").state_dict(), bad / "cell-model.pth")  # a state dict, not a model
    (bad / "nuclei-model.pth").write_bytes((fake_hpacellseg.weights / "nuclei-model.pth").read_bytes())
    with pytest.raises(KitError, match="cell-model.pth.*whole pickled model"):
        segment_image(image, "hpacellseg", weights_dir=str(bad), device="cpu")


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    import kit.segment.hpacellseg as adapter

    monkeypatch.setitem(sys.modules, "hpacellseg", None)  # makes `import hpacellseg` fail
    monkeypatch.setattr(adapter, "_SEGMENTATORS", {})
    with pytest.raises(KitError, match=r"pip install --no-deps.*HPA-Cell-Segmentation.*nuclei-model\.pth"):
        segment_image(np.zeros((64, 64, 4), np.uint8), "hpacellseg", weights_dir=str(tmp_path))


def test_cache_key_ignores_weight_location(fake_hpacellseg, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    for p in fake_hpacellseg.weights.iterdir():
        (other / p.name).write_bytes(p.read_bytes())
    a = MaskCache(tmp_path / "c", "hpacellseg", {"weights_dir": str(fake_hpacellseg.weights)})
    b = MaskCache(tmp_path / "c", "hpacellseg", {"weights_dir": str(other), "device": "cpu"})
    c = MaskCache(tmp_path / "c", "hpacellseg", {"weights_dir": str(other), "scale_factor": 0.5})
    assert a.dir == b.dir != c.dir


REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "hpa_real" / "kaggle2021_fields"


def _real_package_ready() -> str:
    import importlib.util
    import os

    if importlib.util.find_spec("hpacellseg") is None or importlib.util.find_spec("pytorch_zoo") is None:
        return "hpacellseg / pytorch_zoo not installed (see kit/segment/hpacellseg.py for the offline install)"
    if not os.environ.get("KIT_HPACELLSEG_WEIGHTS"):
        return "KIT_HPACELLSEG_WEIGHTS (folder with nuclei-model.pth and cell-model.pth) not set"
    if not REAL.is_dir():
        return f"real fields not found at {REAL}"
    return ""


@pytest.mark.skipif(bool(_real_package_ready()), reason=_real_package_ready() or "ready")
def test_real_package_reproduces_the_reference_masks():
    """With the real package and weights: the adapter's masks match the shared reference masks."""
    import cv2

    from kit.images import read_sample

    image_id = "000a6c98-bb9b-11e8-b2b9-ac1f6b6435d0"
    image = read_sample(REAL / "train", image_id)
    ref = cv2.imread(str(REAL / "masks" / f"{image_id}_predictedmask.png"), cv2.IMREAD_UNCHANGED).astype(np.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nuclei, cells = segment_image(image, "hpacellseg")
    assert instance_f1(cells, ref)["f1"] >= 0.9
