"""The client's local state: running reward normalisation (checkpointed) and the result cache."""

from __future__ import annotations

import numpy as np

from rewards.client import RunningNorm
from rewards.service import ResultCache, _Row, item_hashes


def test_running_norm_equals_whole_data_moments_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.normal(50.0, 7.0, size=n) for n in (5, 17, 1, 40)]
    norm = RunningNorm()
    for b in batches:
        norm.update(np.append(b, [np.nan, np.inf]))  # non-finite values never enter the moments
    flat = np.concatenate(batches)
    assert norm.count == flat.size
    np.testing.assert_allclose([norm.mean, norm.std], [flat.mean(), flat.std()], rtol=1e-10)
    z = norm(flat)
    np.testing.assert_allclose([z.mean(), z.std()], [0.0, 1.0], atol=1e-5)
    restored = RunningNorm()
    restored.load(norm.state())
    np.testing.assert_array_equal(restored(flat[:3]), norm(flat[:3]))
    assert RunningNorm()(np.array([2.0], np.float32))[0] != 0  # no data yet: identity scale


def test_cache_is_lru_keeps_only_ok_items_and_keys_on_version() -> None:
    cache = ResultCache(2)
    row = _Row(scores={"s": 1.0}, extras={}, ok=True, error="")
    cache.put((b"a", "p", "s", "v1"), row)
    cache.put((b"b", "p", "s", "v1"), row)
    cache.get((b"a", "p", "s", "v1"))  # a is now the most recent
    cache.put((b"c", "p", "s", "v1"), row)
    assert cache.get((b"b", "p", "s", "v1")) is None and cache.get((b"a", "p", "s", "v1")) is row
    assert cache.get((b"a", "p", "s", "v2")) is None and cache.get((b"a", "q", "s", "v1")) is None
    cache.put((b"d", "p", "s", "v1"), _Row(scores={"s": float("nan")}, extras={}, ok=False, error="x"))
    assert cache.get((b"d", "p", "s", "v1")) is None
    assert (cache.hits, cache.misses) == (2, 4)


def test_item_hashes_see_every_pixel_and_the_shape() -> None:
    images = np.zeros((3, 4, 4, 3), np.uint8)
    images[1, 3, 3, 2] = 1
    h = item_hashes(images)
    assert h[0] == h[2] != h[1]
    assert (
        item_hashes(np.zeros((1, 8, 2, 3), np.uint8))[0] != item_hashes(np.zeros((1, 2, 8, 3), np.uint8))[0]
    )
