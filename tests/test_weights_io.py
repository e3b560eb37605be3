"""Weights files: pretrained download (local HTTP server only), safe checkpoint loading, one-line errors."""

from __future__ import annotations

import argparse
import hashlib
import http.server
import io
import logging
import os
import pathlib
import re
import socket
import sys
import threading
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import compose_cfg, tiny_overrides
from test_faults import _run_main

from atrc_exp.cli.eval import main as eval_main
from atrc_exp.cli.predict import main as predict_main
from atrc_exp.models import build_model
from atrc_exp.models.backbones import (
    PRETRAINED_URLS,
    PretrainedDownloadError,
    default_weights_path,
    hrnet18,
    hrnet48,
)
from atrc_exp.models.hrnet import HRNet
from atrc_exp.models.original import load_original_state_dict
from atrc_exp.models.state_dict import WeightsError, read_checkpoint

# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def hrnet18_file() -> tuple[bytes, dict[str, torch.Tensor], str]:
    """An HRNet18 checkpoint in the MMSeg layout (``state_dict`` with ``backbone.*`` keys and a decode
    head): its bytes, its backbone weights and ``<stem>-<sha256[:8]>.pth``, the torch.hub naming."""
    torch.manual_seed(0)
    src = HRNet("hrnet18")
    bare = {
        k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in src.state_dict().items()
    }
    sd = {"backbone." + k: v for k, v in bare.items()}
    sd["decode_head.conv_seg.weight"] = torch.randn(19, 270, 1, 1)
    buf = io.BytesIO()
    torch.save({"state_dict": sd, "meta": {"epoch": 1}}, buf)
    data = buf.getvalue()
    return data, bare, f"hrnet18test-{hashlib.sha256(data).hexdigest()[:8]}.pth"


class _Server:
    """A bounded HTTP server on 127.0.0.1 in a thread, serving ``files`` (URL path -> bytes) and counting
    requests; ``truncate`` paths announce the full length but send only half and close."""

    def __init__(self, files: dict[str, bytes], truncate: tuple[str, ...] = ()):
        self.files, self.truncate, self.requests = files, truncate, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                outer.requests.append(self.path)
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2] if self.path in outer.truncate else data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    """No proxy for 127.0.0.1, an empty weights cache, and ``hrnet18``'s default URL under test control."""
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("ATRC_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.delenv("ATRC_WEIGHTS_URL_BASE", raising=False)
    return tmp_path / "weights"


def _use_name(monkeypatch, name: str) -> None:
    """Point hrnet18's default weights at ``name`` (the real host: only the mirror env var is ever hit)."""
    monkeypatch.setitem(
        PRETRAINED_URLS, "hrnet18", f"https://download.openmmlab.com/pretrain/third_party/{name}"
    )


def _one_line(msg: str) -> str:
    assert "\n" not in msg.strip(), msg
    return msg


# --------------------------------------------------------------------------------- pretrained download


def test_first_use_downloads_once_with_progress_and_hash_check(hrnet18_file, offline_env, monkeypatch, capfd):
    data, bare, name = hrnet18_file
    _use_name(monkeypatch, name)
    with _Server({f"/mirror/{name}": data}) as srv:
        monkeypatch.setenv("ATRC_WEIGHTS_URL_BASE", f"{srv.url}/mirror/")
        m = hrnet18(pretrained=True, weights_dir=offline_env)
        assert srv.requests == [f"/mirror/{name}"]
        assert "100%" in capfd.readouterr().err  # torch.hub's progress bar
        path = default_weights_path("hrnet18", offline_env)
        assert path == offline_env / name and path.read_bytes() == data
        assert sorted(p.name for p in offline_env.iterdir()) == [name]  # no temporary file left
        for k, v in m.state_dict().items():
            assert torch.equal(v, bare[k]), k
        # second use: from the cache, no request
        m2 = hrnet18(pretrained=True, weights_dir=offline_env)
        assert srv.requests == [f"/mirror/{name}"]
        assert torch.equal(m2.conv1.weight, bare["conv1.weight"])


def test_config_weights_dir_is_the_download_cache(hrnet18_file, offline_env, monkeypatch, tmp_path):
    data, bare, name = hrnet18_file
    _use_name(monkeypatch, name)
    cfg_dir = tmp_path / "cfg_weights"
    with _Server({f"/{name}": data}) as srv:
        monkeypatch.setenv("ATRC_WEIGHTS_URL_BASE", srv.url)
        cfg = compose_cfg(["backbone.pretrained=true", f"paths.weights_dir={cfg_dir}"])
        model = build_model(cfg)
        assert srv.requests == [f"/{name}"]
    assert (cfg_dir / name).read_bytes() == data and not offline_env.exists()
    assert torch.equal(model.backbone.conv1.weight, bare["conv1.weight"])


@pytest.mark.parametrize("fault", ["wrong bytes", "truncated"])
def test_corrupt_download_is_one_line_and_leaves_nothing(hrnet18_file, offline_env, monkeypatch, fault):
    data, _, name = hrnet18_file
    _use_name(monkeypatch, name)
    served = data[:-64] + bytes(64) if fault == "wrong bytes" else data
    truncate = (f"/{name}",) if fault == "truncated" else ()
    with _Server({f"/{name}": served}, truncate=truncate) as srv:
        monkeypatch.setenv("ATRC_WEIGHTS_URL_BASE", srv.url)
        with pytest.raises(PretrainedDownloadError) as exc:
            hrnet18(pretrained=True, weights_dir=offline_env)
    msg = _one_line(str(exc.value))
    assert "corrupt" in msg and f"{srv.url}/{name}" in msg and str(offline_env / name) in msg
    assert hashlib.sha256(data).hexdigest()[:8] in msg
    assert list(offline_env.iterdir()) == []  # neither the final file nor a temporary one


def test_server_down_names_url_and_target(offline_env, monkeypatch):
    base = f"http://127.0.0.1:{_free_port()}/w"
    monkeypatch.setenv("ATRC_WEIGHTS_URL_BASE", base)
    with pytest.raises(PretrainedDownloadError) as exc:
        hrnet48(pretrained=True, weights_dir=offline_env)
    msg = _one_line(str(exc.value))
    target = default_weights_path("hrnet48", offline_env)
    assert target.name == "hrnetv2_w48-d2186c55.pth"
    assert f"{base}/{target.name}" in msg and str(target) in msg and "backbone.pretrained=" in msg
    assert not target.exists() and list(offline_env.iterdir()) == []


def test_a_silent_server_times_out_with_one_line(offline_env, monkeypatch):
    """A server that accepts the connection and never answers: the download gives up after
    ``download_timeout`` seconds, says so in one line, and leaves nothing behind."""
    import time

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        monkeypatch.setenv("ATRC_WEIGHTS_URL_BASE", f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(PretrainedDownloadError) as exc:
            hrnet18(pretrained=True, weights_dir=offline_env, download_timeout=0.5)
        waited = time.monotonic() - start
    msg = _one_line(str(exc.value))
    assert "no answer within 0.5 s, backbone.download_timeout" in msg and "backbone.pretrained=" in msg
    assert 0.4 < waited < 10, waited
    assert socket.getdefaulttimeout() is None  # the process's default is restored
    assert list(offline_env.iterdir()) == []


def test_missing_file_on_the_server_is_one_line(offline_env, monkeypatch):
    with _Server({}) as srv:
        monkeypatch.setenv("ATRC_WEIGHTS_URL_BASE", srv.url)
        with pytest.raises(PretrainedDownloadError, match="HTTP Error 404") as exc:
            hrnet18(pretrained=True, weights_dir=offline_env)
    _one_line(str(exc.value))
    assert list(offline_env.iterdir()) == []


def test_atrc_train_offline_pretrained_is_one_line_exit_2(tiny_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ATRC_WEIGHTS_URL_BASE", f"http://127.0.0.1:{_free_port()}")
    over = tiny_overrides(
        tiny_data_dir,
        **{
            "backbone.pretrained": "true",
            "paths.weights_dir": tmp_path / "w",
            "paths.log_dir": tmp_path / "logs",
        },
    )
    code, err = _run_main(over, capsys, monkeypatch)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert (
        "cannot download" in lines[0] and str(tmp_path / "w" / "hrnetv2_w18_small-b5a04e21.pth") in lines[0]
    )


# ------------------------------------------------------------------------------ files that are not weights


def _bad_file(tmp_path: Path, kind: str, suffix: str = ".pth") -> Path:
    path = tmp_path / f"{kind.replace(' ', '_')}{suffix}"
    if kind == "json":
        path.write_text('{"semseg": 1, "note": "not weights"}\n')
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


BAD_KINDS = ["json", "empty", "random bytes"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_not_a_checkpoint_as_backbone_pretrained(tmp_path, kind):
    path = _bad_file(tmp_path, kind)
    with pytest.raises(WeightsError) as exc:
        hrnet18(pretrained=str(path))
    msg = _one_line(str(exc.value))
    assert msg.startswith(str(path)) and "not a" in msg and "expected backbone weights" in msg


def test_not_a_safetensors_file(tmp_path):
    path = _bad_file(tmp_path, "random bytes", ".safetensors")
    with pytest.raises(WeightsError, match=r"not a safetensors file.*expected backbone weights") as exc:
        hrnet18(pretrained=str(path))
    _one_line(str(exc.value))


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_not_a_checkpoint_as_original_weights(tmp_path, kind):
    path = _bad_file(tmp_path, kind, ".ckpt")
    with pytest.raises(WeightsError) as exc:
        load_original_state_dict(torch.nn.Conv2d(3, 4, 1), path)
    msg = _one_line(str(exc.value))
    assert msg.startswith(str(path)) and "expected a Lightning .ckpt" in msg


# ------------------------------------------------------------------------- no implicit unpickling


class _WritesFile:
    """Unpickling this object writes a marker file (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path, how: str):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "os.system":
            return (os.system, (f"touch {self.marker}",))
        return (pathlib.Path.write_text, (self.marker, "pwned"))


def _crafted(tmp_path: Path, how: str = "write_text", with_weights: dict | None = None) -> tuple[Path, Path]:
    marker = tmp_path / f"marker_{how.replace('.', '_')}"
    path = tmp_path / f"crafted_{how.replace('.', '_')}.ckpt"
    torch.save(
        {"state_dict": with_weights or {}, "hyper_parameters": {"args": _WritesFile(marker, how)}}, path
    )
    return path, marker


def _tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))


@pytest.mark.parametrize("how", ["write_text", "os.system"])
def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, how, caplog):
    net = _tiny_net()
    sd = {k: v.clone() + 1 for k, v in net.state_dict().items()}
    path, marker = _crafted(tmp_path, how, sd)
    with pytest.raises(WeightsError) as exc:
        load_original_state_dict(net, path)
    msg = _one_line(str(exc.value))
    assert msg.startswith(f"{path}: refusing to load") and "--trust-checkpoint" in msg
    assert ("posix.system" if how == "os.system" else "pathlib") in msg
    assert not marker.exists()
    assert not torch.equal(net[0].weight, sd["0.weight"])  # nothing loaded
    # the explicit opt-in is a full unpickle (the file's code runs: that is what the warning is about)
    with caplog.at_level("WARNING"):
        load_original_state_dict(net, path, weights_only=False)
    assert marker.exists() and "full unpickle" in caplog.text
    assert torch.equal(net[0].weight, sd["0.weight"])


def _lightning_ckpt(sd: dict, hparams, callbacks=None) -> dict:
    return {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "1.1.8",
        "state_dict": {
            **sd,
            "criterion.weight": torch.ones(2),
            "metrics_dict.semseg.conf": torch.zeros(2, 2),
        },
        "callbacks": callbacks or {},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.9}]}],
        "lr_schedulers": [{"last_epoch": 120, "_last_lr": [0.01]}],
        "hyper_parameters": hparams,
    }


def test_lightning_checkpoint_with_namespace_hparams_loads_without_opt_in(tmp_path):
    net = _tiny_net()
    sd = {k: v.clone() + 1 for k, v in net.state_dict().items()}
    path = tmp_path / "lightning.ckpt"
    torch.save(_lightning_ckpt(sd, {"args": argparse.Namespace(lr=0.01, tasks=["semseg"])}), path)
    report = load_original_state_dict(net, path)
    assert report["dropped"] == ["criterion.weight", "metrics_dict.semseg.conf"]
    assert torch.equal(net[0].weight, sd["0.weight"]) and torch.equal(net[1].running_var, sd["1.running_var"])


def _fake_class(monkeypatch, qualname: str, base: type = object) -> type:
    """A class pickled as ``qualname`` (a package we do not have), registered only while saving."""
    module, name = qualname.rsplit(".", 1)
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        if ".".join(parts[:i]) not in sys.modules:
            monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    cls = type(name, (base,), {"__module__": module})
    monkeypatch.setattr(sys.modules[module], name, cls, raising=False)
    return cls


def test_lightning_checkpoint_with_foreign_hparams_loads_with_inert_stand_ins(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    net = _tiny_net()
    sd = {k: v.clone() - 1 for k, v in net.state_dict().items()}
    with monkeypatch.context() as m:
        attr_dict = _fake_class(m, "pytorch_lightning.utilities.parsing.AttributeDict", dict)
        ns = _fake_class(m, "jsonargparse._namespace.Namespace", argparse.Namespace)
        ckpt_cb = _fake_class(m, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")
        cfg = OmegaConf.create({"lr": 0.01, "tasks": ["semseg", "depth"], "model": {"x": None, "f": 1.5}})
        hp = attr_dict(args=ns(lr=0.01, sub=ns(b=2)), cfg=cfg)
        ckpt = _lightning_ckpt(sd, hp, {ckpt_cb: {"best_model_score": torch.tensor(0.5), "monitor": "val"}})
        ckpt["hparams_type"] = type(cfg)
        path = tmp_path / "foreign.ckpt"
        torch.save(ckpt, path)
    assert "pytorch_lightning" not in sys.modules and "jsonargparse" not in sys.modules
    load_original_state_dict(net, path)
    assert torch.equal(net[0].bias, sd["0.bias"])
    assert "pytorch_lightning" not in sys.modules and "jsonargparse" not in sys.modules  # never imported


def _checkpoint_needing_lightning(tmp_path: Path, sd: dict) -> Path:
    """A Lightning-style checkpoint whose pickle references classes of ``pytorch_lightning`` (not
    installed here): an ``AttributeDict``, callback states keyed by their class, and an object of a
    class that no allow-list knows. The fake modules exist only while it is saved."""

    class _Fake:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    parsing = "pytorch_lightning.utilities.parsing"
    with pytest.MonkeyPatch.context() as m:
        attr_dict = _fake_class(m, f"{parsing}.AttributeDict", dict)
        unknown = _fake_class(m, f"{parsing}.LightningInternals", _Fake)
        ckpt_cb = _fake_class(m, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")
        ckpt = _lightning_ckpt(sd, attr_dict(lr=0.01, internals=unknown(flag=True, steps=[1, 2])))
        ckpt["callbacks"] = {ckpt_cb: {"best_model_score": torch.tensor(0.5), "monitor": "val"}}
        path = tmp_path / "needs_lightning.ckpt"
        torch.save(ckpt, path)
    assert "pytorch_lightning" not in sys.modules
    return path


def test_trusted_checkpoint_loads_without_lightning_installed(tmp_path, caplog):
    """A full unpickle reads classes of modules that cannot be imported as inert stand-ins; without
    the opt-in the file is refused, naming the class the allow-list does not know."""
    net = _tiny_net()
    sd = {k: v.clone() + 2 for k, v in net.state_dict().items()}
    path = _checkpoint_needing_lightning(tmp_path, sd)
    with pytest.raises(WeightsError) as exc:
        load_original_state_dict(net, path)
    msg = _one_line(str(exc.value))
    assert msg.startswith(f"{path}: refusing to load") and "--trust-checkpoint" in msg
    assert "pytorch_lightning.utilities.parsing.LightningInternals" in msg
    assert not torch.equal(net[0].weight, sd["0.weight"])
    with caplog.at_level("WARNING"):
        load_original_state_dict(net, path, weights_only=False)
    assert torch.equal(net[0].weight, sd["0.weight"]) and torch.equal(
        net[1].running_mean, sd["1.running_mean"]
    )
    assert (
        "pytorch_lightning.utilities.parsing.LightningInternals" in caplog.text and "stand-in" in caplog.text
    )
    assert "pytorch_lightning" not in sys.modules
    # what the stand-ins hold: the pickled state, nothing run
    obj = read_checkpoint(path, "a checkpoint", weights_only=False)
    hp = obj["hyper_parameters"]
    assert hp["lr"] == 0.01 and hp["internals"].flag is True and hp["internals"].steps == [1, 2]
    assert [c.original for c in obj["callbacks"]] == [
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    ]


@pytest.mark.parametrize("kind", ["torch", "safetensors"])
def test_truncated_file_is_called_truncated(tmp_path, kind):
    net = _tiny_net()
    path = tmp_path / ("weights.ckpt" if kind == "torch" else "weights.safetensors")
    if kind == "torch":
        torch.save({"state_dict": net.state_dict()}, path)
    else:
        from safetensors.torch import save_file

        save_file(net.state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    for trust in (False, True):
        with pytest.raises(WeightsError) as exc:
            read_checkpoint(path, "a checkpoint", weights_only=not trust)
        msg = _one_line(str(exc.value))
        assert msg.startswith(f"{path}: truncated") and "again" in msg, msg
        assert "central directory" not in msg and "zip" not in msg
    path.write_bytes(data)  # whole again: it loads
    assert len(read_checkpoint(path, "a checkpoint")) > 0


def test_truncated_run_checkpoint_is_called_truncated(tmp_path):
    """Resuming from a run checkpoint with a truncated file names that file (not miniz's error)."""
    from accelerate import Accelerator

    from atrc_exp.engine import reset_accelerate_state
    from atrc_exp.engine.checkpoint import load_checkpoint, save_checkpoint

    reset_accelerate_state()
    acc = Accelerator(cpu=True)
    acc.prepare(_tiny_net())
    ckpt = save_checkpoint(acc, tmp_path, step=3, keep=1)
    model_file = next(p for p in ckpt.iterdir() if p.name.startswith("pytorch_model"))
    model_file.write_bytes(model_file.read_bytes()[:100])
    with pytest.raises(WeightsError) as exc:
        load_checkpoint(acc, ckpt)
    assert _one_line(str(exc.value)).startswith(f"{model_file}: truncated")
    reset_accelerate_state()


# ------------------------------------------------------------------------------- entry points: exit 2


def _error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("kind", [*BAD_KINDS, "crafted"])
def test_atrc_eval_weights_file_is_one_line_exit_2(tmp_path, capsys, kind):
    if kind == "crafted":
        path, marker = _crafted(tmp_path, "os.system")
    else:
        path, marker = _bad_file(tmp_path, kind, ".ckpt"), None
    assert eval_main([str(path), "--cpu", "--out", str(tmp_path / "out")]) == 2
    line = _error_line(capsys.readouterr().err)
    assert str(path) in line
    assert ("refusing to load" if kind == "crafted" else "expected a Lightning .ckpt") in line
    assert marker is None or not marker.exists()
    assert not (tmp_path / "out").exists()


def test_atrc_eval_trust_checkpoint_is_the_opt_in(tmp_path, capsys, monkeypatch):
    # atrc-eval's logging.basicConfig must write to this test's stderr, not an earlier test's closed one
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    path, marker = _crafted(tmp_path, "write_text")
    assert eval_main([str(path), "--cpu", "--trust-checkpoint"]) == 2  # empty state dict: does not fit
    err = capsys.readouterr().err
    assert marker.exists() and "full unpickle" in err
    assert "missing key" in _error_line(err)


@pytest.mark.parametrize("kind", [*BAD_KINDS, "crafted"])
def test_atrc_predict_run_file_is_one_line_exit_2(tmp_path, capsys, kind):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    cv2.imwrite(str(imgs / "a.png"), np.zeros((32, 32, 3), np.uint8))
    if kind == "crafted":
        path, marker = _crafted(tmp_path, "write_text")
    else:
        path, marker = _bad_file(tmp_path, kind, ".ckpt"), None
    argv = ["--run", str(path), "--images", str(imgs), "--out", str(tmp_path / "preds"), "--cpu"]
    assert predict_main(argv) == 2
    line = _error_line(capsys.readouterr().err)
    assert str(path) in line
    assert ("refusing to load" if kind == "crafted" else "expected a Lightning .ckpt") in line
    assert marker is None or not marker.exists()
    assert not (tmp_path / "preds").exists()


@pytest.mark.parametrize(
    "key,kind",
    [
        ("backbone.pretrained", "json"),
        ("backbone.pretrained", "empty"),
        ("backbone.pretrained", "random bytes"),
        ("backbone.pretrained", "crafted"),
        ("trainer.init_from_original", "json"),
        ("trainer.init_from_original", "empty"),
        ("trainer.init_from_original", "random bytes"),
        ("trainer.init_from_original", "crafted"),
    ],
)
def test_atrc_train_weights_file_is_one_line_exit_2(tiny_data_dir, tmp_path, capsys, monkeypatch, key, kind):
    if kind == "crafted":
        path, marker = _crafted(tmp_path, "os.system")
    else:
        path, marker = _bad_file(tmp_path, kind), None
    over = tiny_overrides(tiny_data_dir, **{key: path, "paths.log_dir": tmp_path / "logs"})
    code, err = _run_main(over, capsys, monkeypatch)
    assert code == 2, err
    line = _error_line(err)
    assert str(path) in line
    if kind == "crafted":
        assert "refusing to load" in line and not marker.exists()
    else:
        assert re.search(r"not a (PyTorch )?checkpoint", line) and "expected" in line, line
