"""One peer as a whole command, for the end-to-end benchmark (:mod:`benchmarks.e2e`).

    python -m benchmarks.peer_cli ants_synonly MOVING FIXED OUTDIR [--photo SHRINK]

Reads the two images as the harness does, registers with the harness's runner (the same settings:
``benchmarks.peers.RUNNERS``, its warm-up included, which sets elastix's threads), and writes into
OUTDIR what ``napari-register register`` writes of the registration: ``warped.nii.gz`` (linear),
``displacement.nii.gz`` (ITK displacement field on the fixed grid, float32, compressed, as ours)
and ``metrics.json`` (``seconds``: the registration alone). Our command also writes a Jacobian
map and a QA figure; the peers' commands do not.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.peer_cli", description=__doc__.splitlines()[0])
    ap.add_argument("peer", help="a runner of benchmarks.peers.RUNNERS, e.g. ants_synonly")
    ap.add_argument("moving", type=Path)
    ap.add_argument("fixed", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--photo", type=int, metavar="SHRINK",
                    help="read both as photos (luminance, block mean SHRINK), as the harness's 2D tasks do")
    args = ap.parse_args(argv)

    from benchmarks import peers  # first: it sets the thread count before ITK loads

    import SimpleITK as sitk

    from benchmarks.tasks import Case, Pair, read_photo

    def read(path: Path) -> sitk.Image:
        return read_photo(path, args.photo) if args.photo else sitk.ReadImage(str(path), sitk.sitkFloat32)

    peer = peers.RUNNERS[args.peer]
    if peer.warm is not None:
        peer.warm()
    moving, fixed = read(args.moving), read(args.fixed)
    case = Case("cli", args.peer, fixed.GetDimension(), False, moving=args.moving, fixed=args.fixed)
    t0 = time.perf_counter()
    tx = peer.run(Pair(case, moving, fixed))
    seconds = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0), str(args.out / "warped.nii.gz"),
                    useCompression=True)
    field = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat32, fixed.GetSize(), fixed.GetOrigin(),
                                              fixed.GetSpacing(), fixed.GetDirection())
    sitk.WriteImage(field, str(args.out / "displacement.nii.gz"), useCompression=True)
    (args.out / "metrics.json").write_text(json.dumps({"method": args.peer, "seconds": round(seconds, 3),
                                                       "device": "cpu"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
