"""Frame selection and the decode-once frame cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aullm.data import ClipStore, Sample, read_dataset, test_frame_indices, train_frame_indices, write_synthetic
from aullm.data import clips as clips_module
from aullm.errors import UserInputError

# ---------------------------------------------------------------- which frames


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (6, [0, 1, 2, 3, 4, 5]),
        (11, [0, 2, 4, 6, 8, 10]),
        (30, [0, 6, 12, 17, 23, 29]),
        (1, [0] * 6),
        (3, [0, 0, 1, 1, 2, 2]),
    ],
)
def test_test_frame_indices(n: int, expected: list[int]) -> None:
    assert test_frame_indices(n).tolist() == expected


def test_test_frame_indices_other_T_and_empty_clip() -> None:
    assert test_frame_indices(9, T=3).tolist() == [0, 4, 8]
    with pytest.raises(ValueError):
        test_frame_indices(0)


def test_train_frame_indices_follow_the_script() -> None:
    rng = np.random.default_rng(0)
    n = 12
    ends = set()
    for _ in range(300):
        idx = train_frame_indices(n, rng)
        assert len(idx) == 6 and idx[0] == 0
        assert np.all(np.diff(idx) >= 0)
        assert 6 <= idx[-1] <= n - 2
        np.testing.assert_array_equal(idx, np.round(np.linspace(0, idx[-1], 6)).astype(int))
        ends.add(int(idx[-1]))
    assert ends == {6, 7, 8, 9, 10}  # every end in [6, n-2], none outside


def test_train_frame_indices_short_clips_and_determinism() -> None:
    for n in range(1, 8):
        np.testing.assert_array_equal(train_frame_indices(n, np.random.default_rng(0)), test_frame_indices(n))
    assert train_frame_indices(8, np.random.default_rng(0)).tolist() == [0, 1, 2, 4, 5, 6]  # only end 6 fits
    a = [train_frame_indices(40, np.random.default_rng(5)).tolist() for _ in range(2)]
    assert a[0] == a[1]


# ---------------------------------------------------------------- the cache




def test_cache_second_load_decodes_nothing(casme2_copy: Path, tmp_path: Path) -> None:
    samples = read_dataset("casme2", casme2_copy)
    total = sum(s.num_frames for s in samples)
    cache = tmp_path / "cache"

    before = clips_module.DECODE_COUNT
    cold = ClipStore.load(samples, cache, workers=2)
    assert clips_module.DECODE_COUNT - before == total == cold.decoded
    assert len(cold.cache_files) == 1 and cold.cache_files[0].parent == cache
    assert [p.name for p in cache.iterdir()] == [cold.cache_files[0].name]  # no temp file left behind

    before = clips_module.DECODE_COUNT
    warm = ClipStore.load(list(reversed(samples)), cache)  # order does not matter
    assert clips_module.DECODE_COUNT == before and warm.decoded == 0
    assert warm.cache_files == cold.cache_files
    for sample in samples:
        frames = warm.frames(sample)
        assert frames.shape == (sample.num_frames, 64, 64) and frames.dtype == np.uint8
        np.testing.assert_array_equal(frames, cold.frames(sample))


def test_frames_are_grayscale_bilinear_64(casme2_copy: Path) -> None:
    sample = read_dataset("casme2", casme2_copy)[0]
    store = ClipStore.load([sample], None)
    with Image.open(sample.frame_paths[4]) as image:
        assert image.mode == "RGB"  # synthetic CASME II frames are colour, like the real ones
        expected = np.asarray(image.convert("L").resize((64, 64), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(store.frames(sample)[4], expected)
    with pytest.raises(ValueError):
        store.frames(sample)[0, 0, 0] = 1  # shared views are read-only
    assert store.cache_files == ()


def test_changed_frame_invalidates_the_cache(casme2_copy: Path, tmp_path: Path) -> None:
    samples = read_dataset("casme2", casme2_copy)
    first = ClipStore.load(samples, tmp_path / "cache")
    target = samples[1].frame_paths[2]
    Image.fromarray(np.full((128, 128), 7, dtype=np.uint8)).save(target, format="JPEG")
    second = ClipStore.load(samples, tmp_path / "cache")
    assert second.decoded == sum(s.num_frames for s in samples)
    assert second.cache_files != first.cache_files
    assert np.all(second.frames(samples[1])[2] == 7)
    assert not np.array_equal(first.frames(samples[1])[2], second.frames(samples[1])[2])


def test_damaged_cache_is_rebuilt(casme2_copy: Path, tmp_path: Path) -> None:
    samples = read_dataset("casme2", casme2_copy)
    first = ClipStore.load(samples, tmp_path / "cache")
    path = first.cache_files[0]
    path.write_bytes(path.read_bytes()[:1000])  # e.g. a node died mid-copy outside our atomic write
    again = ClipStore.load(samples, tmp_path / "cache")
    assert again.decoded > 0
    for sample in samples:
        np.testing.assert_array_equal(again.frames(sample), first.frames(sample))
    assert ClipStore.load(samples, tmp_path / "cache").decoded == 0


@pytest.mark.parametrize("content", [b"", b"\xff\xd8\xff\xe0 not really a jpeg"])
def test_unreadable_frame_names_the_file(casme2_copy: Path, tmp_path: Path, content: bytes) -> None:
    samples = read_dataset("casme2", casme2_copy)
    bad = samples[0].frame_paths[1]
    Path(bad).write_bytes(content)
    with pytest.raises(UserInputError, match=rf"frame '{bad}' is not a readable image"):
        ClipStore.load(samples, tmp_path / "cache", workers=2)
    assert not any((tmp_path / "cache").glob("*.npz"))  # nothing cached from a failed load


def test_truncated_jpeg_is_an_error(casme2_copy: Path) -> None:
    sample = read_dataset("casme2", casme2_copy)[0]
    path = Path(sample.frame_paths[0])
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserInputError, match="is not a readable image"):
        ClipStore.load([sample], None, workers=1)


def test_batch_returns_raw_float_values(casme2_copy: Path) -> None:
    samples = read_dataset("casme2", casme2_copy)
    store = ClipStore.load(samples, None)
    batch = store.batch(samples, test_frame_indices)
    assert batch.shape == (len(samples), 6, 64, 64) and batch.dtype == np.float32
    assert batch.max() > 100  # raw 0..255, not normalised
    for i, sample in enumerate(samples):
        np.testing.assert_array_equal(batch[i], store.frames(sample)[test_frame_indices(sample.num_frames)])
    rng = np.random.default_rng(1)
    train = store.batch(samples, lambda n: train_frame_indices(n, rng))
    assert train.shape == batch.shape
    np.testing.assert_array_equal(train[:, 0], batch[:, 0])  # both start at the onset


def test_one_cache_file_per_dataset(casme2_copy: Path, tmp_path: Path) -> None:
    casme = read_dataset("casme2", casme2_copy)
    samm_root = write_synthetic("samm", tmp_path / "samm", subjects=1, clips_per_subject=1)
    samm = read_dataset("samm", samm_root)
    store = ClipStore.load(casme + samm, tmp_path / "cache")
    assert sorted(p.name.split("-")[0] for p in store.cache_files) == ["casme2", "samm"]
    assert len(store) == len(casme) + len(samm)
    assert all(s in store for s in casme + samm)
    missing = Sample("samm", "099", "x", 1, None, 2, frozenset({4}), ("/nope",))
    assert missing not in store
    with pytest.raises(KeyError, match="samm/099/x"):
        store.frames(missing)


def test_merged_store_serves_every_clip_of_its_parts(casme2_copy: Path, tmp_path: Path) -> None:
    samples = read_dataset("casme2", casme2_copy)
    half = len(samples) // 2
    first, second = ClipStore.load(samples[:half], tmp_path), ClipStore.load(samples[half:], tmp_path / "b")
    merged = ClipStore.merged([first, second])
    assert len(merged) == len(samples)
    for sample in (samples[0], samples[-1]):
        part = first if sample in first else second
        assert merged.frames(sample) is part.frames(sample)  # a view of the same memory, no copy
    assert merged.decoded == 0
