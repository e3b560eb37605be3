"""Auxiliary targets: normal centroids (k-means, cached) and the log depth bins."""

from __future__ import annotations

import numpy as np
import torch

from atrc_exp.data import targets as TG
from atrc_exp.losses import depth_to_bins


def _clustered(n_per=200, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, 3))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    pts = np.repeat(centres, n_per, 0) + rng.normal(scale=0.01, size=(40 * n_per, 3))
    return centres, pts / np.linalg.norm(pts, axis=1, keepdims=True)


def test_centroids_unit_deterministic_and_fit_clusters():
    centres, pts = _clustered()
    a = TG.compute_normal_centroids(pts, 40, seed=0)
    b = TG.compute_normal_centroids(pts, 40, seed=0)
    assert a.shape == (40, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    # every true cluster centre has a centroid close by (k-means++ on well separated clusters)
    assert (centres @ a.T).max(1).mean() > 0.98


def test_centroids_with_few_distinct_normals():
    pts = np.array([[0, 0, -1.0], [0, -1.0, 0]] * 10)
    c = TG.compute_normal_centroids(pts, 40)
    assert c.shape == (40, 3) and np.isfinite(c).all()
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5)


def test_sample_normals_skips_invalid():
    n = np.zeros((4, 5, 3), np.float32)
    n[..., 2] = -2.0  # not unit: normalised
    n[0, 0] = 0
    n[1, 1] = 255
    s = TG.sample_normals([n], per_image=100)
    assert s.shape == (18, 3)
    np.testing.assert_allclose(s, np.tile([0, 0, -1.0], (18, 1)))
    assert len(TG.sample_normals([n, n], per_image=5)) == 10


def test_cache_written_once(tmp_path):
    _, pts = _clustered(20)
    calls = []

    def maps():
        calls.append(1)
        return [pts.reshape(40, 20, 3)]

    key = {"name": "x", "root": "/data"}
    a = TG.cached_normal_centroids(tmp_path, key, maps)
    b = TG.cached_normal_centroids(tmp_path, key, maps)
    assert len(calls) == 1 and np.array_equal(a, b)
    files = list((tmp_path / "normal_centroids").iterdir())
    assert len(files) == 1 and files[0].name.startswith("x_") and files[0].suffix == ".npy"
    TG.cached_normal_centroids(tmp_path, {**key, "root": "/other"}, maps)
    assert len(calls) == 2  # another dataset, another cache entry


def test_normal_centroids_for_config(tiny_data_dir, tmp_path):
    from conftest import compose_cfg, tiny_overrides

    from atrc_exp.data import normal_centroids

    cfg = compose_cfg(tiny_overrides(tiny_data_dir, **{"paths.cache_dir": str(tmp_path)}))
    c = normal_centroids(cfg, tiny_data_dir)
    assert isinstance(c, torch.Tensor) and c.shape == (40, 3) and c.dtype == torch.float32
    assert len(list((tmp_path / "normal_centroids").glob("*.npy"))) == 1
    assert torch.equal(normal_centroids(cfg, tiny_data_dir), c)
    # the synthetic rooms' floor normal (up, camera y < 0) is close to some centroid
    assert (c[:, 1] < -0.8).any()


def test_depth_bin_edges_match_depth_to_bins():
    edges = TG.depth_bin_edges()
    assert len(edges) == 41 and np.isclose(edges[0], 0.7) and np.isclose(edges[-1], 10)
    mids = torch.tensor(np.sqrt(edges[:-1] * edges[1:]), dtype=torch.float32).view(1, 1, 40, 1)
    assert depth_to_bins(mids, num_bins=40).flatten().tolist() == list(range(40))
    assert TG.depth_to_bins is depth_to_bins


def test_depth_label_range_by_hand_and_cached_once(tmp_path):
    # 1..101 m with unlabelled pixels (0, NaN): 1st percentile 2 m, 99th 100 m (linear interpolation)
    maps = [np.array([[0.0, np.nan, *range(1, 52)]]), np.arange(52, 102, dtype=np.float64)[None]]
    np.testing.assert_array_equal(TG.depth_label_range(maps), [2.0, 100.0])
    assert TG.depth_label_range([np.zeros((2, 2))]).size == 0
    calls = []

    def compute():
        calls.append(1)
        return TG.depth_label_range(maps)

    key = {"name": "x", "root": "/r"}
    a = TG.cached_array(tmp_path, "depth_ranges", key, (2,), compute)
    b = TG.cached_array(tmp_path, "depth_ranges", key, (2,), compute)
    assert calls == [1] and np.array_equal(a, b) and list(a) == [2.0, 100.0]
    assert len(list((tmp_path / "depth_ranges").glob("x_*.npy"))) == 1
