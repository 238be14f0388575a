"""Issue 16 items 8 and 9: a user's mistake is one line on stderr and exit 2, never a traceback;
quoted values are cut short; evaluate says when scored images have no row. Run in-process
through `kit.cli.main` (an unexpected exception fails the test with its traceback). New names are
imported inside the tests, so that the command tests also run (and fail) on a kit without the fix."""
from __future__ import annotations

import base64
import zlib

import pytest

from kit.cli import main


def error_lines(capsys) -> list[str]:
    """stderr without progress bars (tqdm redraws with carriage returns)."""
    err = capsys.readouterr().err
    return [line for line in (part.split("\r")[-1].strip() for part in err.split("\n")) if line and "%|" not in line]


def fails_with(capsys, argv: list[str], *words: str) -> str:
    rc = main(argv)
    lines = error_lines(capsys)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, lines)
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert len(lines[0]) < 600
    return lines[0]


# ------------------------------------------------------------------------------------ item 9

def test_clip_cuts_long_values_and_escapes_control_characters():
    from kit.errors import clip, one_line

    long = "g" * 10_000_000
    assert clip(long) == repr("g" * 100) + "... (10,000,000 characters)"
    assert clip("a\nb") == "'a\\nb'" and clip("abc", bare=True) == "abc" and clip("a b ", bare=True) == "'a b '"
    assert clip(5) == "5"
    assert one_line("a\n  b\tc") == "a b c" and len(one_line("x " * 10_000)) < 2100


def test_empty_id_lists_are_one_line(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    fails_with(capsys, ["segment", "--images", str(images), "--out", str(tmp_path / "c"), "--ids", str(empty), "--quiet"],
               str(empty))
    fails_with(capsys, ["predict", "--run", str(tmp_path / "run"), "--images", str(images), "--out",
                        str(tmp_path / "s.csv"), "--ids-from", str(empty)], str(empty), "empty file")
    header_only = tmp_path / "ids.csv"
    header_only.write_text("ID\n")
    fails_with(capsys, ["segment", "--images", str(images), "--out", str(tmp_path / "c"), "--ids", str(header_only),
                        "--quiet"], str(header_only), "no IDs")


@pytest.mark.parametrize("option, words", [
    ("scale=abc", ("option scale", "expected a finite number", "'abc'")),
    ("scale=5", ("option scale", "must be in (0, 1]", "got 5")),
    ("scale=0", ("option scale", "must be in (0, 1]")),
    ("scale=.nan", ("option scale", "finite number")),
    ("min_work_side=1.5", ("option min_work_side", "an integer")),
    ("seed_level=2", ("option seed_level", "[0, 1]")),
])
def test_segment_option_types_and_ranges_are_checked_before_the_first_image(tmp_path, capsys, option, words):
    from test_layout import write_sample

    images = tmp_path / "images"
    write_sample(images, "a")
    fails_with(capsys, ["segment", "--images", str(images), "--out", str(tmp_path / "c"), "--option", option,
                        "--quiet"], *words)
    assert not list(tmp_path.glob("c/**/*.npz"))


def test_run_refuses_a_nan_learning_rate_before_the_first_stage(tiny_dataset, tmp_path, capsys):
    work = tmp_path / "work"
    fails_with(capsys, ["run", "--data", str(tiny_dataset), "--work", str(work), "train.lr=nan"],
               "train.lr", "finite number > 0", "nan")
    assert not (work / "cache").exists()  # before: segmentation, tiles and fields, then a traceback in train


def test_output_folders_and_files_are_checked_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("mine")
    fails_with(capsys, ["synth", "--out", str(a_file), "--train", "1", "--test", "1", "--size", "64"],
               "argument --out", "is not a folder")
    fails_with(capsys, ["synth", "--out", str(a_file / "data"), "--train", "1", "--test", "1", "--size", "64"],
               "is a file, not a folder")
    assert a_file.read_text() == "mine"
    folder = tmp_path / "outdir"
    folder.mkdir()
    # --run does not exist: the --out error comes first, before any run is read or image segmented
    fails_with(capsys, ["predict", "--run", str(tmp_path / "no-run"), "--images", str(tmp_path), "--out", str(folder)],
               "argument --out", "is a folder: give a file name")
    fails_with(capsys, ["predict", "--run", str(tmp_path / "no-run"), "--images", str(tmp_path), "--out",
                        str(a_file / "sub.csv")], "is a file, not a folder")
    assert list(folder.iterdir()) == []


def test_float_options_must_be_finite_and_bad_numbers_are_quoted_short(tmp_path, capsys):
    sub = tmp_path / "s.csv"
    sub.write_text("ID,ImageWidth,ImageHeight,PredictionString\n")
    for value in ("nan", "inf"):
        fails_with(capsys, ["evaluate", "--solution", str(sub), "--submission", str(sub), "--iou", value],
                   "argument --iou", "expected a finite number")
    line = fails_with(capsys, ["check-data", str(tmp_path), "--workers", "9" * 5000], "argument --workers",
                      "expected an integer", "(5,000 characters)")
    assert len(line) < 300


def test_an_os_error_on_a_users_path_is_one_line(tmp_path, capsys):
    folder = tmp_path / "sub.csv"
    folder.mkdir()  # a folder where a file is read
    solution = tmp_path / "solution.csv"
    solution.write_text("ID,ImageWidth,ImageHeight,PredictionString\n")
    line = fails_with(capsys, ["evaluate", "--solution", str(solution), "--submission", str(folder)])
    assert str(folder) in line


def test_a_device_error_quotes_the_value_short():
    pytest.importorskip("torch")
    from kit.device import resolve_device
    from kit.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        resolve_device("cuda" + "x" * 5000)
    assert len(str(err.value)) < 600 and "(5,004 characters)" in str(err.value)


def test_a_zlib_bomb_is_refused_without_inflating_it():
    from kit.rle import MAX_COUNTS_BYTES, RLEError, decode_binary_mask

    bomb = base64.b64encode(zlib.compress(b"0" * (MAX_COUNTS_BYTES + 1024), 9)).decode()
    assert len(bomb) < 200_000
    with pytest.raises(RLEError, match="inflates to more than"):
        decode_binary_mask(bomb, 64, 64)
    cut = base64.b64encode(zlib.compress(b"1 2 3 4", 9)[:-3]).decode()  # a truncated stream
    with pytest.raises(RLEError, match="not zlib data"):
        decode_binary_mask(cut, 64, 64)


# ------------------------------------------------------------------------------------ item 8

def test_evaluate_warns_when_scored_images_have_no_row(tiny_dataset, tmp_path, capsys):
    solution = tiny_dataset / "test_solution.csv"
    rows = solution.read_text().splitlines()
    n = len(rows) - 1
    assert main(["evaluate", "--solution", str(solution), "--submission", str(solution)]) == 0
    assert not [line for line in error_lines(capsys) if line.startswith("warning")]  # complete: no warning

    header_only = tmp_path / "header.csv"
    header_only.write_text(rows[0] + "\n")
    assert main(["evaluate", "--solution", str(solution), "--submission", str(header_only)]) == 0
    warnings = [line for line in error_lines(capsys) if line.startswith("warning")]
    assert len(warnings) == 1 and f"none of the {n} scored images has a row" in warnings[0]

    partial = tmp_path / "partial.csv"
    partial.write_text("\n".join(rows[:2]) + "\n")
    assert main(["evaluate", "--solution", str(solution), "--submission", str(partial), "--json"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and f"{n - 1} of the {n} scored images have no row" in warnings[0]
    import json

    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["n_missing_submission_images"] == n - 1
