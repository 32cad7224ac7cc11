"""Fill a folder with the CRAFT example's recovery and held-out images from scikit-image.

Usage: ``python examples/craft_data.py DIR [--crops 32] [--seed 0]``

Writes (nothing is downloaded: every image ships with scikit-image):

- ``DIR/recover/``: the photographs other than ``page`` and ``text`` (astronaut, brick,
  camera, chelsea, clock, coffee, coins, grass, gravel, hubble_deep_field,
  immunohistochemistry, moon, retina, rocket), and ``--crops`` random crops of the upper
  half of ``page`` (rows 0-94 of 191; widths 96-384 px, heights 32-95 px), as PNG files;
- ``DIR/heldout/``: the lower half of ``page`` (rows 95-190) and the whole of ``text``;
- ``DIR/manifest.json``: where every file came from (image name and crop box), so the two
  sets can be checked to be disjoint (no held-out pixel of ``page`` is in a recovery crop).

The text-bearing recovery data is small on purpose (the issue's acceptance set-up): augment
it when training (``bench/craft_prototype.py`` does: scales, crops, photometric).
Each folder is written into a temporary folder next to it and renamed into place, so a
failed run leaves nothing half-written; an existing ``DIR/recover`` or ``DIR/heldout`` is an
error unless ``--force`` is given (then it is replaced).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

PHOTOGRAPHS = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
               "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket")
PAGE_SPLIT_ROW = 95  # rows [0, 95) of page are the upper half (recovery), [95, 191) the lower (held out)


def recovery_crops(page: np.ndarray, count: int, seed: int) -> list[tuple[int, int, int, int]]:
    """``count`` crop boxes (top, left, height, width) inside the upper half of ``page``."""
    rng = np.random.default_rng(seed)
    width_max = page.shape[1]
    boxes = []
    for _ in range(count):
        height = int(rng.integers(32, PAGE_SPLIT_ROW + 1))
        width = int(rng.integers(96, width_max + 1))
        top = int(rng.integers(0, PAGE_SPLIT_ROW - height + 1))
        left = int(rng.integers(0, width_max - width + 1))
        boxes.append((top, left, height, width))
    return boxes


def build(folder: Path, crops: int, seed: int) -> dict[str, list[dict]]:
    """Write the two sets into ``folder/recover`` and ``folder/heldout`` (which must not
    exist); return the manifest."""
    from PIL import Image
    from skimage import data

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from craft import as_rgb

    manifest: dict[str, list[dict]] = {"recover": [], "heldout": []}
    (folder / "recover").mkdir()
    (folder / "heldout").mkdir()

    def save(subset: str, name: str, image: np.ndarray, source: str, box: tuple[int, int, int, int] | None) -> None:
        Image.fromarray(as_rgb(image)).save(folder / subset / f"{name}.png")
        manifest[subset].append({"file": f"{name}.png", "source": source,
                                 "box_top_left_height_width": list(box) if box else None})

    for name in PHOTOGRAPHS:
        save("recover", name, getattr(data, name)(), name, None)
    page = data.page()
    for k, (top, left, height, width) in enumerate(recovery_crops(page, crops, seed)):
        save("recover", f"page_upper_crop{k:02d}", page[top:top + height, left:left + width], "page",
             (top, left, height, width))
    save("heldout", "page_lower", page[PAGE_SPLIT_ROW:], "page",
         (PAGE_SPLIT_ROW, 0, page.shape[0] - PAGE_SPLIT_ROW, page.shape[1]))
    text = data.text()
    save("heldout", "text", text, "text", (0, 0, *text.shape[:2]))
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--crops", type=int, default=32, help="crops of the upper half of page")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace existing recover/heldout folders")
    args = parser.parse_args(argv)
    if args.crops < 0:
        parser.error("--crops must be >= 0")
    args.dir.mkdir(parents=True, exist_ok=True)
    finals = [args.dir / "recover", args.dir / "heldout", args.dir / "manifest.json"]
    existing = [p for p in finals if p.exists()]
    if existing and not args.force:
        parser.error(f"{existing[0]} exists (use --force to replace it)")
    staging = Path(tempfile.mkdtemp(dir=args.dir, prefix=".craft-data-"))
    try:
        manifest = build(staging, args.crops, args.seed)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        for final in finals:
            if final.is_dir():
                shutil.rmtree(final)
            elif final.exists():
                final.unlink()
            (staging / final.name).replace(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {len(manifest['recover'])} recovery images to {finals[0]} and "
          f"{len(manifest['heldout'])} held-out images to {finals[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
