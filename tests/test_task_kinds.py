"""The table of task kinds: each row's loss on a case computed by hand, its main metric and
direction (SPEC, "Your own data"), partial labels, spec validation, and that no module branches on
a task's name."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO

from atrc_exp.losses import MultiTaskLoss
from atrc_exp.metrics import MultiTaskMetrics
from atrc_exp.task_kinds import TASK_KINDS, MeterSettings, make_task, make_tasks, spec_problems

LOG2 = math.log(2.0)


def _task(kind: str, **opts):
    return make_task("t", {"kind": kind, **opts})


def _pixels(values, dtype=torch.float64) -> torch.Tensor:
    """A 1×1×1×N map."""
    return torch.tensor(values, dtype=dtype).reshape(1, 1, 1, -1)


# (kind, options, prediction, target, expected final loss) — by hand:
HAND = {
    # two classes, equal logits: log 2 per valid pixel (255 ignored)
    "segmentation": ({"classes": 2}, torch.zeros(1, 2, 1, 3), torch.tensor([[[0, 1, 255]]]), LOG2),
    # |1 - 2| on the one valid pixel
    "depth": ({}, _pixels([1.0, 1.0]), _pixels([2.0, 255.0]), 1.0),
    # normalised (2, 0, 0) = (1, 0, 0) vs (0, 1, 0): |1| + |−1| = 2
    "normals": (
        {},
        torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64).reshape(1, 3, 1, 1),
        torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).reshape(1, 3, 1, 1),
        2.0,
    ),
    # σ(0) = 1/2, w = 0.8: (0.8·log 2 + 0.2·log 2) / 2
    "edge": ({"edge_pos_weight": 0.8}, _pixels([0.0, 0.0]), _pixels([1.0, 0.0]), 0.5 * LOG2),
    # 1 positive, 3 negatives: w_pos = 3/4; (0.75 + 3·0.25)·log 2 / 4
    "saliency": ({}, torch.zeros(1, 2, 1, 4), torch.tensor([[[1, 0, 0, 0]]]), 0.375 * LOG2),
}
#: main metric and whether higher is better, as SPEC's table states them
MAIN = {
    "segmentation": ("mIoU", True),
    "depth": ("rmse", False),
    "normals": ("mean_angle", False),
    "edge": ("odsF", True),
    "saliency": ("maxF", True),
}
#: default loss weights of SPEC's table
WEIGHTS = {"segmentation": 1.0, "depth": 1.0, "normals": 10.0, "edge": 50.0, "saliency": 5.0}


def test_the_table_has_the_five_kinds():
    assert set(TASK_KINDS) == set(HAND) == set(MAIN)


@pytest.mark.parametrize("kind", sorted(HAND))
def test_each_kind_loss_by_hand_main_metric_and_weight(kind):
    opts, pred, target, expected = HAND[kind]
    task = _task(kind, **opts)
    loss = task.kind.final_loss(pred.double(), target, task, None)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert task.kind.metrics[0] == MAIN[kind]
    assert task.main_metric == f"t/{MAIN[kind][0]}"
    assert task.weight == WEIGHTS[kind]
    assert make_task("t", {"kind": kind, "weight": 3, **opts}).weight == 3.0


@pytest.mark.parametrize("kind", sorted(HAND))
def test_a_task_without_label_adds_zero_loss_and_nothing_to_its_metrics(kind):
    opts, pred, target, _ = HAND[kind]
    task = _task(kind, **opts)
    none = torch.full_like(target, 255)
    loss = MultiTaskLoss([task])({"final": {"t": pred.double().requires_grad_()}}, {"t": none})[0]
    assert loss.item() == 0.0
    m = MultiTaskMetrics([task], MeterSettings(edge_thresholds=9))
    m.update({"t": pred.float()}, {"t": none})
    m.update({"t": pred.float()}, {"t": target})
    assert m.labelled_images() == {"t": 1}


def test_partial_labels_leave_the_other_tasks_whole():
    """A batch of two images, the second without a segmentation label: the segmentation loss is
    the first image's alone, the depth loss both images'."""
    seg, dep = make_tasks({"seg": {"kind": "segmentation", "classes": 2}, "dep": {"kind": "depth"}})
    logits = torch.zeros(2, 2, 1, 2, dtype=torch.float64)
    seg_t = torch.tensor([[[0, 1]], [[255, 255]]])
    dep_p = torch.ones(2, 1, 1, 2, dtype=torch.float64)
    dep_t = torch.tensor([[[[2.0, 2.0]]], [[[3.0, 3.0]]]], dtype=torch.float64)
    _, terms = MultiTaskLoss([seg, dep])(
        {"final": {"seg": logits, "dep": dep_p}}, {"seg": seg_t, "dep": dep_t}
    )
    assert terms["loss/seg"].item() == pytest.approx(LOG2)
    assert terms["loss/dep"].item() == pytest.approx(1.5)  # (1 + 1 + 2 + 2) / 4


def test_spec_problems_one_line_each():
    assert spec_problems("a", {"kind": "segmentation", "classes": ["x", "y"]}) == []
    assert "unknown kind 'foo'" in spec_problems("a", {"kind": "foo"})[0]
    assert "needs `classes`" in spec_problems("a", {"kind": "segmentation"})[0]
    assert "unknown key(s) colour" in spec_problems("a", {"kind": "depth", "colour": 1})[0]
    assert "weight" in spec_problems("a", {"kind": "depth", "weight": -1})[0]
    assert "task name" in spec_problems("Bad-Name", {"kind": "depth"})[0]


#: modules whose file tables name the published layouts' tasks (the readers and writers of
#: NYUD_MT and PASCAL_MT, their layout rows) and the table of the paper's named tasks itself
_ALLOWED = {
    "task_kinds.py",
    "data/nyud.py",
    "data/pascal.py",
    "data/synthetic.py",
    "data/layouts.py",
}
_BRANCH = re.compile(
    r"""(==|!=)\s*["'](semseg|human_parts|sal|depth|normals|edge)["']"""
    r"""|["'](semseg|human_parts|sal|depth|normals|edge)["']\s+(not\s+)?in\s"""
    r"""|\bin\s+\(["'](semseg|human_parts|sal|depth|normals|edge)["']"""
)

#: a comparison of a kind's name (kinds share three names with the paper's tasks)
_KIND = re.compile(r"\bkind(\.name)?\s*(==|!=)")


def test_no_module_branches_on_a_task_name():
    pkg = REPO / "atrc_exp"
    found = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg).as_posix()
        if rel in _ALLOWED:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if _BRANCH.search(line) and not _KIND.search(line):
                found.append(f"{rel}:{i}: {line.strip()}")
    assert not found, "branches on a task name (ask the task's kind):\n" + "\n".join(found)


def test_the_checker_sees_a_branch(tmp_path: Path):
    assert _BRANCH.search('if task == "semseg":')
    assert _BRANCH.search('    if "depth" in sample:')
    assert _BRANCH.search('if t in ("semseg", "human_parts"):')
    assert _KIND.search('if task.kind.name == "edge":') and not _KIND.search('if task == "edge":')


def test_tasks_and_the_transforms_holding_them_pickle():
    """Spawned DataLoader workers get the dataset (its transforms hold the tasks) by pickle: a kind
    travels as a reference to its row, a task as its name, kind, weight and options."""
    import pickle

    from atrc_exp.data.transforms import build_train_transform

    tasks = make_tasks({"seg": {"kind": "segmentation", "classes": ["a", "b"]}, "n": {"kind": "normals"}})
    back = pickle.loads(pickle.dumps(tasks))
    assert [repr(t) for t in back] == [repr(t) for t in tasks]
    assert back[1].kind is TASK_KINDS["normals"]
    tf = pickle.loads(pickle.dumps(build_train_transform((8, 8), tasks=tasks)))
    assert tf.transforms[-1].rules.tasks["n"].kind is TASK_KINDS["normals"]
