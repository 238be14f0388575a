"""kit.report on a tiny finished run: the page renders in headless Chromium with every image
loaded, its tables carry the run's numbers, the outlines drawn are the cell masks, and the page
works without cell truth. kit.draw's geometry on its own."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from kit.models import register_backbone  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


@register_backbone("report_test_cnn")
def _one_conv(in_chans: int):
    """One strided convolution: enough for a run whose report we draw, not for a good score."""
    return nn.Sequential(nn.Conv2d(in_chans, 8, 5, stride=4, padding=2), nn.ReLU(inplace=True)), 8


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished demo run (its report written by the pipeline) and its summary."""
    from kit.pipeline import demo

    root = tmp_path_factory.mktemp("report")
    summary = demo(root / "demo", seed=5, n_train=8, n_test=3, size=128, n_splits=2, epochs=1,
                   backbone="report_test_cnn", tile_size=32, field_size=64, workers=1,
                   submission=root / "submission.csv", leaderboard=root / "lb.sqlite",
                   overrides=["train.batch_size=16"])
    return Path(summary["run"]), summary


def _chromium(tmp_path: Path, *args: str) -> str:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium package (apt-get install -y chromium) "
                    "to render the report in a headless browser")
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    done = subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class _Tables(HTMLParser):
    """Text of every table cell, by the table's class: {class: [[cell, ...], ...]}."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.links: list[str] = []
        self.images: list[str] = []
        self._table = None
        self._row = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("class") or "", [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "a" and "href" in a:
            self.links.append(a["href"])
        elif tag == "img":
            self.images.append(a.get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(text: str) -> _Tables:
    p = _Tables()
    p.feed(text)
    return p


IMAGE_CHECK = """<script>window.addEventListener('load', function () {
var imgs = Array.prototype.slice.call(document.images);
var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
              .map(function (i) { return i.getAttribute('src'); });
var d = document.createElement('pre'); d.id = 'imgcheck';
d.textContent = JSON.stringify({n: imgs.length, bad: bad}); document.body.appendChild(d); });</script>"""


def test_demo_writes_the_report_and_prints_its_path(run, capsys):
    from kit.pipeline import print_summary

    run_dir, summary = run
    page = run_dir / "report" / "index.html"
    assert summary["report"] == str(page) and page.is_file()
    assert summary["timings"]["report"] > 0
    assert json.loads((run_dir / "summary.json").read_text())["timings"]["report"] == summary["timings"]["report"]
    print_summary(summary, as_json=False)
    assert f"report: {page}" in capsys.readouterr().out.splitlines()[-1]


def test_page_renders_in_chromium_with_every_image_and_the_runs_numbers(run, tmp_path):
    run_dir, summary = run
    out = run_dir / "report"
    text = (out / "index.html").read_text()
    # the browser loads a copy with a script that lists broken images; the page itself has none
    assert "<script" not in text
    check = out / "_imagecheck.html"
    check.write_text(text.replace("</body>", IMAGE_CHECK + "</body>"))
    try:
        dom = _chromium(tmp_path, "--virtual-time-budget=15000", "--dump-dom", check.resolve().as_uri())
    finally:
        check.unlink()
    found = re.search(r'<pre id="imgcheck">(.*?)</pre>', dom)
    assert found, dom[-1000:]
    result = json.loads(found.group(1))
    report = json.loads((out / "report.json").read_text())
    assert result["bad"] == [] and result["n"] >= 3 + len(report["fields"]), result

    # the tables as the browser built them
    page = _parse(_chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", (out / "index.html").resolve().as_uri()))
    comparison = page.tables["comparison"]
    for key, label in (("image_only", "image-only"), ("cell_only", "cell-only"), ("combined", "tuned combination"),
                       ("seg_ceiling", "segmentation ceiling"), ("cls_ceiling", "classification ceiling")):
        row = next(r for r in comparison if r[0].startswith(label))
        assert row[1] == f"{summary[key]:.4f}", (key, row)
    oof_row = next(r for r in comparison if r[0].startswith("tuned combination"))
    assert oof_row[2] == f"{summary['oof']['overall']:.4f}"
    per_fold = {r[0]: r[1] for r in page.tables["perfold"][1:]}
    assert per_fold == {k: f"{v:.4f}" for k, v in summary["oof"]["per_fold"].items()}
    # per-class test AP: the metric's, so its mean over classes with truth is the combined score
    per_class = page.tables["perclass"][1:]
    test_ap = [float(r[2]) for r in per_class if r[2] not in ("–", "")]
    assert len(per_class) == 19 and test_ap
    assert report["test_mAP"] == pytest.approx(summary["combined"], abs=1e-9)
    assert np.mean(test_ap) == pytest.approx(summary["combined"], abs=1e-3)
    import yaml

    combine = yaml.safe_load((run_dir / "combine.yaml").read_text())
    ranking = page.tables["ranking"]
    assert ranking[1][1] == combine["ranking"][0]["name"] and ranking[1][2] == f"{combine['ranking'][0]['score']:.4f}"
    timings = {r[0]: r[1] for r in page.tables[""] if len(r) == 3 and r[0] in summary["timings"]}
    assert timings["train"] == f"{summary['timings']['train']:.1f}"
    # nothing from the network; every link and image is a file of the report folder or the run
    for target in page.links + page.images:
        assert not re.match(r"^[a-z]+://", target), target
        if not target.startswith("#"):
            assert (out / target).exists(), target


def test_gallery_covers_every_class_present(run):
    from kit.submission import read_submission

    from kit.manifest import read_manifest

    run_dir, _ = run
    report = json.loads((run_dir / "report" / "report.json").read_text())
    data = Path(read_manifest(run_dir).data_dir)
    solution = read_submission(data / "test_solution.csv")
    present = sorted({c for p in solution.values() for c, _, _ in p.triples})
    assert report["classes_covered"] == present
    assert set(report["fields"]) <= set(solution)


def test_outlines_drawn_are_the_cell_masks(run):
    """Every pixel of an outline colour in a gallery field lies on the inner boundary of a cell of
    the mask cache, every boundary pixel is drawn, each cell in the colour of its verdict."""
    import cv2
    from skimage.segmentation import find_boundaries

    from kit.manifest import read_manifest
    from kit.draw import display_field
    from kit.images import read_sample
    from kit.report import FIELD_SIDE, VERDICT_COLOUR

    run_dir, _ = run
    test_dir = Path(read_manifest(run_dir).data_dir) / "test"
    out = run_dir / "report"
    cache = read_manifest(run_dir).masks()
    page = _parse((out / "index.html").read_text())
    verdicts = {}  # (field, cell) -> verdict, from the cell tables in page order
    fields = json.loads((out / "report.json").read_text())["fields"]
    cell_tables = page.tables["cells"]
    assert len(cell_tables) == sum(len(cache.load(f)[2]) + 1 for f in fields)  # header + one row per cell
    rows = iter(cell_tables)
    for f in fields:
        next(rows)
        for _ in range(len(cache.load(f)[2])):
            r = next(rows)
            verdicts[(f, int(r[0]))] = r[-1]
    colours = np.array(list(VERDICT_COLOUR.values()), np.uint8)
    for f in fields:
        picture = cv2.imread(str(out / "fields" / f"{f}.png"), cv2.IMREAD_COLOR)[..., ::-1]
        cells = cache.load(f)[1]
        assert picture.shape[:2] == cells.shape  # 128 px fields are drawn at full size
        drawn = (picture[:, :, None, :] == colours[None, None]).all(-1).any(-1)
        # a saturated pixel of the composite itself can be white, the no-truth colour: not drawn
        shown = display_field(read_sample(test_dir, f), FIELD_SIDE)
        drawn &= (picture != shown).any(-1)
        expected = find_boundaries(cells, connectivity=1, mode="inner") & (cells > 0)
        # the image border is not a boundary for the report (nor here: find_boundaries reflects)
        assert (drawn & ~expected).sum() == 0
        assert (expected & ~drawn).sum() == 0
        for k in np.unique(cells[expected]):
            got = {tuple(c) for c in picture[expected & (cells == k)]}
            assert got == {VERDICT_COLOUR[verdicts[(f, int(k))]]}, (f, k)


def test_report_without_cell_truth_shows_image_level_ap_and_top_cells(run, tmp_path):
    from kit.report import write_report

    from kit.manifest import read_manifest

    run_dir, _ = run
    test_dir = Path(read_manifest(run_dir).data_dir) / "test"
    images = tmp_path / "fields"  # the same images where no truth lies beside them
    shutil.copytree(test_dir, images)
    page_path = write_report(run_dir, images=images, out=tmp_path / "report")
    text = page_path.read_text()
    page = _parse(text)
    assert "cell-level AP is unavailable" in text
    assert page.tables["perclass"][0][:3] == ["class", "train images", "image model OOF AP"]
    assert "verdict" not in page.tables["cells"][0]
    assert any(src.startswith("tiles/top") for src in page.images)
    for src in page.images:
        assert (page_path.parent / src).is_file(), src
    report = json.loads((page_path.parent / "report.json").read_text())
    assert report["image_oof_ap"] is not None and len(report["fields"]) >= 1


def test_page_weight(run):
    run_dir, _ = run
    out = run_dir / "report"
    page = _parse((out / "index.html").read_text())
    weight = (out / "index.html").stat().st_size + sum((out / s).stat().st_size for s in page.images)
    assert weight < 2_000_000, weight


def test_choose_fields_covers_rare_classes_first():
    from kit.report import CellScores, choose_fields

    cells = CellScores(np.zeros(0, object), np.zeros(0, np.int64), np.zeros((0, 19)), has_truth=True)
    cells.true_classes = {
        "a": {1: [0], 2: [0], 3: [16]},
        "b": {1: [0], 2: [5]},
        "c": {1: [16]},
        "d": {1: [0]},
    }
    chosen = dict(choose_fields(cells, per_class=2, max_fields=3))
    assert "b" in chosen  # the only field with class 5
    covered = {c for image_id in chosen for cls in cells.true_classes[image_id].values() for c in cls}
    assert covered == {0, 5, 16}
    assert len(chosen) == 3


def test_downscaled_fields_and_masks_stay_aligned():
    from kit.draw import display_field, draw_outlines, outline_mask, scale_labels

    image = np.zeros((2048, 2048, 4), np.uint16)
    labels = np.zeros((2048, 2048), np.int32)
    labels[400:800, 1000:1600] = 1
    labels[1200:2048, 0:512] = 2
    image[..., 2][labels > 0] = 30000
    rgb = display_field(image, max_side=768)
    assert rgb.shape == (768, 768, 3) and rgb.dtype == np.uint8
    small = scale_labels(labels, rgb.shape[:2])
    ys, xs = np.nonzero(small == 1)
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (150, 300, 375, 600)  # x 0.375
    assert (rgb[..., 2][small > 0] > 200).all() and (rgb[..., 2][small == 0] == 0).all()
    edge = outline_mask(small)
    interior = np.zeros_like(edge)
    interior[151:299, 376:599] = True
    assert ((edge & (small == 1)) == ((small == 1) & ~interior)).all()
    # cell 2 touches the bottom and left borders: no outline along the image edge
    assert not edge[-1, 1:150].any() and not edge[500:700, 0].any() and edge[450, 0]
    drawn = draw_outlines(rgb, small, {1: (255, 0, 255)}, default=None)
    assert ((drawn != rgb).any(-1) == (edge & (small == 1))).all()
