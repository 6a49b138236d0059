"""Shift experiment (CARL issue): translate the fixed image by 0..40 voxels and register again.

CARL's Xi is equivariant to translations, so its accuracy should not depend on where the fixed
image sits; a displacement-only U-Net in the same TwoStep/Down stack, trained the same way, has to
predict ever larger displacements and degrades. 3D: the OASIS pair (tissue Dice); 2D: the CIMA
histology pair Ki67 -> CD31 (landmark TRE). Both images are zero-padded by the largest shift along
the shift axis so no content leaves the grid; the fixed image (and its labels/landmarks) is then
rolled by the shift. Writes ``results.json``, ``results.md`` and ``plot_shift.png`` into a new run
folder ``benchmarks/results/<date>-shift-experiment/`` (``--out`` to choose another).

    python -m benchmarks shift_experiment --grid-sweep --also-3d "carl-3d shipped=carl-3d" \
        "U-Net baseline=benchmarks/shift_nets/unet-3d-3650.pt" "CARL wide=benchmarks/shift_nets/carl-3d-wide-650.pt" --symmetrised-2d

The compared networks are kept in ``benchmarks/shift_nets`` with their cards (training commands):
in 3D CARL and the U-Net baseline after the same 650 steps, and the U-Net trained on by the
shipped ``carl-3d``'s 3000-step second phase (``--also-3d`` adds both), and a 650-step CARL with the
wider encoder and attention scale 64 of ``carl-2d``; in 2D the shipped ``carl-2d`` and a U-Net
trained by its recipe.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from benchmarks import HERE, new_run_dir, provenance, write_run
from napari_register import coords, weights
from napari_register.data import data_root
from napari_register.image import read_image
from napari_register.intensity import normalise
from napari_register.methods.blocks import Symmetrised
from napari_register.methods.carl import load_net
from napari_register.metrics import dice

NETS = HERE / "shift_nets"  # the compared networks with their cards (inputs, not results)
SHIFTS = (0, 10, 20, 30, 40)
OASIS = data_root() / "brain3d/oasis_pair"
HISTO = data_root() / "histology2d/29-041-Izd2-w35-{}-les1"
HISTO_MOVING, HISTO_FIXED = "Ki67-7", "CD31-3"
HISTO_FACTOR = 4  # histology is shifted at 1/4 of its 1780 x 1470 pixels, working grid at 1/8


def pad_axis(a: np.ndarray, axis: int, pad: int) -> np.ndarray:
    widths = [(0, 0)] * a.ndim
    widths[axis] = (pad, pad)
    return np.pad(a, widths)


def run_net(net: torch.nn.Module, moving: np.ndarray, fixed: np.ndarray, work: tuple[int, ...]
            ) -> tuple[torch.Tensor, float]:
    """Map (1, d, *fixed.shape) fixed -> moving at full resolution, and the forward seconds."""
    m = coords.resize_image(torch.from_numpy(moving)[None, None], work)
    f = coords.resize_image(torch.from_numpy(fixed)[None, None], work)
    t0 = time.perf_counter()
    with torch.no_grad():
        phi = net(m, f)
    seconds = time.perf_counter() - t0
    return coords.resize_map(phi, fixed.shape), seconds


def half_grid(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Working grid at half resolution (the scale CARL trains at), sizes divisible by 4."""
    return tuple(max(4 * round(s / 8), 8) for s in shape)


def oasis_rows(nets: dict[str, torch.nn.Module], axis: int) -> list[dict]:
    mov = read_image(OASIS / "image_A_160x192x144.nii.gz")
    fix = read_image(OASIS / "image_B_160x192x144.nii.gz")
    # the label headers carry a slightly different spacing; the voxel grids match (data README)
    mov_seg = read_image(OASIS / "image_A_160x192x144_seg.nii.gz", labels=True).array.astype(np.int16)
    fix_seg = read_image(OASIS / "image_B_160x192x144_seg.nii.gz", labels=True).array.astype(np.int16)
    pad = max(SHIFTS)
    moving = pad_axis(normalise(mov.array.astype(np.float32)), axis, pad)
    fixed0 = pad_axis(normalise(fix.array.astype(np.float32)), axis, pad)
    mov_seg = torch.from_numpy(pad_axis(mov_seg, axis, pad).astype(np.float32))[None, None]
    fix_seg0 = pad_axis(fix_seg, axis, pad)
    work = half_grid(fixed0.shape)
    rows = []
    for shift in SHIFTS:
        fixed = np.roll(fixed0, shift, axis)
        fseg = np.roll(fix_seg0, shift, axis)
        row = {"data": "OASIS 3D", "shift": shift, "working_shape": list(work)}
        for name, net in nets.items():
            phi, sec = run_net(net, moving, fixed, work)
            warped = coords.sample(mov_seg, phi, mode="nearest")[0, 0].numpy().astype(np.int16)
            d = dice(warped, fseg, labels=[1, 2])
            row[name] = float(np.mean(list(d.values())))
            row[f"{name}_seconds"] = sec
        unregistered = mov_seg[0, 0].numpy().astype(np.int16)
        row["identity"] = float(np.mean(list(dice(unregistered, fseg, labels=[1, 2]).values())))
        rows.append(row)
        print(row, flush=True)
    return rows


def _histo(stain: str) -> tuple[np.ndarray, np.ndarray]:
    img = read_image(str(HISTO).format(stain) + ".jpg")
    lum = torch.from_numpy(img.luminance())[None, None]
    small = coords.resize_image(lum, tuple(s // HISTO_FACTOR for s in lum.shape[2:]))[0, 0].numpy()
    # inverted so the slide background is dark: CARL assumes zero outside the image
    arr = 1 - normalise(small)
    pts = np.genfromtxt(str(HISTO).format(stain) + ".csv", delimiter=",", skip_header=1)[:, 1:3]
    return arr.astype(np.float32), pts[:, ::-1] / HISTO_FACTOR  # (row, col) at the small scale


def histology_rows(nets: dict[str, torch.nn.Module], axis: int) -> list[dict]:
    moving, mov_pts = _histo(HISTO_MOVING)
    fixed0, fix_pts0 = _histo(HISTO_FIXED)
    shape = tuple(max(a, b) for a, b in zip(moving.shape, fixed0.shape))
    moving = np.pad(moving, [(0, s - n) for s, n in zip(shape, moving.shape)])
    fixed0 = np.pad(fixed0, [(0, s - n) for s, n in zip(shape, fixed0.shape)])
    pad = max(SHIFTS)
    moving, fixed0 = pad_axis(moving, axis, pad), pad_axis(fixed0, axis, pad)
    mov_pts = mov_pts + np.eye(2)[axis] * pad
    fix_pts0 = fix_pts0 + np.eye(2)[axis] * pad
    work = half_grid(fixed0.shape)
    rows = []
    for shift in SHIFTS:
        fixed = np.roll(fixed0, shift, axis)
        fix_pts = fix_pts0 + np.eye(2)[axis] * shift
        row = {"data": "histology 2D", "shift": shift, "working_shape": list(work)}
        for name, net in nets.items():
            phi, sec = run_net(net, moving, fixed, work)
            norm = torch.from_numpy(fix_pts / (np.asarray(fixed.shape) - 1)).float()
            mapped = coords.sample(phi, norm.T.reshape(1, 2, -1, 1))[0, :, :, 0].T.numpy()
            mapped_vox = mapped * (np.asarray(moving.shape) - 1)
            tre = np.linalg.norm(mapped_vox - mov_pts, axis=1) * HISTO_FACTOR  # original pixels
            row[name] = float(np.mean(tre))
            row[f"{name}_seconds"] = sec
        ident = np.linalg.norm(fix_pts - mov_pts, axis=1).mean() * HISTO_FACTOR
        row["identity"] = float(ident)
        rows.append(row)
        print(row, flush=True)
    return rows


def load(path: str, dim: int) -> tuple[torch.nn.Module, dict]:
    """``(net, card)`` of a CARL-family checkpoint: a shipped name or a file."""
    return load_net(weights.resolve(path, f"carl-{dim}d"), dim)


def networks(dim: int, carl: str, baseline: str, also: list[str], symmetrised: bool = False
             ) -> dict[str, torch.nn.Module]:
    """The compared networks by column label: CARL, the U-Net baseline, then ``LABEL=CHECKPOINT``s,
    then (``symmetrised``) CARL as the pipeline runs a net trained without GradICON (blocks.Symmetrised).
    The labels carry the training steps of each (from its card): the comparison is only fair at equal steps."""
    def labelled(name: str, path: str) -> tuple[str, torch.nn.Module]:
        net, card = load(path, dim)
        steps = card.get("steps", 0) + (card.get("init_from") or {}).get("steps", 0)
        return f"{name} ({steps} steps)", net

    pairs = [labelled("CARL", carl), labelled("U-Net baseline", baseline),
             *(labelled(*a.split("=", 1)) for a in also)]
    if symmetrised:
        name, net = pairs[0]
        pairs.append((f"{name} symmetrised", Symmetrised(net)))
    return dict(pairs)


def plot(rows3: list[dict], rows2: list[dict], names: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, rows, label in ((axes[0], rows3, "OASIS 3D: mean tissue Dice"),
                            (axes[1], rows2, "histology 2D: mean landmark TRE (px)")):
        if not rows:
            ax.set_visible(False)
            continue
        for name in (n for n in names if n in rows[0]):
            ax.plot([r["shift"] for r in rows], [r[name] for r in rows], "o-", label=name)
        if "identity" in rows[0]:
            ax.plot([r["shift"] for r in rows], [r["identity"] for r in rows], "k--", label="no registration")
        ax.set_xlabel("translation of the fixed image (voxels)" if "3D" in label
                      else f"translation of the fixed image (px at 1/{HISTO_FACTOR})")
        ax.set_title(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def table(rows: list[dict], names: list[str], metric: str) -> list[str]:
    cols = names + (["identity"] if rows and "identity" in rows[0] else [])
    header = [("no registration" if c == "identity" else c) for c in cols]
    lines = [f"| shift | {' | '.join(header)} | forward s, first column |", "|" + "---|" * (len(cols) + 2)]
    for r in rows:
        vals = " | ".join(f"{r[n]:.3f}" if metric == "Dice" else f"{r[n]:.1f}" for n in cols)
        lines.append(f"| {r['shift']} | {vals} | {r[names[0] + '_seconds']:.2f} |")
    return lines


def grid_sweep(net: torch.nn.Module, factors: tuple[float, ...] = (2.5, 2.0, 1.6)) -> list[dict]:
    """OASIS Dice and forward time of one network at several working grids (voxel size in mm):
    the network trained at 2 mm, run coarser or finer."""
    mov = read_image(OASIS / "image_A_160x192x144.nii.gz")
    fix = read_image(OASIS / "image_B_160x192x144.nii.gz")
    mov_seg = read_image(OASIS / "image_A_160x192x144_seg.nii.gz", labels=True).array.astype(np.float32)
    fix_seg = read_image(OASIS / "image_B_160x192x144_seg.nii.gz", labels=True).array.astype(np.int16)
    moving, fixed = normalise(mov.array.astype(np.float32)), normalise(fix.array.astype(np.float32))
    rows = []
    for f in factors:
        work = tuple(max(4 * round(s / f / 4), 8) for s in fixed.shape)
        phi, sec = run_net(net, moving, fixed, work)
        warped = coords.sample(torch.from_numpy(mov_seg)[None, None], phi, mode="nearest")[0, 0].numpy()
        d = dice(warped.astype(np.int16), fix_seg, labels=[1, 2])
        rows.append({"voxel_mm": f, "working_shape": list(work), "xi_tokens": int(np.prod(work) // 4 ** 3),
                     "dice": float(np.mean(list(d.values()))), "forward_s": sec})
        print(rows[-1], flush=True)
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks shift_experiment",
                                description=__doc__.splitlines()[0])
    p.add_argument("--carl-3d", default=str(NETS / "carl-3d-650.pt"))
    p.add_argument("--carl-2d", default="carl-2d")
    p.add_argument("--baseline-3d", default=str(NETS / "unet-3d-650.pt"))
    p.add_argument("--baseline-2d", default=str(NETS / "unet-2d.pt"))
    p.add_argument("--also-3d", nargs="*", default=[], metavar="LABEL=CHECKPOINT",
                   help="more CARL-family networks as extra columns (e.g. the shipped carl-3d)")
    p.add_argument("--also-2d", nargs="*", default=[], metavar="LABEL=CHECKPOINT")
    p.add_argument("--symmetrised-2d", action="store_true",
                   help="also: the 2D CARL symmetrised, as the pipeline runs carl-2d")
    p.add_argument("--axis-3d", type=int, default=2, help="array axis to shift along (2 = x, left-right)")
    p.add_argument("--axis-2d", type=int, default=1, help="array axis to shift along (1 = columns)")
    p.add_argument("--skip-2d", action="store_true")
    p.add_argument("--skip-3d", action="store_true")
    p.add_argument("--grid-sweep", action="store_true", help="also: the shipped carl-3d at several working grids")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="run folder (default: a new benchmarks/results/<date>-shift-experiment/)")
    args = p.parse_args(argv)
    record = provenance("shift_experiment", argv)
    torch.set_num_threads(args.threads)
    nets3 = {} if args.skip_3d else networks(3, args.carl_3d, args.baseline_3d, args.also_3d)
    nets2 = {} if args.skip_2d else networks(2, args.carl_2d, args.baseline_2d, args.also_2d, args.symmetrised_2d)
    rows3 = oasis_rows(nets3, args.axis_3d) if nets3 else []
    rows2 = histology_rows(nets2, args.axis_2d) if nets2 else []
    sweep = grid_sweep(load("carl-3d", 3)[0]) if args.grid_sweep else []
    out = args.out or new_run_dir("shift-experiment")
    out.mkdir(parents=True, exist_ok=True)
    plot(rows3, rows2, list({**nets3, **nets2}), out / "plot_shift.png")
    lines = [f"Fixed image translated along array axis {args.axis_3d} (3D) / "
             f"{args.axis_2d} (2D); both images zero-padded by {max(SHIFTS)}."]
    if rows3:
        lines += ["", "## OASIS pair, mean tissue Dice (labels 1, 2)", "", *table(rows3, list(nets3), "Dice")]
        for name in nets3:
            drop = rows3[0][name] - min(r[name] for r in rows3)
            lines.append(f"\n{name}: largest drop from the unshifted Dice {100 * drop:.1f} points")
    if rows2:
        lines += ["", f"## Histology {HISTO_MOVING} -> {HISTO_FIXED}, mean landmark TRE (original px)", "",
                  *table(rows2, list(nets2), "TRE")]
        for name in nets2:
            rise = max(r[name] for r in rows2) - rows2[0][name]
            lines.append(f"\n{name}: largest rise from the unshifted TRE {rise:.1f} px")
    if sweep:
        lines += ["", "## Shipped carl-3d at other working grids (OASIS, unshifted, no padding)", "",
                  "| voxel mm | working shape | Xi tokens | Dice | forward s |", "|---|---|---|---|---|"]
        lines += [f"| {r['voxel_mm']} | {r['working_shape']} | {r['xi_tokens']} | {r['dice']:.3f} | "
                  f"{r['forward_s']:.2f} |" for r in sweep]
    print(write_run(out, record, {"oasis": rows3, "histology": rows2, "grid_sweep": sweep}, "\n".join(lines),
                    title="Shift experiment"))


if __name__ == "__main__":
    main()
