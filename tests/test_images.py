"""kit.images: reading a sample's four channels, headers, bad inputs, and depth-independent scaling."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from kit.errors import DataError
from kit.images import (
    CHANNELS,
    ImageReadError,
    channel_path,
    image_size,
    read_channel,
    read_image_info,
    read_sample,
    stack_channels,
    to_float,
    to_uint8,
)


def write_sample(folder: Path, image_id: str, shape=(24, 32), dtype=np.uint8, ext=".png", seed=0) -> np.ndarray:
    """Write four random channels; return the H x W x 4 array they hold (RGBY)."""
    rng = np.random.default_rng(seed)
    high = 256 if dtype == np.uint8 else 65536
    image = rng.integers(0, high, size=(*shape, 4)).astype(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    for k, c in enumerate(CHANNELS):
        assert cv2.imwrite(str(folder / f"{image_id}_{c}{ext}"), image[..., k])
    return image


def test_channel_order_is_rgby():
    assert CHANNELS == ("red", "green", "blue", "yellow")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_read_sample_lossless_formats(tmp_path, dtype, ext):
    image = write_sample(tmp_path, "s1", dtype=dtype, ext=ext)
    out = read_sample(tmp_path, "s1")
    assert out.shape == (24, 32, 4)  # H x W x 4, non-square to catch a transposition
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, image)
    assert out.flags["C_CONTIGUOUS"]


def test_read_sample_jpeg(tmp_path):
    # a smooth image so that JPEG's loss stays small
    yy, xx = np.mgrid[0:40, 0:48]
    base = ((xx + yy) * 2).astype(np.uint8)
    for k, c in enumerate(CHANNELS):
        cv2.imwrite(str(tmp_path / f"j_{c}.jpg"), base + 10 * k)
    out = read_sample(tmp_path, "j")
    assert out.shape == (40, 48, 4) and out.dtype == np.uint8
    for k in range(4):
        assert np.abs(out[..., k].astype(int) - (base + 10 * k)).mean() < 3


def test_colour_channel_file_keeps_its_tint_planes_only(tmp_path):
    # the HPA website serves each channel as an RGB image tinted in its colour; yellow = red + green
    grey = np.tile(np.arange(0, 200, 5, dtype=np.uint8), (16, 1))
    bgr = np.stack([np.zeros_like(grey), grey, grey], axis=-1)
    path = tmp_path / "c_yellow.png"
    cv2.imwrite(str(path), bgr)
    out = read_channel(path)
    assert out.ndim == 2
    np.testing.assert_array_equal(out, grey)
    # JPEG chroma bleed in the other planes is not signal: a red-tinted file with noisy G/B planes
    rng = np.random.default_rng(0)
    bleed = rng.integers(0, 28, grey.shape).astype(np.uint8)
    red_file = np.stack([bleed, bleed[::-1], grey], axis=-1)  # BGR: only R carries the tint
    cv2.imwrite(str(tmp_path / "d_red.png"), red_file)
    np.testing.assert_array_equal(read_channel(tmp_path / "d_red.png"), grey)
    # yellow with unequal planes: their mean
    yel = np.stack([bleed, grey, (grey // 2 + 50).astype(np.uint8)], axis=-1)
    cv2.imwrite(str(tmp_path / "e_yellow.png"), yel)
    expect = (grey.astype(int) + (grey // 2 + 50) + 1) // 2
    np.testing.assert_array_equal(read_channel(tmp_path / "e_yellow.png"), expect)
    # a grey image stored as colour keeps its values
    cv2.imwrite(str(tmp_path / "f_blue.png"), np.stack([grey] * 3, axis=-1))
    np.testing.assert_array_equal(read_channel(tmp_path / "f_blue.png"), grey)


WEBSITE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hpa_real" / "website_fields"


@pytest.mark.skipif(not WEBSITE.is_dir(), reason=f"real HPA website fields not found at {WEBSITE} (../shared absent)")
def test_real_website_jpeg_fields_read_as_four_tint_channels():
    for image_id, side in (("89_B5_1", 1728), ("800_A6_1", 2048)):
        image = read_sample(WEBSITE, image_id)
        assert image.shape == (side, side, 4) and image.dtype == np.uint8
        for k, channel in enumerate(CHANNELS):
            raw = cv2.imread(str(WEBSITE / f"{image_id}_{channel}.jpg"), cv2.IMREAD_COLOR)
            tint = {"red": [2], "green": [1], "blue": [0], "yellow": [1, 2]}[channel]
            expect = raw[..., tint].astype(np.float32).mean(axis=2)
            assert np.abs(image[..., k] - expect).max() <= 0.5
            # the dark background stays dark (the maximum over planes would lift it with bleed)
            assert np.percentile(image[..., k], 25) <= np.percentile(raw.max(axis=2), 25)


def test_mixed_depth_promoted_to_uint16_full_scale_kept(tmp_path):
    image8 = write_sample(tmp_path, "m", dtype=np.uint8)
    green16 = np.random.default_rng(1).integers(0, 65536, size=(24, 32)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "m_green.png"), green16)
    out = read_sample(tmp_path, "m")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out[..., 1], green16)
    np.testing.assert_array_equal(out[..., 0], image8[..., 0].astype(np.uint16) * 257)
    assert to_float(out)[..., 0].max() == pytest.approx(image8[..., 0].max() / 255)


def test_png_preferred_and_other_extension_found(tmp_path):
    write_sample(tmp_path, "x", ext=".tif")
    assert channel_path(tmp_path, "x", "red").suffix == ".tif"
    write_sample(tmp_path, "x", ext=".png")
    assert channel_path(tmp_path, "x", "red").suffix == ".png"


def test_ids_with_underscores(tmp_path):
    image = write_sample(tmp_path, "10580_1610_C1_1")
    np.testing.assert_array_equal(read_sample(tmp_path, "10580_1610_C1_1"), image)


def test_missing_channel_names_the_file(tmp_path):
    write_sample(tmp_path, "s")
    (tmp_path / "s_yellow.png").unlink()
    with pytest.raises(ImageReadError) as info:
        read_sample(tmp_path, "s")
    assert "s_yellow" in str(info.value) and str(tmp_path) in str(info.value)
    assert "missing" in str(info.value)


def test_different_shapes_name_the_file(tmp_path):
    write_sample(tmp_path, "s")
    cv2.imwrite(str(tmp_path / "s_blue.png"), np.zeros((10, 12), np.uint8))
    with pytest.raises(ImageReadError) as info:
        read_sample(tmp_path, "s")
    message = str(info.value)
    assert "s_blue.png" in message and "12x10" in message and "32x24" in message


def test_truncated_png_names_the_file(tmp_path):
    write_sample(tmp_path, "s", shape=(64, 64), dtype=np.uint16)
    path = tmp_path / "s_green.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageReadError) as info:
        read_sample(tmp_path, "s")
    assert str(path) in str(info.value) and "truncated" in str(info.value)


def test_png_cut_in_the_header_names_the_file(tmp_path):
    write_sample(tmp_path, "s")
    path = tmp_path / "s_red.png"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ImageReadError, match="s_red.png"):
        read_sample(tmp_path, "s")


def test_empty_file_names_the_file(tmp_path):
    write_sample(tmp_path, "s")
    (tmp_path / "s_red.png").write_bytes(b"")
    with pytest.raises(ImageReadError) as info:
        read_sample(tmp_path, "s")
    assert "empty" in str(info.value) and "s_red.png" in str(info.value)


def test_non_image_file_names_the_file(tmp_path):
    write_sample(tmp_path, "s")
    (tmp_path / "s_blue.png").write_text("ID,Label\nthis is not an image\n")
    with pytest.raises(ImageReadError) as info:
        read_sample(tmp_path, "s")
    assert "unreadable" in str(info.value) and "s_blue.png" in str(info.value)


def test_truncated_tif_names_the_file(tmp_path):
    rng = np.random.default_rng(0)
    write_sample(tmp_path, "t", shape=(64, 64), dtype=np.uint16, ext=".tif")
    path = tmp_path / "t_red.tif"
    cv2.imwrite(str(path), rng.integers(0, 65536, (64, 64)).astype(np.uint16))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ImageReadError, match="t_red.tif"):
        read_sample(tmp_path, "t")


def test_read_channel_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="nothere_red.png"):
        read_channel(tmp_path / "nothere_red.png")


def test_image_read_error_is_a_data_error():
    assert issubclass(ImageReadError, DataError)


def test_stack_channels_checks_shapes():
    a = np.zeros((4, 5), np.uint8)
    with pytest.raises(ImageReadError, match="green"):
        stack_channels([a, np.zeros((5, 4), np.uint8), a, a])
    assert stack_channels([a, a, a, a]).shape == (4, 5, 4)


def test_to_float_both_depths_full_scale():
    img8 = np.array([[0, 128, 255]], np.uint8)
    img16 = np.array([[0, 32896, 65535]], np.uint16)
    f8, f16 = to_float(img8), to_float(img16)
    assert f8.dtype == np.float32 and f16.dtype == np.float32
    np.testing.assert_allclose(f8, [[0, 128 / 255, 1]], rtol=1e-6)
    np.testing.assert_allclose(f16, f8, rtol=1e-6)  # 8-bit v and 16-bit v * 257 are the same intensity
    # scaled by the dtype, not the image's maximum: a faint image stays faint
    assert to_float(np.full((2, 2), 1000, np.uint16)).max() == pytest.approx(1000 / 65535)


def test_to_uint8_both_depths():
    img8 = np.arange(256, dtype=np.uint8)
    assert to_uint8(img8) is img8
    v = np.arange(256, dtype=np.uint16) * 257
    np.testing.assert_array_equal(to_uint8(v), np.arange(256))
    edges = to_uint8(np.array([0, 128, 129, 385, 65535], np.uint16))
    np.testing.assert_array_equal(edges, [0, 0, 1, 1, 255])  # nearest, never above 255
    with pytest.raises(TypeError):
        to_uint8(np.zeros(3, np.float32))


# ---------------------------------------------------------------------------------- headers
@pytest.mark.parametrize("ext, dtype", [
    (".png", np.uint8), (".png", np.uint16), (".tif", np.uint8), (".tif", np.uint16), (".jpg", np.uint8),
])
def test_read_image_info_matches_decoded(tmp_path, ext, dtype):
    path = tmp_path / f"x_red{ext}"
    cv2.imwrite(str(path), np.zeros((30, 50), dtype))
    info = read_image_info(path)
    assert (info.width, info.height) == (50, 30)
    assert info.bit_depth == (8 if dtype == np.uint8 else 16)
    assert info.samples == 1
    assert info.format == {".png": "png", ".tif": "tiff", ".jpg": "jpeg"}[ext]


def test_read_image_info_tiff_with_ifd_first(tmp_path):
    from PIL import Image  # PIL writes the IFD before the strips, cv2 after: both layouts are parsed

    path = tmp_path / "p_red.tif"
    Image.fromarray(np.arange(40 * 20, dtype=np.uint16).reshape(20, 40)).save(path)
    info = read_image_info(path)
    assert (info.width, info.height, info.bit_depth) == (40, 20, 16)
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(ImageReadError, match="truncated TIFF.*p_red.tif"):
        read_image_info(path)


@pytest.mark.parametrize("ext, cut, words", [
    (".png", 0.5, "truncated PNG"),
    (".png", 20, "truncated PNG"),
    (".tif", 0.5, "truncated TIFF"),
    (".jpg", 0.5, "truncated JPEG"),
    (".png", 0, "empty file"),
])
def test_read_image_info_detects_truncation(tmp_path, ext, cut, words):
    path = tmp_path / f"x_red{ext}"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)] if isinstance(cut, float) else data[:cut])
    with pytest.raises(ImageReadError) as info:
        read_image_info(path)
    assert words in str(info.value) and str(path) in str(info.value)


def test_read_image_info_non_image(tmp_path):
    path = tmp_path / "x_red.png"
    path.write_text("not an image at all")
    with pytest.raises(ImageReadError, match="x_red.png"):
        read_image_info(path)
    with pytest.raises(ImageReadError, match="missing"):
        read_image_info(tmp_path / "absent.png")


def test_image_size_reads_the_first_channel_header(tmp_path):
    write_sample(tmp_path, "s", shape=(20, 36), ext=".tif")
    assert image_size(tmp_path, "s") == (36, 20)
    with pytest.raises(ImageReadError, match="missing channel file"):
        image_size(tmp_path, "absent")

