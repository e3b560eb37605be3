"""The dataset layout table (atrc_exp.data.layouts.LAYOUTS) is the one place that knows the layouts."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import CONF_DIR, REPO, compose_cfg, tiny_overrides

from atrc_exp.config import ConfigError
from atrc_exp.data import build_datasets, prepare_data
from atrc_exp.data.layouts import LAYOUTS, get_layout


def _dataset_yamls() -> dict[str, dict]:
    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted((CONF_DIR / "dataset").glob("*.yaml"))}


#: the published layouts (an archive to fetch, a synthetic config in the cache); the `folder` row is
#: the user's own data (dataset.root; tests/test_folder_dataset.py and test_folder_train.py)
PUBLISHED = {k: v for k, v in LAYOUTS.items() if v.archive is not None}


def test_every_dataset_config_names_a_layout_of_the_table():
    confs = _dataset_yamls()
    assert confs, CONF_DIR
    for name, c in confs.items():
        assert c["layout"] in LAYOUTS, name
    # and every row points at dataset configs of its own layout: the real data and the synthetic one
    for layout, spec in PUBLISHED.items():
        for ds in (spec.archive.dataset, spec.synthetic_dataset):
            assert ds in confs and confs[ds]["layout"] == layout, (layout, ds)


@pytest.mark.parametrize("step", ["prepare_data", "build_datasets"])
def test_unknown_layout_lists_exactly_the_table(tmp_path, step):
    cfg = compose_cfg(tiny_overrides(tmp_path, **{"dataset.layout": "KITTI_MT"}))
    fn = {"prepare_data": prepare_data, "build_datasets": build_datasets}[step]
    with pytest.raises(ConfigError, match=r"dataset=synthetic: unknown dataset layout 'KITTI_MT'") as e:
        fn(cfg)
    known = re.search(r"known layouts: (.*?)\. ", str(e.value)).group(1)
    assert known.split(", ") == list(LAYOUTS)
    assert "atrc_exp.data.layouts.LAYOUTS" in str(e.value)  # says where to add one


@pytest.mark.parametrize("layout", list(PUBLISHED))
def test_each_row_writes_and_reads_its_synthetic_data(tmp_path, layout):
    """A row's writer, reader, reader kwargs, split folder and check hook fit together: the
    synthetic dataset config of the row builds datasets of the row's reader class from the data its
    writer wrote, in ``<data_dir>/<layout>/<split_dir>``."""
    spec = get_layout(layout)
    cfg = compose_cfg(
        tiny_overrides(
            tmp_path / "data", dataset=spec.synthetic_dataset, **{"paths.cache_dir": tmp_path / "c"}
        )
    )
    data_dir = prepare_data(cfg, progress=False)
    train, val = build_datasets(cfg, data_dir)
    assert type(train) is spec.reader and type(val) is spec.reader
    assert train.root == data_dir / layout and len(train) == 8 and len(val) == 4
    assert train.split_file == data_dir / layout / spec.split_dir / "train.txt"
    raw = spec.reader(data_dir, "val", spec.check_tasks, num_classes=7).load_raw(0)
    assert set(spec.check_tasks) <= set(raw)
    if spec.check_image is not None:
        spec.check_image(train, 0, raw)


def test_no_other_module_branches_on_a_layout_name():
    """Comparisons with a layout's name (``== "NYUD_MT"``, ``in ("NYUD_MT", ...)``) are rows of the
    table instead; only the readers and writers of a layout spell its folder name."""
    names = "|".join(map(re.escape, LAYOUTS))
    branch = re.compile(rf"""(==|!=|\bin\s*[(\[{{])\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    hits = [
        f"{p.relative_to(REPO)}:{i}: {line.strip()}"
        for p in sorted((REPO / "atrc_exp").rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if branch.search(line)
    ]
    assert hits == []
