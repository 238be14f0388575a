"""Issue 16 (Show): damaged CSVs, PNGs and submission strings thrown at `check-data`,
`validate-submission` and `evaluate`, from a seeded generator. Every case must end in a non-zero
exit with one readable line on stderr; an exception escaping `kit.cli.main` (a traceback) fails the
test with the seed and the damage that caused it. Each damage below is one a correct checker must
report, so exit 0 is a failure too."""
from __future__ import annotations

import base64
import random
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

from kit.cli import main
from kit.rle import encode_binary_mask
from test_layout import SIZE, make_clean

MAX_COUNTS_BYTES = 64 << 20  # kit.rle.MAX_COUNTS_BYTES, written out so this file runs on kits without it
CASES = 40  # per command; each runs in well under a second on 24 px images

BAD_IDS = ["../x", "/abs/x", "a\\b", "..", ".hidden", "a\x00b", "a\x01b", " pad", "CON", "a:b", "x" * 5000,
           "a\u202eb", ""]
BAD_LABELS = ["abc", "19", "-1", "1||2", "nan", "0|", "1.5", "\x00"]
BAD_SIZES = ["0", "-5", "abc", "", "1.5", "nan", "9" * 400]


def _stderr_lines(capsys) -> tuple[str, str]:
    out, err = capsys.readouterr()
    lines = [line for line in (p.split("\r")[-1].strip() for p in err.split("\n")) if line and "%|" not in line]
    return out, lines


def _run(capsys, argv: list[str], what: str) -> None:
    rc = main(argv)  # an unexpected exception propagates: the traceback the test is about
    out, lines = _stderr_lines(capsys)
    assert rc != 0, f"{what}: exit 0 (stdout tail {out[-300:]!r})"
    assert len(lines) == 1, f"{what}: stderr {lines[:5]!r}"
    assert len(lines[0]) < 2500 and len(out) < 200_000, f"{what}: {len(lines[0])} / {len(out)} characters"


def _set_cell(text: str, rng: random.Random, column: int, value: str) -> str:
    lines = text.split("\n")
    body = [i for i in range(1, len(lines)) if lines[i]]
    i = rng.choice(body)
    cells = lines[i].split(",")
    cells[column] = value
    lines[i] = ",".join(cells)
    return "\n".join(lines)


def _damage_csv(text: str, rng: random.Random, kind: str) -> tuple[bytes, str]:
    """A guaranteed-bad version of a train.csv (kind 'labels') or sample_submission.csv ('sample')."""
    ops = ["bad_id", "duplicate", "no_header", "binary", "empty", "bad_value"]
    op = rng.choice(ops)
    if op == "bad_id":
        value = rng.choice(BAD_IDS)
        return _set_cell(text, rng, 0, value).encode("utf-8", "surrogatepass"), f"{op} {value[:20]!r}"
    if op == "duplicate":
        lines = text.rstrip("\n").split("\n")
        return ("\n".join(lines + [rng.choice(lines[1:])]) + "\n").encode(), op
    if op == "no_header":
        return text.split("\n", 1)[1].encode(), op
    if op == "binary":  # a NUL or a byte that is not UTF-8, somewhere after the header
        data = bytearray(text.encode())
        at = rng.randrange(text.index("\n") + 1, len(data))
        data[at:at] = rng.choice([b"\x00", b"\xff", b"\xc3(", bytes(rng.randrange(256) for _ in range(50)) + b"\x00"])
        return bytes(data), op
    if op == "empty":
        return b"", op
    if kind == "labels":
        value = rng.choice(BAD_LABELS)
        return _set_cell(text, rng, 1, value).encode(), f"label {value!r}"
    value = rng.choice(BAD_SIZES)
    return _set_cell(text, rng, rng.choice([1, 2]), value).encode(), f"size {value[:20]!r}"


def _damage_png(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    op = rng.choice(["truncate", "zero", "signature", "garbage", "other_size"])
    if op == "truncate":
        path.write_bytes(data[: rng.randrange(1, len(data) - 1)])
    elif op == "zero":
        path.write_bytes(b"")
    elif op == "signature":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(8)) + data[8:])
    elif op == "garbage":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5000))))
    else:  # one channel of another size than the other three
        import cv2

        assert cv2.imwrite(str(path), np.zeros((SIZE + 8, SIZE), np.uint8))
    return f"{op} {path.name}"


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = make_clean(tmp_path_factory.mktemp("fuzz_clean"))
    assert main(["check-data", str(root), "--decode", "--workers", "1"]) == 0  # the undamaged set passes
    return root


@pytest.mark.parametrize("seed", range(CASES))
def test_check_data_on_damaged_datasets(clean, tmp_path, capsys, seed):
    rng = random.Random(seed)
    root = tmp_path / "data"
    shutil.copytree(clean, root)
    capsys.readouterr()
    what = []
    for target in rng.sample(["train.csv", "sample_submission.csv", "png", "png"], rng.randint(1, 3)):
        if target == "png":
            what.append(_damage_png(rng.choice(sorted(root.glob("*/*.png"))), rng))
        else:
            path = root / target
            data, op = _damage_csv(path.read_text(), rng, "labels" if target == "train.csv" else "sample")
            path.write_bytes(data)
            what.append(f"{target}: {op}")
    _run(capsys, ["check-data", str(root), "--decode", "--workers", "1"], f"seed {seed}: {what}")


# ------------------------------------------------------------------------------ submissions

def _submission_rows(rng: random.Random, n: int = 3) -> tuple[str, str]:
    """A valid submission and solution for `n` 24 px images (IDs te0..); each row's first triple
    has the class of the solution's cell, so `evaluate` decodes its mask."""
    header = "ID,ImageWidth,ImageHeight,PredictionString"
    sub, sol = [header], [header]
    for i in range(n):
        mask = np.zeros((SIZE, SIZE), bool)
        y, x = rng.randrange(SIZE - 6), rng.randrange(SIZE - 6)
        mask[y:y + 6, x:x + 6] = True
        text = encode_binary_mask(mask)
        cls = rng.randrange(18)
        sub.append(f"te{i},{SIZE},{SIZE},{cls} {rng.random():.3f} {text} 18 0.1 {text}")
        sol.append(f"te{i},{SIZE},{SIZE},{cls} 1 {text}")
    return "\n".join(sub) + "\n", "\n".join(sol) + "\n"


_BOMB = base64.b64encode(zlib.compress(b"1 " * (MAX_COUNTS_BYTES // 2 + 1024), 9)).decode()
_BAD_MASKS = [
    "!!!notbase64!!!",
    base64.b64encode(b"plain bytes, not zlib").decode(),
    base64.b64encode(zlib.compress(b"3 4 5 6 7", 9)[:-4]).decode(),  # truncated stream
    base64.b64encode(zlib.compress(b"0 5", 9)).decode(),  # counts that do not cover 24 x 24
    base64.b64encode(zlib.compress(b"\x00\x01\x02", 9)).decode(),
    _BOMB,
]


def _damage_submission(text: str, rng: random.Random, *, strict_ids: bool) -> tuple[str, str]:
    """A guaranteed-bad version of a submission. `strict_ids` False (evaluate): no IDs with
    surrounding spaces, which `read_submission` strips (the row is then an unscored extra row),
    and only the first, scored, triple is damaged (the evaluator, as the Open Images rules, ignores
    detections of classes without truth on the image and never decodes their masks)."""
    lines = text.rstrip("\n").split("\n")
    i = rng.randrange(1, len(lines))
    cells = lines[i].split(",", 3)
    ops = ["id", "size", "class", "confidence", "mask", "tokens", "fields", "duplicate", "binary", "header"]
    op = rng.choice(ops)
    tokens = cells[3].split(" ")
    if op == "id":
        cells[0] = rng.choice([b for b in BAD_IDS if b and (strict_ids or b == b.strip())])
    elif op == "size":
        cells[rng.choice([1, 2])] = rng.choice(BAD_SIZES)
    elif op == "class":
        tokens[0] = rng.choice(["19", "-1", "x", "1.5", "", "99999999999999999999"])
    elif op == "confidence":
        tokens[1] = rng.choice(["nan", "inf", "-inf", "-11", "abc", ""])
    elif op == "mask":
        tokens[2] = rng.choice(_BAD_MASKS)
    elif op == "tokens":
        tokens = tokens[: rng.choice([1, 2, 4, 5])]
    elif op == "fields":
        cells = cells + ["extra"]  # (a missing PredictionString field reads as an empty one)
    elif op == "duplicate":
        lines.append(lines[i])
    elif op == "binary":
        tokens[rng.randrange(len(tokens) if strict_ids else 3)] += rng.choice(["\x00", "\x01\x02", "\ufffd\x7f"])
    else:
        lines[0] = rng.choice(["", "Id,Width,Height,Pred", "ID,ImageWidth"])
    if op in ("class", "confidence", "mask", "tokens", "binary"):
        cells[3] = " ".join(tokens)
    if op not in ("duplicate", "header"):
        lines[i] = ",".join(cells)
    return "\n".join(lines) + "\n", f"{op} on line {i + 1}"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_clean(tmp_path_factory.mktemp("fuzz_images"), n_train=0, n_test=3)


@pytest.mark.parametrize("seed", range(CASES))
def test_validate_submission_on_damaged_files(images, tmp_path, capsys, seed):
    rng = random.Random(1000 + seed)
    good, _ = _submission_rows(rng)
    sample = tmp_path / "sample.csv"
    sample.write_text("ID,ImageWidth,ImageHeight,PredictionString\n" + "".join(f"te{i},{SIZE},{SIZE},\n" for i in range(3)))
    sub = tmp_path / "sub.csv"
    sub.write_text(good)
    assert main(["validate-submission", str(sub), "--sample", str(sample), "--images", str(images / "test")]) == 0
    capsys.readouterr()
    text, what = _damage_submission(good, rng, strict_ids=True)
    sub.write_text(text, encoding="utf-8", errors="surrogatepass")
    _run(capsys, ["validate-submission", str(sub), "--sample", str(sample), "--images", str(images / "test")],
         f"seed {seed}: {what}")


@pytest.mark.parametrize("seed", range(CASES))
def test_evaluate_on_damaged_submissions(tmp_path, capsys, seed):
    rng = random.Random(2000 + seed)
    good, solution_text = _submission_rows(rng)
    solution = tmp_path / "solution.csv"
    solution.write_text(solution_text)
    sub = tmp_path / "sub.csv"
    sub.write_text(good)
    assert main(["evaluate", "--solution", str(solution), "--submission", str(sub)]) == 0
    capsys.readouterr()
    text, what = _damage_submission(good, rng, strict_ids=False)
    sub.write_text(text, encoding="utf-8", errors="surrogatepass")
    _run(capsys, ["evaluate", "--solution", str(solution), "--submission", str(sub)], f"seed {seed}: {what}")
