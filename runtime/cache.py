"""The on-disk latency cache: measured points, reference levels and whole-model timings, keyed by the
target's fingerprint, so a second profile on the same target times nothing."""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..targets.files import atomic_write_text, locked
from .table import ProfileError

__all__ = ["CACHE_VERSION", "LatencyCache", "default_cache_dir", "key_digest", "point_key"]

# Version 2: points and model timings are load-robust (run-queue waiting excluded, inlier mean);
# version-1 files (wall-clock medians) are not mixed with them.
# Version 3: the waiting excluded is the mean run-queue delay of the threads that ran during a call
# (``ThreadsClock``), no longer the calling thread's alone.
# Version 4: every chunk of points and the calibration models are scaled to the reference
# layer's level (``measure.Reference``), which the cache keeps.
CACHE_VERSION = 4


def default_cache_dir() -> Path:
    """``$SPRUCE_CACHE`` or ``~/.cache/spruce/latency``."""
    env = os.environ.get("SPRUCE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "spruce" / "latency"


def key_digest(value: Any) -> str:
    """20 hex digits of the sha256 of ``value`` as sorted JSON: the cache's folder and file names."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:20]


class LatencyCache:
    """Measured points on disk: one JSON file per (target fingerprint, signature) under
    ``<root>/<fingerprint digest>/``, each holding its full fingerprint and signature, so a
    file is only ever used for exactly the fingerprint it was measured with."""

    def __init__(self, root: Path | None, fingerprint: Mapping[str, str]):
        self.fingerprint = dict(fingerprint)
        self.folder = None if root is None else Path(root) / key_digest(self.fingerprint)

    def _path(self, kind: str, key: str) -> Path:
        return self.folder / f"{kind}-{key_digest(key)}.json"

    def check(self) -> None:
        """Raise :class:`ProfileError` naming the cache folder when it cannot be a folder (a file
        stands at it or above it, or it cannot be created): before anything is measured."""
        if self.folder is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            source = " ($SPRUCE_CACHE)" if os.environ.get("SPRUCE_CACHE") else ""
            raise ProfileError(f"the latency cache folder {self.folder.parent}{source} cannot be used: "
                               f"{exc.strerror or exc}; point SPRUCE_CACHE at a folder, or pass "
                               f"use_cache=False") from exc

    def read(self, kind: str, key: str) -> dict[str, float]:
        """The valid cached values of ``(kind, key)``. A file or entry that is not what spruce
        writes (not JSON, not a mapping, a value that is not a finite non-negative number) is
        ignored with a warning naming the file, so its points are measured again."""
        if self.folder is None:
            return {}
        path = self._path(kind, key)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            warnings.warn(f"ignoring unreadable latency cache file {path}", stacklevel=3)
            return {}
        if not isinstance(document, dict):
            warnings.warn(f"ignoring latency cache file {path}: not a JSON object", stacklevel=3)
            return {}
        if (document.get("version") != CACHE_VERSION or document.get("fingerprint") != self.fingerprint
                or document.get("key") != key):
            return {}  # another fingerprint or key (a digest collision): never used
        values = document.get("values")
        if not isinstance(values, dict):
            warnings.warn(f"ignoring latency cache file {path}: its values are not a mapping", stacklevel=3)
            return {}
        valid = {str(k): float(v) for k, v in values.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0}
        if len(valid) != len(values):
            bad = sorted(str(k) for k in values if str(k) not in valid)
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            warnings.warn(f"ignoring {len(bad)} latency cache entr{'y' if len(bad) == 1 else 'ies'} of {path} "
                          f"that {'is' if len(bad) == 1 else 'are'} not a finite non-negative number ({shown}): "
                          f"measuring again", stacklevel=3)
        return valid

    def write(self, kind: str, key: str, values: Mapping[str, float]) -> None:
        """Merge ``values`` into the file of ``(kind, key)`` under a lock, so concurrent profiles of
        one target keep each other's points; the file is replaced atomically."""
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(kind, key)
        with locked(path), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read() already warned about what it drops
            merged = {**self.read(kind, key), **values}
            document = {"version": CACHE_VERSION, "fingerprint": self.fingerprint, "key": key, "values": merged}
            atomic_write_text(path, json.dumps(document, sort_keys=True) + "\n")


def point_key(active_in: int, active_out: int) -> str:
    """A measured point's key in a cache file, ``"in,out"``."""
    return f"{active_in},{active_out}"
