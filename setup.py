"""Packaging hook: ship the top-level data folders inside the package.

The repository keeps ``conf/``, ``genotypes/`` and ``kernels/`` at its top level. A built package
(wheel, or ``pip install .``) carries them as ``atrc_exp/conf``, ``atrc_exp/genotypes`` and
``atrc_exp/kernels``, where :func:`atrc_exp.config.resource_dir` finds them. An editable install
(``pip install -e .``, ``make install``) copies nothing: the package then reads the checkout's
folders. Everything else is in ``pyproject.toml``; ``MANIFEST.in`` puts the folders in the sdist.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PACKAGE = "atrc_exp"
#: top-level folders copied into the package (keep in sync with atrc_exp.config.RESOURCE_DIRS)
DATA_DIRS = ("conf", "genotypes", "kernels")
_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = {".pyc", ".pyo", ".so", ".o"}


def _data_files() -> list[tuple[Path, Path]]:
    """``(source, path relative to the package)`` of every file of :data:`DATA_DIRS`.

    The folders are read from the source tree (a checkout, or an unpacked sdist that has them
    through ``MANIFEST.in``); a missing folder is an error, not a silently smaller package."""
    files = []
    for name in DATA_DIRS:
        top = ROOT / name
        if not top.is_dir():
            raise FileNotFoundError(f"{top} is missing: build atrc_exp from a checkout or its sdist")
        for src in sorted(top.rglob("*")):
            rel = src.relative_to(ROOT)
            if (
                src.is_file()
                and not any(part in _SKIP_DIRS or part.startswith(".") for part in rel.parts)
                and src.suffix not in _SKIP_SUFFIXES
            ):
                files.append((src, rel))
    return files


class BuildPyWithData(build_py):
    """``build_py`` that also copies :data:`DATA_DIRS` into ``<build_lib>/atrc_exp/`` (not in
    editable mode: an editable install reads the checkout's folders)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        for src, rel in _data_files():
            dst = Path(self.build_lib) / PACKAGE / rel
            self.mkpath(str(dst.parent))
            self.copy_file(str(src), str(dst), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs += [str(Path(self.build_lib) / PACKAGE / rel) for _, rel in _data_files()]
        return outputs


setup(cmdclass={"build_py": BuildPyWithData})
