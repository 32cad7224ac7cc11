"""Fill a folder with the recogniser example's recovery and held-out word images.

Usage: ``python examples/recogniser_data.py DIR [--recover 300] [--heldout 60] [--seed 0] [--force]``

Writes (nothing is downloaded: the words come from the Python standard library's own source,
the font is matplotlib's DejaVu Sans):

- the vocabulary: the distinct words of 2-12 letters in a fixed list of standard-library
  modules (:data:`SOURCES`), split by the SHA-1 of their lower-case form, so a word and its
  capitalised form always fall on the same side: one in five is a held-out word. ``--recover``
  and ``--heldout`` words are drawn from each side (seeded);
- ``DIR/recover/`` and ``DIR/heldout/``: every drawn word rendered in black on white at each
  size of :data:`SIZES` px (``recogniser.render``), as PNG files named ``NNNN_SIZE.png``;
- ``DIR/manifest.json``: per set, each file's word and size (the ground truth, and the proof
  that the two vocabularies are disjoint).

Each folder is written into a temporary folder next to it and renamed into place, so a failed
run leaves nothing half-written; an existing ``DIR/recover`` or ``DIR/heldout`` is an error
unless ``--force`` is given (then it is replaced).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

SOURCES = ("argparse.py", "collections/__init__.py", "json/decoder.py", "logging/__init__.py", "pathlib.py",
           "subprocess.py", "textwrap.py", "threading.py", "typing.py", "zipfile.py")
SIZES = (24, 40)  # font sizes in px (the renders are resized to height 64 by prepare)
WORD = re.compile(r"\b[A-Za-z]{2,12}\b")
HELDOUT_BUCKETS = 5  # one word in five (by hash) is on the held-out side


def vocabulary() -> tuple[list[str], list[str]]:
    """The recovery-side and held-out-side words (sorted), disjoint by lower-case form."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    words = set()
    for name in SOURCES:
        path = stdlib / name
        if path.is_file():
            words.update(WORD.findall(path.read_text(encoding="utf-8", errors="replace")))
    held = {w for w in words if int(hashlib.sha1(w.lower().encode()).hexdigest(), 16) % HELDOUT_BUCKETS == 0}
    return sorted(words - held), sorted(held)


def draw(words: list[str], count: int, seed: int) -> list[str]:
    """``count`` of ``words`` drawn without replacement (seeded). Raises ``ValueError`` when
    there are fewer."""
    if count > len(words):
        raise ValueError(f"{count} words asked for, the vocabulary side holds {len(words)}")
    rng = np.random.default_rng(seed)
    return [words[i] for i in sorted(rng.choice(len(words), size=count, replace=False))]


def write_set(folder: Path, words: list[str]) -> list[dict]:
    """Render ``words`` at every size into ``folder`` (which must not exist); its manifest rows."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from recogniser import render

    folder.mkdir()
    rows = []
    for index, word in enumerate(words):
        for size in SIZES:
            name = f"{index:04d}_{size}.png"
            render(word, size).save(folder / name)
            rows.append({"file": name, "word": word, "size": size})
    return rows


def build(folder: Path, recover: int, heldout: int, seed: int, force: bool = False) -> dict[str, list[dict]]:
    """Write ``folder/recover`` and ``folder/heldout`` and ``folder/manifest.json``; return the
    manifest. Raises ``FileExistsError`` for an existing set unless ``force``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("recover", "heldout"):
        if (folder / name).exists() and not force:
            raise FileExistsError(f"{folder / name} exists (use --force to replace it)")
    recover_side, held_side = vocabulary()
    sets = {"recover": draw(recover_side, recover, seed), "heldout": draw(held_side, heldout, seed + 1)}
    manifest = {}
    for name, words in sets.items():
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            staged = Path(scratch) / name
            manifest[name] = write_set(staged, words)
            if (folder / name).exists():
                shutil.rmtree(folder / name)
            staged.rename(folder / name)
    staged_manifest = folder / "manifest.json.tmp"
    staged_manifest.write_text(json.dumps(manifest, indent=1))
    staged_manifest.replace(folder / "manifest.json")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--recover", type=int, default=300, help="recovery words (default 300)")
    parser.add_argument("--heldout", type=int, default=60, help="held-out words (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace existing sets")
    args = parser.parse_args(argv)
    try:
        manifest = build(args.folder, args.recover, args.heldout, args.seed, args.force)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.folder}: {len(manifest['recover'])} recovery and {len(manifest['heldout'])} held-out images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
