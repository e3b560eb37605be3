"""Packaging: the sdist and wheel carry conf/, genotypes/, kernels/ and the package data, the build is
warning-free, and an installed wheel (not the checkout) trains, composes and builds its kernels."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, tiny_overrides

DATA_DIRS = ("conf", "genotypes", "kernels")
# never copied into the build tree (outputs, caches, environments)
_IGNORED = {".git", ".venv", "build", "dist", "outputs", "multirun", "wandb", "__pycache__"}


def _ignore(_dir: str, names: list[str]) -> set[str]:
    return {n for n in names if n in _IGNORED or n.endswith((".egg-info", "_cache")) or n.endswith(".pyc")}


def _repo_data_files() -> list[str]:
    """Every file of the top-level data folders, as its path inside the wheel."""
    out = []
    for name in DATA_DIRS:
        for p in sorted((REPO / name).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                out.append("atrc_exp/" + p.relative_to(REPO).as_posix())
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """sdist and wheel of a copy of the checkout (``python -m build --no-isolation``: the sdist, then
    the wheel from the unpacked sdist, as pip installs it), offline; the build log."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=_ignore)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH")}
    env["PIP_NO_INDEX"] = "1"  # nothing is downloaded
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"), str(src)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, (
        f"python -m build failed (install the dev extra: pip install -e '.[dev]'):\n{log}"
    )
    wheels = list((tmp / "dist").glob("atrc_exp-*.whl"))
    sdists = list((tmp / "dist").glob("atrc_exp-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, log
    return {"wheel": wheels[0], "sdist": sdists[0], "log": log, "tmp": tmp}


def test_wheel_carries_data_folders_and_resources(built):
    names = set(zipfile.ZipFile(built["wheel"]).namelist())
    expected = _repo_data_files()
    assert "atrc_exp/conf/train.yaml" in expected
    assert any(n.startswith("atrc_exp/conf/") and n.count("/") >= 3 for n in expected)  # group files
    assert {f"atrc_exp/genotypes/{g}" for g in ("nyud_hrnet18.json", "pascal_hrnet18.json")} <= set(expected)
    assert "atrc_exp/kernels/local_attention_cpu.cpp" in expected
    expected += [
        "atrc_exp/" + p.relative_to(REPO / "atrc_exp").as_posix()
        for p in sorted((REPO / "atrc_exp" / "resources").glob("*.json"))
    ]
    expected.append("atrc_exp/py.typed")  # type checkers read the package's hints (PEP 561)
    expected += [
        p.relative_to(REPO).as_posix()
        for p in sorted((REPO / "atrc_exp").rglob("*.py"))
        if "__pycache__" not in p.parts
    ]
    missing = sorted(set(expected) - names)
    assert not missing, f"the wheel lacks {missing}"
    assert not any(n.startswith(("conf/", "genotypes/", "kernels/", "tests/")) for n in names)
    # the wheel's copies are byte-identical to the checkout's
    with zipfile.ZipFile(built["wheel"]) as zf:
        for rel in ("conf/train.yaml", "genotypes/nyud_hrnet18.json", "kernels/local_attention_cpu.cpp"):
            assert zf.read(f"atrc_exp/{rel}") == (REPO / rel).read_bytes()


def test_sdist_carries_data_folders(built):
    with tarfile.open(built["sdist"]) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    expected = [n.removeprefix("atrc_exp/") for n in _repo_data_files()]
    expected += ["setup.py", "pyproject.toml", "README.md", "MANIFEST.in"]
    missing = sorted(set(expected) - names)
    assert not missing, f"the sdist lacks {missing}"


def test_build_is_warning_free(built):
    bad = [line for line in built["log"].splitlines() if re.search(r"(?i)warning|deprecat", line)]
    assert not bad, "the build warns:\n" + "\n".join(bad)


def test_wheel_metadata_dependency_ranges(built):
    with zipfile.ZipFile(built["wheel"]) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = zf.read(meta_name).decode()
    assert re.search(r"^License-Expression: MIT$", meta, re.M), meta[:800]
    requires = re.findall(r"^Requires-Dist: (.*)$", meta, re.M)
    runtime = [r for r in requires if "extra ==" not in r]
    for name in ("torch", "torchvision"):
        spec = next((r for r in runtime if re.match(rf"{name}\s*[<>=!~]", r)), None)
        assert spec is not None and ">=" in spec and "==" not in spec, f"{name}: {spec!r}"
    assert not any(r.startswith("torchmetrics") for r in runtime), "torchmetrics is test-only (dev extra)"
    dev = [r for r in requires if 'extra == "dev"' in r]
    for name in ("torchmetrics", "pytest", "ruff", "build"):
        assert any(r.startswith(name) for r in dev), f"{name} not in the dev extra: {dev}"


def _venv_with_wheel(tmp: Path, wheel: Path) -> Path:
    """A fresh virtual environment with the wheel installed (no deps); the dependencies come from the
    test's own environment through a ``.pth`` line naming its site-packages (not the checkout, and
    without its editable-install finder, which lives in a ``.pth`` file that is not processed)."""
    venv = tmp / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(purelib) / "zz_atrc_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


@pytest.mark.slow
def test_installed_wheel_trains_and_composes_outside_checkout(built, tiny_data_dir, tmp_path):
    venv = _venv_with_wheel(tmp_path, built["wheel"])
    work = tmp_path / "elsewhere"  # an unrelated working directory: no conf/, genotypes/, kernels/
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ATRC_KERNELS_DIR")}
    # a private extension cache: the installed sources have other paths than the checkout's, and
    # a build shared with the checkout's (same key) would make ninja recompile both in turn
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), WANDB_MODE="offline", OMP_NUM_THREADS="2")
    site = (venv / "lib").resolve()

    probe = (
        "import sys, atrc_exp\n"
        "from atrc_exp.config import CONF_DIR\n"
        "from atrc_exp.models.genotype import resolve_genotype_path\n"
        "from atrc_exp.ops.build import KERNELS_DIR\n"
        "cfg = atrc_exp.compose(['context=atrc', 'context.genotype=genotypes/nyud_hrnet18.json'])\n"
        "import json\n"
        "print(json.dumps({'file': atrc_exp.__file__, 'conf': str(CONF_DIR), 'kernels': str(KERNELS_DIR),\n"
        "    'genotype': str(resolve_genotype_path(cfg.context.genotype)), 'ctx': cfg.context.name,\n"
        "    'cache': cfg.paths.cache_dir, 'path': sys.path}))\n"
    )
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], cwd=work, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("file", "conf", "kernels", "genotype"):
        assert Path(got[key]).resolve().is_relative_to(site), f"{key}: {got[key]} is not the installed copy"
    assert got["ctx"] == "atrc" and got["cache"]
    assert not any(Path(p).resolve() == REPO.resolve() for p in got["path"] if p)

    run_dir = tmp_path / "run"
    cmd = [
        str(venv / "bin" / "atrc-train"),
        *tiny_overrides(tiny_data_dir, **{"trainer.max_steps": 2, "trainer.cpu": "true"}),
        "context=local",
        "ops.local_attention.backend=cpp",  # the C++ kernel or an error: no silent fallback
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["metrics"]
    # the kernel was compiled from the installed package's kernels/
    ninja = list((tmp_path / "ext" / "atrc_exp").glob("local_attention_cpp-*/build.ninja"))
    assert ninja, "the local-attention kernel was not built"
    sources = re.findall(r"^build \S+\.o: compile (\S+)$", ninja[0].read_text(), re.M)
    assert sources
    assert all(Path(s).resolve().is_relative_to(site) and "/atrc_exp/kernels/" in s for s in sources), sources
