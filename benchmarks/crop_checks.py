"""How far real crops are from the runtime's crop checks (batchwbc/engine/crop_checks.py).

Reads every image header below a data folder (shortest side, side ratio), then the channel
difference of a random sample of crops as the runtime sees them (model input, 144 px) and of
greyscale copies of the first 100 of them saved as colour JPEG (quality 85). The bounds in
engine/crop_checks.py must lie well outside what real crops show:

    python benchmarks/crop_checks.py --data ../shared/data --sample 300
"""
from __future__ import annotations

import argparse
import io
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchwbc.engine import crop_checks  # noqa: E402
from batchwbc.engine.preprocess import is_image_name, prepare_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--sample", type=int, default=300)
    ap.add_argument("--size", type=int, default=144, help="model input edge (the bundled model's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from PIL import Image

    candidates = sorted(str(p) for p in args.data.rglob("*")
                        if p.is_file() and is_image_name(p.name) and not p.name.startswith("."))
    files, sides, ratios = [], [], []
    for f in candidates:
        try:
            with Image.open(f) as im:
                w, h = im.size
        except OSError:  # a damaged file in a public download: not a crop either way
            continue
        files.append(f)
        sides.append(min(w, h))
        ratios.append(max(w, h) / min(w, h))
    print(f"{len(files)} crops: shortest side {min(sides)} px (bound {crop_checks.MIN_SIDE}), "
          f"largest side ratio {max(ratios):.2f} (bound {crop_checks.MAX_ASPECT:g})")

    random.seed(args.seed)
    sample = random.sample(files, min(args.sample, len(files)))
    colour = [crop_checks.channel_difference(prepare_bytes(Path(f).read_bytes(), args.size)) for f in sample]
    grey = []
    for f in sample[:100]:
        buf = io.BytesIO()
        Image.open(f).convert("L").convert("RGB").save(buf, "JPEG", quality=85)
        grey.append(crop_checks.channel_difference(prepare_bytes(buf.getvalue(), args.size)))
    print(f"channel difference (mean |R-G|+|G-B|, bound {crop_checks.GREY_MAX_DIFF:g}): {len(colour)} colour crops "
          f"min {min(colour):.1f}, 1st percentile {np.percentile(colour, 1):.1f}, median {np.median(colour):.1f}; "
          f"{len(grey)} greyscale copies max {max(grey):.2f}")


if __name__ == "__main__":
    main()
