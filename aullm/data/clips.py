"""Frames as the model sees them: which frames of a clip, and a decode-once cache.

Every cell of a grid reads the same few thousand JPEGs of its dataset, and a packed
Slurm task trains several cells: decoding them per cell (or per epoch) would cost more
than training. `ClipStore` decodes each frame once (grayscale, 64x64) and keeps the
result in one .npz per dataset in a cache folder, keyed by what was decoded (the frame
paths with their sizes and modification times, and the preprocessing), so a changed or
re-cropped dataset gets a fresh cache and an unchanged one is never decoded again.

Cache writes are atomic (temp file + rename): array tasks that start together may each
decode once, but none ever reads a half-written cache. To avoid even that, warm the
cache once before fan-out (`ClipStore.load(samples, cache_dir)` on the submit host).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from aullm.constants import FRAME_SIZE, NUM_FRAMES
from aullm.data.samples import Sample
from aullm.errors import UserInputError

# Bump when the preprocessing changes: part of the cache key.
CACHE_FORMAT = 1
_PREPROCESS = f"v{CACHE_FORMAT}:L:{FRAME_SIZE}x{FRAME_SIZE}:bilinear"

# How many frames this process has decoded from image files. Tests read it to prove that a
# warm cache decodes nothing; it is not used for anything else.
DECODE_COUNT = 0
_decode_lock = threading.Lock()


def test_frame_indices(n: int, T: int = NUM_FRAMES) -> np.ndarray:
    """Frames for evaluation: round(linspace(0, n-1, T)), onset and offset included."""
    if n < 1:
        raise ValueError(f"a clip needs at least one frame, got n={n}")
    return np.round(np.linspace(0, n - 1, T)).astype(np.int64)


# Mark as not-a-test for pytest, which collects module-level `test_*` functions it imports.
test_frame_indices.__test__ = False  # type: ignore[attr-defined]


def train_frame_indices(n: int, rng: np.random.Generator, T: int = NUM_FRAMES) -> np.ndarray:
    """Frames for training, as the authors' script samples them.

    Start at the onset (index 0), end at a random index in [6, n-2] (both ends included),
    T evenly spaced in between: a random temporal crop that always contains the onset.
    Clips shorter than 8 frames have no such end: they get the test frames instead, the
    only choice that keeps the onset and stays inside the clip.
    """
    if n < 1:
        raise ValueError(f"a clip needs at least one frame, got n={n}")
    low, high = 6, n - 2
    if high < low:
        return test_frame_indices(n, T)
    end = int(rng.integers(low, high + 1))
    return np.round(np.linspace(0, end, T)).astype(np.int64)


def decode_frame(path: str) -> np.ndarray:
    """One frame as uint8 (64, 64): grayscale, bilinear resize (PIL)."""
    global DECODE_COUNT
    try:
        with Image.open(path) as image:
            gray = image.convert("L").resize((FRAME_SIZE, FRAME_SIZE), Image.Resampling.BILINEAR)
    except FileNotFoundError:
        raise UserInputError(f"frame {path!r} not found (the dataset changed after it was read)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        # PIL reports empty, truncated and non-image files as OSError (UnidentifiedImageError).
        raise UserInputError(f"frame {path!r} is not a readable image ({exc})") from exc
    with _decode_lock:
        DECODE_COUNT += 1
    return np.asarray(gray, dtype=np.uint8)


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))  # what Slurm's cgroup gives us, not the node's total
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


class ClipStore:
    """All frames of a set of clips, uint8 (n, 64, 64) each, keyed by `Sample.key`."""

    def __init__(self, clips: dict[str, np.ndarray], cache_files: Sequence[Path] = (), decoded: int = 0) -> None:
        self._clips = clips
        self.cache_files: tuple[Path, ...] = tuple(cache_files)
        self.decoded = decoded  # frames decoded while building this store (0 = all from cache)

    @classmethod
    def load(
        cls,
        samples: Iterable[Sample],
        cache_dir: str | os.PathLike[str] | None,
        *,
        workers: int | None = None,
    ) -> ClipStore:
        """Frames of `samples`, from `cache_dir` when it holds them, decoded (and cached) otherwise.

        One cache file per dataset among `samples`. `cache_dir=None` decodes without
        caching. `workers` threads decode in parallel (PIL releases the GIL while decoding).
        """
        by_dataset: dict[str, dict[str, Sample]] = {}
        for sample in samples:
            by_dataset.setdefault(sample.dataset, {})[sample.key] = sample
        clips: dict[str, np.ndarray] = {}
        cache_files: list[Path] = []
        decoded = 0
        for dataset, keyed in sorted(by_dataset.items()):
            group = [keyed[k] for k in sorted(keyed)]
            if cache_dir is None:
                frames, starts = _decode_group(group, workers)
                decoded += len(frames)
            else:
                path = _cache_path(Path(cache_dir), dataset, group)
                loaded = _read_cache(path, group)
                if loaded is None:
                    frames, starts = _decode_group(group, workers)
                    decoded += len(frames)
                    _write_cache(path, group, frames, starts)
                else:
                    frames, starts = loaded
                cache_files.append(path)
            frames.flags.writeable = False  # clips are shared views: a stray in-place op must fail
            for i, sample in enumerate(group):
                clips[sample.key] = frames[starts[i] : starts[i + 1]]
        return cls(clips, cache_files, decoded)

    @classmethod
    def merged(cls, stores: Sequence[ClipStore]) -> ClipStore:
        """One store over the clips of several (a cross-domain cell reads both datasets)."""
        clips: dict[str, np.ndarray] = {}
        for store in stores:
            clips.update(store._clips)
        return cls(clips, tuple(f for store in stores for f in store.cache_files), decoded=0)

    def __len__(self) -> int:
        return len(self._clips)

    def __contains__(self, sample: object) -> bool:
        return isinstance(sample, Sample) and sample.key in self._clips

    def frames(self, sample: Sample) -> np.ndarray:
        """Every frame of the clip, onset first: uint8 (n, 64, 64). A read-only view."""
        try:
            return self._clips[sample.key]
        except KeyError:
            raise KeyError(f"clip {sample.key!r} was not loaded into this ClipStore") from None

    def batch(self, samples: Sequence[Sample], indices_fn: Callable[[int], np.ndarray]) -> np.ndarray:
        """float32 (B, T, 64, 64) with raw 0..255 values (the released script does not normalise).

        `indices_fn(n)` picks the T frames of an n-frame clip, e.g. `test_frame_indices` or
        `lambda n: train_frame_indices(n, rng)`.
        """
        picked = []
        for sample in samples:
            clip = self.frames(sample)
            picked.append(clip[np.asarray(indices_fn(len(clip)))])
        lengths = {len(p) for p in picked}
        if len(lengths) > 1:
            raise ValueError(f"indices_fn returned different frame counts across clips: {sorted(lengths)}")
        if not picked:
            return np.zeros((0, NUM_FRAMES, FRAME_SIZE, FRAME_SIZE), dtype=np.float32)
        return np.stack(picked).astype(np.float32)


# ---------------------------------------------------------------- decoding and the cache


def _decode_group(group: Sequence[Sample], workers: int | None) -> tuple[np.ndarray, np.ndarray]:
    paths = [p for sample in group for p in sample.frame_paths]
    starts = np.zeros(len(group) + 1, dtype=np.int64)
    np.cumsum([len(s.frame_paths) for s in group], out=starts[1:])
    frames = np.empty((len(paths), FRAME_SIZE, FRAME_SIZE), dtype=np.uint8)
    n_workers = workers if workers is not None else _default_workers()
    if n_workers <= 1:
        for i, path in enumerate(paths):
            frames[i] = decode_frame(path)
    else:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            for i, frame in enumerate(pool.map(decode_frame, paths)):
                frames[i] = frame
    return frames, starts


def _cache_path(cache_dir: Path, dataset: str, group: Sequence[Sample]) -> Path:
    """Cache file named by a hash of everything the decoded arrays depend on."""
    digest = hashlib.sha256()
    digest.update(f"{_PREPROCESS}\n{dataset}\n".encode())
    for sample in group:
        digest.update(f"{sample.key}\n".encode())
        for path in sample.frame_paths:
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                raise UserInputError(f"frame {path!r} not found (the dataset changed after it was read)") from None
            # The resolved path carries the root and the frames folder.
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return cache_dir.expanduser() / f"{dataset}-{digest.hexdigest()[:24]}.npz"


def _read_cache(path: Path, group: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays, or None when there is no usable cache (it is then rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = [str(k) for k in data["keys"]]
            starts = data["starts"]
            frames = data["frames"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # a damaged cache is only a cache: decode again and overwrite it
    expected = [s.key for s in group]
    lengths = np.diff(starts).tolist() if len(starts) == len(group) + 1 else None
    if keys != expected or lengths != [len(s.frame_paths) for s in group]:
        return None
    if frames.shape != (int(starts[-1]), FRAME_SIZE, FRAME_SIZE) or frames.dtype != np.uint8:
        return None
    return frames, starts


def _write_cache(path: Path, group: Sequence[Sample], frames: np.ndarray, starts: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"cannot create the frame cache folder {str(path.parent)!r} ({exc})") from exc
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    meta = json.dumps({"format": CACHE_FORMAT, "preprocess": _PREPROCESS, "clips": len(group)})
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, frames=frames, starts=starts, keys=np.array([s.key for s in group]), meta=np.array(meta))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise UserInputError(f"cannot write the frame cache {str(path)!r} ({exc})") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
