"""Fill a folder with the CRAFT example's recovery and held-out images from scikit-image.

Usage: ``python examples/craft_data.py DIR [--crops 32] [--seed 0] [--heldout extended|classic]``

Writes (nothing is downloaded: every image ships with scikit-image):

- ``DIR/recover/``: the photographs other than ``page`` and ``text`` (astronaut, brick,
  camera, chelsea, clock, coffee, coins, grass, gravel, hubble_deep_field,
  immunohistochemistry, moon, retina, rocket), and ``--crops`` random crops of the upper
  half of ``page`` (rows 0-94 of 191; widths 96-384 px, heights 32-95 px), as PNG files;
- ``DIR/heldout/``: the lower half of ``page`` (rows 95-190) and the whole of ``text`` (the
  two images of issue 14's acceptance), and, unless ``--heldout classic``, seven more that
  recovery never sees (issue 27: 2 images and 23 dense boxes judge a compile too coarsely):
  the two halves of ``page``'s lower half and of ``text`` enlarged (x2 and x1.5: other
  scales of held-out text), and three renders of English words in OpenCV's Hershey fonts
  (dark on light, light on dark, captions on the left view of ``stereo_motorcycle``), a
  font, words and photograph recovery never draws (its augmentation writes random letters
  in Pillow's font);
- ``DIR/manifest.json``: where every file came from (image name, crop box, scale, words), so
  the two sets can be checked to be disjoint (no held-out pixel of ``page`` is in a recovery
  crop).

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
HELDOUT_WORDS = ("harbour", "lantern", "quiet", "museum", "orbit", "velvet", "canyon", "pepper", "signal",
                 "window", "marble", "thunder", "garden", "ticket", "silver", "planet", "meadow", "copper",
                 "jigsaw", "voyage", "falcon", "ribbon", "summit", "kettle", "bridge", "anchor", "walnut")
CLASSIC_HELDOUT = ("page_lower", "text")  # issue 14's two held-out images, kept under their names


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


def enlarged(image: np.ndarray, scale: float) -> np.ndarray:
    """``image`` resized by ``scale`` (bicubic)."""
    import cv2

    height, width = image.shape[:2]
    return cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_CUBIC)


def write_lines(picture: np.ndarray, words: list[str], font: int, scale: float, thickness: int,
                ink: tuple[int, int, int], rows: tuple[int, int],
                backing: tuple[int, int, int] | None = None) -> list[str]:
    """Draw ``words`` into ``picture`` (H x W x 3 uint8, in place) in lines between ``rows``
    (top, bottom), left to right, as many as fit; each word on a filled ``backing`` box when
    given. Returns the words drawn."""
    import cv2

    width = picture.shape[1]
    top, bottom = rows
    (_, line_h), base = cv2.getTextSize("Hg", font, scale, thickness)
    x, y, drawn = 8, top + line_h, []
    for word in words:
        (word_w, _), _ = cv2.getTextSize(word, font, scale, thickness)
        if x + word_w > width - 8:
            x, y = 8, y + line_h + base + int(0.6 * line_h)
        if y + base > bottom - 4:
            break
        if backing is not None:
            cv2.rectangle(picture, (x - 4, y - line_h - 4), (x + word_w + 4, y + base + 2), backing, -1)
        cv2.putText(picture, word, (x, y), font, scale, ink, thickness, cv2.LINE_AA)
        drawn.append(word)
        x += word_w + int(1.2 * line_h)
    return drawn


def renders(size: tuple[int, int] = (256, 384)) -> list[tuple[str, np.ndarray, list[str]]]:
    """The held-out renders of :data:`HELDOUT_WORDS`: (name, H x W x 3 uint8, words drawn)."""
    import cv2
    from skimage import data

    words = list(HELDOUT_WORDS)
    light = np.full((*size, 3), 236, np.uint8)
    drawn = write_lines(light, words, cv2.FONT_HERSHEY_SIMPLEX, 0.9, 2, (25, 25, 25), (4, 140))
    drawn += write_lines(light, words[::-1], cv2.FONT_HERSHEY_COMPLEX, 0.6, 1, (40, 30, 90), (146, size[0]))
    dark = np.full((*size, 3), (40, 34, 28), np.uint8)
    drawn_dark = write_lines(dark, words[5:] + words[:5], cv2.FONT_HERSHEY_DUPLEX, 1.2, 2, (235, 235, 220), (6, 170))
    drawn_dark += write_lines(dark, words[::2], cv2.FONT_HERSHEY_TRIPLEX, 0.7, 1, (200, 230, 240), (176, size[0]))
    left_view = data.stereo_motorcycle()[0]
    photo = np.ascontiguousarray(enlarged(left_view, size[0] / left_view.shape[0])[:, :size[1]])
    drawn_photo = write_lines(photo, words[10:22], cv2.FONT_HERSHEY_SIMPLEX, 0.8, 2, (250, 250, 250), (10, size[0]),
                              backing=(20, 20, 20))
    return [("render_light", light, drawn), ("render_dark", dark, drawn_dark),
            ("render_motorcycle", photo, drawn_photo)]


def build(folder: Path, crops: int, seed: int, heldout: str = "extended") -> dict[str, list[dict]]:
    """Write the two sets into ``folder/recover`` and ``folder/heldout`` (which must not
    exist); return the manifest. ``heldout`` ``classic`` writes only :data:`CLASSIC_HELDOUT`."""
    from PIL import Image
    from skimage import data

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from craft import as_rgb

    manifest: dict[str, list[dict]] = {"recover": [], "heldout": []}
    (folder / "recover").mkdir()
    (folder / "heldout").mkdir()

    def save(subset: str, name: str, image: np.ndarray, source: str, box: tuple[int, int, int, int] | None,
             **extra: object) -> None:
        Image.fromarray(as_rgb(image)).save(folder / subset / f"{name}.png")
        manifest[subset].append({"file": f"{name}.png", "source": source,
                                 "box_top_left_height_width": list(box) if box else None, **extra})

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
    if heldout == "classic":
        return manifest
    lower_height, half_width = page.shape[0] - PAGE_SPLIT_ROW, page.shape[1] // 2
    for side, left in (("left", 0), ("right", half_width)):
        window = page[PAGE_SPLIT_ROW:, left:left + half_width]
        save("heldout", f"page_lower_{side}_x2", enlarged(window, 2.0), "page",
             (PAGE_SPLIT_ROW, left, lower_height, half_width), scale=2.0)
    text_half = text.shape[1] // 2
    for side, left in (("left", 0), ("right", text_half)):
        save("heldout", f"text_{side}_x1.5", enlarged(text[:, left:left + text_half], 1.5), "text",
             (0, left, text.shape[0], text_half), scale=1.5)
    for name, picture, words in renders():
        save("heldout", name, picture, "render (OpenCV Hershey fonts)", None, words=words)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--crops", type=int, default=32, help="crops of the upper half of page")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace existing recover/heldout folders")
    parser.add_argument("--heldout", choices=("extended", "classic"), default="extended",
                        help="classic: only issue 14's two held-out images (page_lower, text)")
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
        manifest = build(staging, args.crops, args.seed, args.heldout)
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
