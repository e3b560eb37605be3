"""Backbones: HRNetV2 architecture (against timm), checkpoint loading, pretrained resolution, timm wrapper."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

from atrc_exp.models import hrnet as hrnet_mod
from atrc_exp.models.backbones import (
    PRETRAINED_URLS,
    PretrainedDownloadError,
    default_weights_path,
    hrnet18,
    hrnet48,
    load_backbone_checkpoint,
)
from atrc_exp.models.hrnet import HRNet
from atrc_exp.models.timm_backbone import TimmBackbone

timm = pytest.importorskip("timm")

CLS_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Give BN non-trivial affine params and running stats so weight copies are observable."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=g))


@pytest.fixture(scope="module")
def timm_hr18():
    torch.manual_seed(0)
    t = timm.create_model("hrnet_w18_small_v2", pretrained=False)
    randomize_bn(t)
    return t.eval()


# ----------------------------------------------------------------------------------------- architecture


@pytest.mark.parametrize(
    "name,count,channels",
    [("hrnet18", 3_860_720, [18, 36, 72, 144]), ("hrnet48", 65_325_120, [48, 96, 192, 384])],
)
def test_parameter_count_and_channels(name, count, channels):
    m = {"hrnet18": hrnet18, "hrnet48": hrnet48}[name]()
    assert n_params(m) == count
    assert m.out_channels == channels


@pytest.mark.parametrize("size", [(97, 131), (64, 96)])
def test_hrnet18_output_shapes(size):
    m = hrnet18().eval()
    h, w = size
    with torch.no_grad():
        out = m(torch.randn(2, 3, h, w))
    assert isinstance(out, list) and len(out) == 4
    expected = []
    for _ in range(5):  # every stride-2 conv (k3, p1) maps n -> ceil(n / 2)
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        expected.append((h, w))
    for o, c, hw in zip(out, m.out_channels, expected[1:]):
        assert tuple(o.shape) == (2, c, *hw)
        assert torch.isfinite(o).all()


def test_hrnet48_tiny_forward():
    m = hrnet48().eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, 40, 56))
    assert [tuple(o.shape) for o in out] == [(1, 48, 10, 14), (1, 96, 5, 7), (1, 192, 3, 4), (1, 384, 2, 2)]


def test_hrnet18_backward_reaches_every_parameter():
    m = hrnet18().train()
    out = m(torch.randn(2, 3, 45, 61))
    sum(o.square().mean() for o in out).backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad[:5]
    zero = [n for n, p in m.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, zero[:5]


# -------------------------------------------------------------------------------------- timm equivalence


def test_timm_state_dict_loads_strict_and_equal(timm_hr18):
    sd = timm_hr18.state_dict()
    assert any(k.startswith(CLS_PREFIXES) for k in sd)
    kept = {k: v for k, v in sd.items() if not k.startswith(CLS_PREFIXES)}
    ours = HRNet("hrnet18")
    assert set(ours.state_dict()) == set(kept)
    ours.load_state_dict(kept, strict=True)
    for k, v in ours.state_dict().items():
        assert v.shape == kept[k].shape and torch.equal(v, kept[k]), k

    # through our loader: full classifier state dict with a DDP prefix
    ours2 = HRNet("hrnet18")
    report = load_backbone_checkpoint(ours2, {"module." + k: v for k, v in sd.items()})
    assert report["loaded"] == len(kept)
    assert report["dropped"] == len(sd) - len(kept)
    for k, v in ours2.state_dict().items():
        assert torch.equal(v, kept[k]), k


def test_forward_matches_timm_up_to_upsampling_mode(timm_hr18, monkeypatch):
    """With timm's weights and the fuse resize forced to nearest (timm's mode), the outputs are identical:
    stem, transitions, branches and fusion are wired as in timm. At sizes that are exact multiples of 32
    nearest-resize-to-size equals timm's Upsample(scale_factor=2**k, mode='nearest')."""
    ours = HRNet("hrnet18").eval()
    load_backbone_checkpoint(ours, timm_hr18.state_dict())

    def nearest(x, size=None, scale_factor=None, mode=None, align_corners=None, **kw):
        return F.interpolate(x, size=size, scale_factor=scale_factor, mode="nearest")

    monkeypatch.setattr(hrnet_mod, "F", types.SimpleNamespace(interpolate=nearest))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        t = timm_hr18
        y = t.act2(t.bn2(t.conv2(t.act1(t.bn1(t.conv1(x))))))
        ref = t.stages(y)
        out = ours(x)
    assert len(out) == len(ref) == 4
    for o, r in zip(out, ref):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5)


def test_fuse_upsamples_by_the_scale_factor_then_resizes_to_the_exact_size(monkeypatch):
    """MMSeg's fusion: Upsample(scale_factor=2^k, bilinear) of the lower branch, then a resize to the
    exact size (values checked against that statement in tests/test_fidelity.py)."""
    calls = []

    def spy(x, size=None, scale_factor=None, mode=None, align_corners=None, **kw):
        calls.append((tuple(x.shape[-2:]), scale_factor, mode, align_corners))
        return F.interpolate(x, size=size, scale_factor=scale_factor, mode=mode, align_corners=align_corners)

    monkeypatch.setattr(hrnet_mod, "F", types.SimpleNamespace(interpolate=spy))
    ours = HRNet("hrnet18").eval()
    assert not any(isinstance(m, torch.nn.Upsample) for m in ours.modules())
    with torch.no_grad():
        out = ours(torch.randn(1, 3, 97, 131))
    branch_sizes = [(25, 33), (13, 17), (7, 9), (4, 5)]
    assert [tuple(o.shape[-2:]) for o in out] == branch_sizes  # exact sizes after the resize
    # stage2: 1 module x 1 up-path, stage3: 3 x 3, stage4: 2 x 6
    assert len(calls) == 1 + 9 + 12
    for src, scale, mode, ac in calls:
        assert src in branch_sizes and scale in (2, 4, 8) and mode == "bilinear" and ac is False


# ------------------------------------------------------------------------------------ checkpoint loading


def _mmseg_checkpoint(seed: int = 1) -> dict:
    torch.manual_seed(seed)
    src = HRNet("hrnet18")
    randomize_bn(src, seed)
    sd = {"backbone." + k: v.clone() for k, v in src.state_dict().items()}
    sd["decode_head.conv_seg.weight"] = torch.randn(19, 270, 1, 1)
    sd["decode_head.conv_seg.bias"] = torch.randn(19)
    sd["auxiliary_head.conv_seg.weight"] = torch.randn(19, 270, 1, 1)
    return {"state_dict": sd, "meta": {"epoch": 1, "CLASSES": ["a", "b"]}}


def test_mmseg_checkpoint_loads_via_hrnet18(tmp_path):
    ckpt = _mmseg_checkpoint()
    path = tmp_path / "fcn_hr18s.pth"
    torch.save(ckpt, path)
    m = hrnet18(pretrained=str(path))
    for k, v in m.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"]["backbone." + k]), k
    assert m.load_report["dropped"] == 3
    assert m.load_report["loaded"] == len(m.state_dict())


def test_model_wrapper_and_bare_keys(tmp_path):
    ckpt = _mmseg_checkpoint(seed=2)
    bare = {
        k.removeprefix("backbone."): v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")
    }
    path = tmp_path / "wrapped.pth"
    torch.save({"model": bare, "epoch": 3}, path)
    m = HRNet("hrnet18")
    load_backbone_checkpoint(m, path)
    for k, v in m.state_dict().items():
        assert torch.equal(v, bare[k]), k


def test_old_checkpoint_without_num_batches_tracked(tmp_path):
    ckpt = _mmseg_checkpoint(seed=3)
    sd = {k: v for k, v in ckpt["state_dict"].items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(sd, path)
    m = hrnet18(pretrained=path)
    assert m.load_report["missing_num_batches_tracked"] > 0
    assert torch.equal(m.conv1.weight, sd["backbone.conv1.weight"])


@pytest.mark.parametrize("corruption", ["unexpected", "shape", "missing"])
def test_bad_checkpoint_raises_value_error_naming_key(tmp_path, corruption):
    sd = dict(_mmseg_checkpoint()["state_dict"])
    if corruption == "unexpected":
        sd["backbone.stage9.bogus.weight"] = torch.zeros(3)
        key = "stage9.bogus.weight"
    elif corruption == "shape":
        sd["backbone.stage3.1.branches.2.0.conv1.weight"] = torch.zeros(72, 72, 1, 1)
        key = "stage3.1.branches.2.0.conv1.weight"
    else:
        del sd["backbone.transition2.2.0.0.weight"]
        key = "transition2.2.0.0.weight"
    path = tmp_path / f"bad_{corruption}.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(ValueError) as exc:
        hrnet18(pretrained=str(path))
    assert key in str(exc.value)
    assert str(path) in str(exc.value)


def test_missing_explicit_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        hrnet18(pretrained=str(tmp_path / "nope.pth"))


# ------------------------------------------------------------------------------------ pretrained=True


def _dead_url_base() -> str:
    """A local URL nothing listens on (the port was just free): downloads fail at once, offline."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mirror"


@pytest.mark.parametrize("name", ["hrnet18", "hrnet48"])
def test_pretrained_true_without_cache_file_and_network(tmp_path, monkeypatch, name):
    # the download itself is tested in test_weights_io.py; here: offline, one line naming URL and target
    from atrc_exp.models.backbones import PretrainedDownloadError

    base = _dead_url_base()
    monkeypatch.setenv("ATRC_WEIGHTS_URL_BASE", base)
    fname = PRETRAINED_URLS[name].rsplit("/", 1)[-1]
    expected = tmp_path / "weights" / fname
    assert default_weights_path(name, tmp_path / "weights") == expected
    with pytest.raises(PretrainedDownloadError) as exc:
        {"hrnet18": hrnet18, "hrnet48": hrnet48}[name](pretrained=True, weights_dir=tmp_path / "weights")
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"{base}/{fname}" in msg
    assert str(expected) in msg
    assert "backbone.pretrained=" in msg
    assert list(expected.parent.iterdir()) == []  # no partial file left


def test_pretrained_true_loads_cache_file(tmp_path, monkeypatch, timm_hr18):
    monkeypatch.setenv("ATRC_WEIGHTS_URL_BASE", _dead_url_base())  # a cached file needs no network
    # ImageNet pretrain layout: bare keys including the classification head
    sd = timm_hr18.state_dict()
    cached = default_weights_path("hrnet18", tmp_path / "w")
    assert cached.name == "hrnetv2_w18_small-b5a04e21.pth"
    cached.parent.mkdir(parents=True)
    torch.save(sd, cached)
    m = hrnet18(pretrained=True, weights_dir=tmp_path / "w")
    assert torch.equal(m.stage4[1].fuse_layers[0][3][0].weight, sd["stage4.1.fuse_layers.0.3.0.weight"])
    with pytest.raises(ValueError, match="weights_dir"):  # the folder is the config's paths.weights_dir
        hrnet18(pretrained=True)


def test_the_weights_folder_is_paths_weights_dir(tmp_path, monkeypatch):
    """One definition, in conf/paths/default.yaml: $ATRC_WEIGHTS_DIR, else <cache>/weights."""
    from conftest import compose_cfg

    monkeypatch.delenv("ATRC_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = compose_cfg([])
    assert cfg.paths.weights_dir == str(tmp_path / "atrc_exp" / "weights") == cfg.backbone.weights_dir
    monkeypatch.setenv("ATRC_WEIGHTS_DIR", str(tmp_path / "env"))
    assert compose_cfg(["backbone=hrnet48"]).backbone.weights_dir == str(tmp_path / "env")


# ----------------------------------------------------------------------------------------------- timm


def test_timm_backbone_resnet18():
    b = TimmBackbone("resnet18", out_indices=(1, 2, 3, 4))
    assert b.out_channels == [64, 128, 256, 512]
    with torch.no_grad():
        out = b.eval()(torch.randn(1, 3, 64, 96))
    assert isinstance(out, list)
    assert [tuple(o.shape) for o in out] == [(1, 64, 16, 24), (1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]


def test_timm_backbone_local_file_and_no_download(tmp_path):
    torch.manual_seed(0)
    full = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(full.state_dict(), path)
    b = TimmBackbone("resnet18", pretrained=str(path), out_indices=[2, 3])
    assert b.out_channels == [128, 256]
    assert torch.equal(b.model.layer3[0].conv1.weight, full.layer3[0].conv1.weight)


def _hub_cache_file(cache, repo: str, state: dict) -> None:
    """``state`` as ``model.safetensors`` of Hugging Face hub repo ``repo`` in the hub cache layout
    (``models--<org>--<name>/snapshots/<revision>/``, ``refs/main`` naming the revision)."""
    from safetensors.torch import save_file

    folder = cache / ("models--" + repo.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    (folder / "snapshots" / revision).mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, folder / "snapshots" / revision / "model.safetensors"
    )


def test_timm_pretrained_true_loads_from_timms_cache_and_names_it_offline(tmp_path, monkeypatch):
    """``pretrained=true`` is timm's own mechanism: a file in its (Hugging Face hub) cache is what
    loads; without one, offline, one line names the model and the cache folder."""
    import huggingface_hub.constants as hf

    name = "test_resnet.r160_in1k"
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # never the network
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(PretrainedDownloadError) as err:
        TimmBackbone(name, pretrained=True)
    msg = str(err.value)
    assert "\n" not in msg and name in msg and str(tmp_path / "hub") in msg and "backbone.pretrained=" in msg
    torch.manual_seed(3)
    full = timm.create_model(name, pretrained=False)
    _hub_cache_file(tmp_path / "hub", "timm/" + name, full.state_dict())
    b = TimmBackbone(name, pretrained=True)
    assert torch.equal(b.model.layer1[0].conv1.weight, full.layer1[0].conv1.weight)
    assert not torch.equal(TimmBackbone(name).model.layer1[0].conv1.weight, full.layer1[0].conv1.weight)
