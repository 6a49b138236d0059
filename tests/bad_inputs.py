"""A corpus of bad inputs, written on demand into a folder: nothing large is committed.

Each case writes its files under ``<folder>/in`` and returns the ``napari-register register``
arguments that feed them in, the words the one-line error must contain and the file it must name.
A few cases are inputs the tool accepts with a note (RGB against grey, images that do not overlap,
an output folder that holds the inputs): they must register, say so, and leave the inputs alone.
``python tests/bad_inputs.py DIR`` writes every case into DIR to look at.
"""
from __future__ import annotations

import errno
import gzip
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from corpus_files import (PAYLOAD_MARKER, Payload, checkpoint_blob, dicom_series, grey_photo, mha, nifti, pair,
                          photo, volume)

METHODS = ("optimize", "carl")
# Short schedules: the corpus is about messages, not accuracy.
FAST = {"optimize": {"levels": [2, 1], "iterations": [3, 3], "affine_iterations": 3},
        "carl": {"affine_iterations": 3}}


@dataclass
class Case:
    """What one bad input must give: ``args`` for ``napari-register register``; the error line must
    match ``expect`` (a regex) and contain ``names``; ``ok``: it registers and prints ``expect`` as a note."""

    args: list[str]
    expect: str
    names: Optional[str] = None
    ok: bool = False
    patch: Optional[Callable[[Any], None]] = None  # gets pytest's monkeypatch
    inputs: list[Path] = field(default_factory=list)  # files that must stay byte for byte


Builder = Callable[[Path, str], Case]
CASES: dict[str, tuple[Builder, tuple[str, ...]]] = {}


def case(name: str, methods: tuple[str, ...] = METHODS) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        CASES[name] = (fn, methods)
        return fn
    return deco


def build(name: str, folder: Path, method: str) -> Case:
    """Write case ``name`` into ``folder`` (``in/`` inputs, ``out/`` output) for ``method``."""
    (folder / "in").mkdir(parents=True, exist_ok=True)
    c = CASES[name][0](folder, method)
    c.inputs = sorted(p for p in (folder / "in").rglob("*") if p.is_file())
    return c


def run_args(moving: Path, fixed: Path, folder: Path, method: str, *extra: str, options: Any = None,
             out: Optional[Path] = None) -> list[str]:
    """``register`` arguments: the short schedule of ``method`` (or ``options``), output ``folder/out``."""
    opts = FAST[method] if options is None else options
    out = folder / "out" if out is None else out
    args = [str(moving), str(fixed), "--out", str(out), "--method", method, "--device", "cpu", "--quiet"]
    if method == "carl":
        args += ["--io-steps", "0"]
    if opts != {}:
        args += ["--options", opts if isinstance(opts, str) else json.dumps(opts)]
    return args + list(extra)


def bad_fixed(d: Path, m: str, fixed: Path, expect: str) -> Case:
    """A good moving image against the bad ``fixed`` one; the error must name ``fixed``."""
    moving, _ = pair(d)
    return Case(run_args(moving, fixed, d, m), expect, fixed.name)


# ------------------------------------------------------------------------------------ image files

@case("truncated_nifti")
def _truncated(d: Path, m: str) -> Case:
    mov, fix = pair(d)
    fix.write_bytes(fix.read_bytes()[: len(fix.read_bytes()) // 2])
    return Case(run_args(mov, fix, d, m), r"truncated", "fixed.nii.gz")


@case("wrong_magic")
def _magic(d: Path, m: str) -> Case:
    (d / "in/gif.nii.gz").write_bytes(b"GIF89a" + bytes(range(256)) * 8)
    return bad_fixed(d, m, d / "in/gif.nii.gz", r"cannot read it as \.nii\.gz.*not what its extension says")


@case("volume_4d")
def _four_d(d: Path, m: str) -> Case:
    fmri = nifti(d / "in/fmri.nii.gz", np.stack([volume(seed=i) for i in range(3)], -1))
    return bad_fixed(d, m, fmri, r"4D volume.*extract a single volume")


@case("2d_against_3d")
def _dims(d: Path, m: str) -> Case:
    _, fix = pair(d)
    mov = photo(d / "in/slide.png", grey_photo())
    return Case(run_args(mov, fix, d, m), r"2D.*3D.*register 2D with 2D", "slide.png")


@case("rgb_against_grey")
def _rgb(d: Path, m: str) -> Case:
    grey = grey_photo()
    mov = photo(d / "in/moving_rgb.png", np.stack([np.roll(grey, 2, 0), grey // 2, 255 - grey], -1))
    fix = photo(d / "in/fixed_grey.png", grey)
    return Case(run_args(mov, fix, d, m), "", ok=True)  # the registration sees luminance; RGB stays RGB


@case("zero_spacing")
def _zero(d: Path, m: str) -> Case:
    return bad_fixed(d, m, nifti(d / "in/zero.nii.gz", volume(), pixdim=[0.0, 1.0, 1.0]), r"spacing.*not positive")


@case("negative_spacing")
def _negative(d: Path, m: str) -> Case:
    return bad_fixed(d, m, mha(d / "in/negative.mha", volume(), spacing="-1 1 1"), r"spacing.*not positive")


@case("nan_spacing")
def _nan_spacing(d: Path, m: str) -> Case:
    nan = nifti(d / "in/nan.nii.gz", volume(), pixdim=[1.0, float("nan"), 1.0])
    return bad_fixed(d, m, nan, r"spacing.*not positive")


@case("singular_direction")
def _singular(d: Path, m: str) -> Case:
    affine = np.eye(4)
    affine[:3, 1] = [1.0, 0.0, 0.0]  # the y axis points along x
    return bad_fixed(d, m, nifti(d / "in/singular.nii.gz", volume(), affine=affine), r"direction matrix.*singular")


@case("nan_voxels")
def _nan_voxels(d: Path, m: str) -> Case:
    a = volume()
    a[3:5, 3:5, 3:5] = np.nan
    return bad_fixed(d, m, nifti(d / "in/holes.nii.gz", a), r"NaN or infinite.*fill them")


@case("inf_voxels")
def _inf_voxels(d: Path, m: str) -> Case:
    a = volume()
    a[0, 0, 0] = np.inf
    mov = nifti(d / "in/inf.nii.gz", a)
    _, fix = pair(d)
    return Case(run_args(mov, fix, d, m), r"NaN or infinite", "inf.nii.gz")


@case("constant_image")
def _constant(d: Path, m: str) -> Case:
    flat = nifti(d / "in/flat.nii.gz", np.full((16, 16, 16), 7, np.float32))
    return bad_fixed(d, m, flat, r"constant image.*nothing to align")


@case("one_voxel")
def _one_voxel(d: Path, m: str) -> Case:
    return bad_fixed(d, m, nifti(d / "in/dot.nii.gz", np.ones((1, 1, 1), np.float32)), r"too small to register")


@case("huge_header_nifti")
def _huge_nifti(d: Path, m: str) -> Case:
    fix = nifti(d / "in/huge.nii.gz", volume())
    raw = bytearray(gzip.decompress(fix.read_bytes()))
    raw[42:48] = np.asarray([30000, 30000, 30000], "<i2").tobytes()  # dim[1:4] (int16 at 40 + 2)
    fix.write_bytes(gzip.compress(bytes(raw)))
    return bad_fixed(d, m, fix, r"header declares .*voxels.*more than this machine can hold")


@case("huge_header_mha")
def _huge_mha(d: Path, m: str) -> Case:
    huge = mha(d / "in/huge.mha", volume(), dims="100000 100000 100000")
    return bad_fixed(d, m, huge, r"header declares 100000x100000x100000 voxels")


@case("missing_path")
def _missing(d: Path, m: str) -> Case:
    return bad_fixed(d, m, d / "in/typo.nii.gz", r"no such file")


@case("folder_without_dicom")
def _no_dicom(d: Path, m: str) -> Case:
    (d / "in/notes").mkdir()
    (d / "in/notes/readme.txt").write_text("not an image")
    return bad_fixed(d, m, d / "in/notes", r"folder without a DICOM series")


@case("dicom_two_series")
def _two_series(d: Path, m: str) -> Case:
    a = (volume((4, 16, 16)) * 1000).astype(np.int16)
    dicom_series(d / "in/dicom", a, "1.2.826.0.1.3680043.2.1125.1")
    dicom_series(d / "in/dicom", a, "1.2.826.0.1.3680043.2.1125.2", start=10)
    return bad_fixed(d, m, d / "in/dicom", r"2 DICOM series in one folder.*folder of its own")


@case("no_physical_overlap")
def _no_overlap(d: Path, m: str) -> Case:
    _, fix = pair(d)
    far = np.eye(4)
    far[:3, 3] = 5000.0  # 5 m away: another scanner's frame
    mov = nifti(d / "in/far.nii.gz", volume(shift=2), affine=far)
    return Case(run_args(mov, fix, d, m), r"do not overlap in physical space", ok=True)


# ------------------------------------------------------------------------------------ labels and points

@case("empty_label_map")
def _empty_labels(d: Path, m: str) -> Case:
    mov, fix = pair(d)
    lab = nifti(d / "in/moving_seg.nii.gz", np.zeros((16, 16, 16), np.uint8))
    return Case(run_args(mov, fix, d, m, "--moving-labels", str(lab)), r"no labels.*right file", "moving_seg.nii.gz")


@case("labels_on_another_grid")
def _labels_grid(d: Path, m: str) -> Case:
    mov, fix = pair(d)
    lab = nifti(d / "in/moving_seg.nii.gz", np.ones((8, 8, 8), np.uint8))
    return Case(run_args(mov, fix, d, m, "--moving-labels", str(lab)), r"label grid .* does not match", lab.name)


def points_case(d: Path, m: str, moving_csv: str, fixed_csv: str, expect: str, names: str) -> Case:
    mov, fix = pair(d)
    (d / "in/moving.csv").write_text(moving_csv)
    (d / "in/fixed.csv").write_text(fixed_csv)
    points = ["--moving-points", str(d / "in/moving.csv"), "--fixed-points", str(d / "in/fixed.csv")]
    return Case(run_args(mov, fix, d, m, *points), expect, names)


@case("points_bad_rows")
def _points(d: Path, m: str) -> Case:
    return points_case(d, m, "X,Y,Z\n1,2,3\n4,five,6\n", "X,Y,Z\n1,2,3\n4,5,6\n", r"row 3 .*no number", "moving.csv")


@case("points_count_mismatch")
def _points_count(d: Path, m: str) -> Case:
    return points_case(d, m, "X,Y,Z\n1,2,3\n4,5,6\n", "X,Y,Z\n1,2,3\n", r"has 2 points but .* has 1", "fixed.csv")


# ------------------------------------------------------------------------------------ method, options

@case("unknown_method")
def _unknown_method(d: Path, m: str) -> Case:
    mov, fix = pair(d)
    args = run_args(mov, fix, d, m, options={})
    args[args.index("--method") + 1] = "voxelmorph"
    return Case(args, r"unknown method 'voxelmorph'; known methods: .*optimize", "voxelmorph")


@case("options_malformed_json")
def _bad_json(d: Path, m: str) -> Case:
    mov, fix = pair(d)
    return Case(run_args(mov, fix, d, m, options="{levels: [2, 1]"), r"--options is not valid JSON", "levels")


@case("options_unknown_name")
def _unknown_option(d: Path, m: str) -> Case:
    mov, fix = pair(d)
    return Case(run_args(mov, fix, d, m, options={"levles": [2, 1]}), r"has no option\(s\) \['levles'\]; its options",
                "levles")


@case("options_bad_value")
def _bad_value(d: Path, m: str) -> Case:
    mov, fix = pair(d)
    bad = {"optimize": {"levels": [4, 2], "iterations": [5]}, "carl": {"passes": 0}}[m]
    return Case(run_args(mov, fix, d, m, options=bad), r"options .* for method", next(iter(bad)))


# ------------------------------------------------------------------------------------ checkpoints

def _ckpt_case(d: Path, blob: dict, expect: str, dim: int = 2) -> Case:
    import torch

    mov, fix = pair(d, dim)
    torch.save(blob, d / "in/mine.pt")
    return Case(run_args(mov, fix, d, "carl", "--checkpoint", str(d / "in/mine.pt")), expect, "mine.pt")


@case("checkpoint_wrong_method", ("carl",))
def _ckpt_method(d: Path, m: str) -> Case:
    return _ckpt_case(d, {**checkpoint_blob(), "method": "alto"}, r"is for method 'alto', not 'carl'")


@case("checkpoint_wrong_dim", ("carl",))
def _ckpt_dim(d: Path, m: str) -> Case:
    return _ckpt_case(d, checkpoint_blob("carl-3d"), r"registers 3D images but the images are 2D")


@case("checkpoint_missing_keys", ("carl",))
def _ckpt_missing(d: Path, m: str) -> Case:
    blob = checkpoint_blob()
    blob["state_dict"] = dict(list(blob["state_dict"].items())[1:])
    return _ckpt_case(d, blob, r"1 missing weight\(s\).*0 unexpected")


@case("checkpoint_extra_keys", ("carl",))
def _ckpt_extra(d: Path, m: str) -> Case:
    import torch

    blob = checkpoint_blob()
    blob["state_dict"] = {**blob["state_dict"], "head.weight": torch.zeros(3)}
    return _ckpt_case(d, blob, r"0 missing weight\(s\).*1 unexpected \['head.weight'\]")


@case("checkpoint_pickle_payload", ("carl",))
def _ckpt_payload(d: Path, m: str) -> Case:
    c = _ckpt_case(d, {**checkpoint_blob(), "card": {"note": Payload(d / PAYLOAD_MARKER)}},
                   r"not a plain weights file.*nothing was run.*Do not load this file")
    return c


@case("checkpoint_truncated", ("carl",))
def _ckpt_truncated(d: Path, m: str) -> Case:
    from napari_register import weights

    mov, fix = pair(d, 2)
    (d / "in/mine.pt").write_bytes((weights.CHECKPOINT_DIR / "carl-2d.pt").read_bytes()[:5000])
    return Case(run_args(mov, fix, d, m, "--checkpoint", str(d / "in/mine.pt")), r"truncated or not a checkpoint",
                "mine.pt")


@case("checkpoint_malformed_card", ("carl",))
def _ckpt_card(d: Path, m: str) -> Case:
    from napari_register import weights

    mov, fix = pair(d, 2)
    (d / "in/mine.pt").write_bytes((weights.CHECKPOINT_DIR / "carl-2d.pt").read_bytes())
    (d / "in/mine.json").write_text('{"method": "carl", "sha256": ')
    return Case(run_args(mov, fix, d, m, "--checkpoint", str(d / "in/mine.pt")), r"card .* is not valid JSON",
                "mine.json")


@case("checkpoint_unknown_name", ("carl",))
def _ckpt_name(d: Path, m: str) -> Case:
    mov, fix = pair(d, 2)
    return Case(run_args(mov, fix, d, m, "--checkpoint", "carl-9d"), r"no shipped checkpoint named 'carl-9d'",
                "carl-9d")


# ------------------------------------------------------------------------------------ outputs

@case("output_folder_is_a_file")
def _out_file(d: Path, m: str) -> Case:
    mov, fix = pair(d)
    (d / "in/taken").write_text("a file, not a folder")
    return Case(run_args(mov, fix, d, m, out=d / "in/taken/out"), r"cannot write .*a file, not a folder", "taken")


@case("output_folder_not_writable")
def _out_denied(d: Path, m: str) -> Case:
    mov, fix = pair(d)

    def deny(monkeypatch: Any) -> None:  # tests run as root, where chmod cannot take the right away
        import tempfile

        def mkstemp(*a: Any, **k: Any) -> Any:
            raise PermissionError(errno.EACCES, "Permission denied", str(k.get("dir")))
        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return Case(run_args(mov, fix, d, m), r"cannot write .*out: permission denied", "out", patch=deny)


@case("disk_full")
def _disk_full(d: Path, m: str) -> Case:
    mov, fix = pair(d)

    def full(monkeypatch: Any) -> None:  # the jacobian writer fills the disk half-way
        from napari_register import image

        real = image.write_image

        def write_image(img: Any, path: Any, **kw: Any) -> Any:
            if "jacobian" in Path(path).name:
                Path(path).write_bytes(b"\0" * 100)
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(img, path, **kw)
        monkeypatch.setattr(image, "write_image", write_image)
    return Case(run_args(mov, fix, d, m), r"cannot write .*jacobian.nii.gz: the disk is full", "jacobian.nii.gz",
                patch=full)


@case("output_folder_holds_an_input_named_like_an_output")
def _out_clash(d: Path, m: str) -> Case:
    mov, _ = pair(d)
    fix = nifti(d / "in/warped.nii.gz", volume())
    return Case(run_args(mov, fix, d, m, out=d / "in"), r"would overwrite the input .*warped.nii.gz", "warped.nii.gz")


@case("output_folder_holds_the_inputs")
def _out_inputs(d: Path, m: str) -> Case:
    mov, fix = pair(d)
    return Case(run_args(mov, fix, d, m, out=d / "in"), "", ok=True)  # beside the inputs, which stay as they are


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "bad_inputs")
    for name, (_, methods) in CASES.items():
        c = build(name, out / name, methods[0])
        print(f"{name}: napari-register register {' '.join(c.args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
