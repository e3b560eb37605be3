"""The dataset layouts: one row per published folder layout (``dataset.layout`` in conf/dataset/).

:data:`LAYOUTS` maps the layout name (also the folder under ``paths.data_dir``) to a
:class:`Layout`: the reader class and everything else that differs between layouts — the reader's
extra keyword arguments from the config, what ``atrc-data check`` / ``fetch`` / ``synth`` need
(split-list folder, published sizes, the archive, the synthetic writer). Nothing else in the
package branches on a layout name.

Adding a layout: README "A dataset".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..errors import ConfigError
from .folder import FolderDataset
from .nyud import NYUD_TASK_FILES, NYUDMT
from .pascal import PASCALMT, _loadmat, person_parts
from .synthetic import _check_args, ensure_layout_files, write_nyud_files, write_pascal_files
from .synthetic_folder import write_folder_files


@dataclass(frozen=True)
class Archive:
    """The original archive of a layout (``atrc-data fetch``); it unpacks to ``<layout>/``."""

    dataset: str  #: the ``--dataset`` name of ``atrc-data fetch`` (= the conf/dataset/ of the real data)
    url: str
    sha256: str | None = None  #: None: unknown (``fetch`` prints the digest it computed instead)
    size: int | None = None  #: bytes; None: unknown

    @property
    def file(self) -> str:
        """The archive's file name (the last part of the URL)."""
        return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Layout:
    """One dataset layout; the key in :data:`LAYOUTS` is its folder name under ``paths.data_dir``."""

    #: ``reader(data_dir, split, tasks, transform=None, **reader_kwargs(cfg))``.
    reader: type
    #: The reader's layout-specific keyword arguments from the composed config.
    reader_kwargs: Callable[[DictConfig], dict[str, Any]]
    #: Folder of the split lists ``<split>.txt``, relative to the layout folder.
    split_dir: str
    #: Tasks ``atrc-data check`` loads from every image.
    check_tasks: tuple[str, ...]
    #: Semseg classes and split sizes of the published dataset (``atrc-data check``).
    semseg_classes: int
    split_sizes: Mapping[str, int]
    archive: Archive | None
    #: Writes the synthetic dataset: ``write(dest, n_train, n_val, height, width, seed, progress)``.
    write_synthetic: Callable[..., None]
    #: The conf/dataset/ name of the synthetic dataset in this layout.
    synthetic_dataset: str
    #: An extra per-image check of ``atrc-data check``: ``fn(reader, index, raw sample)``; raises
    #: :class:`~atrc_exp.data.nyud.DataError`.
    check_image: Callable[[Any, int, dict], None] | None = None
    #: Appended to ``check``'s "no valid normals pixel" problem (what to look at).
    normals_note: str = ""
    #: ``val_size(val_reader, crop_size) -> (H, W)``: the size validation samples are padded to.
    val_size: Callable[[Any, Any], tuple[int, int]] = lambda reader, crop: (int(crop[0]), int(crop[1]))


def _semseg_classes(cfg: DictConfig) -> dict[str, Any]:
    """The published layouts' ``semseg`` class count, from the dataset's task spec."""
    spec = cfg.dataset.task_specs.get("semseg")
    if spec is None:
        return {}
    return {"num_classes": int(spec.classes) if isinstance(spec.classes, int) else len(spec.classes)}


def _pascal_kwargs(cfg: DictConfig) -> dict[str, Any]:
    valid = cfg.dataset.get("normals_valid_classes", None)
    return {
        **_semseg_classes(cfg),
        "normals_valid_classes": None if valid is None else [int(c) for c in valid],
        "cache_dir": Path(str(cfg.paths.cache_dir)),
    }


def _check_person_parts(reader: PASCALMT, index: int, sample: dict) -> None:
    """Decode the image's Pascal-Part annotation (``human_parts`` is not among the checked tasks:
    loading it builds the person look-up of the whole split)."""
    p = reader.root / "human_parts" / f"{reader.names[index]}.mat"
    person_parts(_loadmat(p, reader.split_file), p, sample["image"].shape[:2])


_MTL = "https://data.vision.ee.ethz.ch/kmaninis/share/MTL"

#: Layout name (folder under ``paths.data_dir``) -> :class:`Layout`.
LAYOUTS: dict[str, Layout] = {
    "NYUD_MT": Layout(
        reader=NYUDMT,
        reader_kwargs=_semseg_classes,
        split_dir="gt_sets",
        check_tasks=tuple(NYUD_TASK_FILES),
        semseg_classes=40,
        split_sizes={"train": 795, "val": 654},
        archive=Archive("nyud", f"{_MTL}/NYUD_MT.tgz"),
        write_synthetic=write_nyud_files,
        synthetic_dataset="synthetic",
    ),
    "PASCAL_MT": Layout(
        reader=PASCALMT,
        reader_kwargs=_pascal_kwargs,
        split_dir="ImageSets/Context",
        check_tasks=("semseg", "sal", "normals", "edge"),
        semseg_classes=21,
        split_sizes={"train": 4998, "val": 5105},
        archive=Archive("pascal_context", f"{_MTL}/PASCAL_MT.tgz"),
        write_synthetic=write_pascal_files,
        synthetic_dataset="synthetic_pascal",
        check_image=_check_person_parts,
        normals_note=(
            "they are kept only on the LabelMap classes of the original's normals list: "
            "do the pascal-context/trainval/*.mat files hold the 459-class LabelMap?"
        ),
    ),
    # your own data (README "Train on your own data"): dataset.root is the folder itself, its
    # atrc_dataset.yaml names the tasks; `atrc-data check <dir>` validates it (data/folder.py)
    "folder": Layout(
        reader=FolderDataset,
        reader_kwargs=lambda cfg: {},
        split_dir="splits",
        check_tasks=(),
        semseg_classes=0,
        split_sizes={},
        archive=None,
        write_synthetic=write_folder_files,
        synthetic_dataset="folder",
        val_size=lambda reader, crop: reader.padded_size(32),
    ),
}


def get_layout(name: str, where: str = "") -> Layout:
    """The row of layout ``name``; a :class:`~atrc_exp.config.ConfigError` listing the known
    layouts if there is none (``where`` prefixes the message, e.g. ``"dataset=nyud: "``)."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ConfigError(
            f"{where}unknown dataset layout {name!r}; known layouts: {', '.join(LAYOUTS)}. Set "
            f"dataset.layout to one of them, or add a row to atrc_exp.data.layouts.LAYOUTS"
        ) from None


def layout_for_name(s: str) -> str:
    """The layout meant by ``s``: a layout name (any case), a fetch dataset name (``nyud``,
    ``pascal_context``), a synthetic dataset name (``synthetic_pascal``) or a prefix of those names
    that only one layout has (``pascal``). :class:`~atrc_exp.config.ConfigError` otherwise."""
    names = {
        k: {k.lower(), v.synthetic_dataset} | ({v.archive.dataset} if v.archive else set())
        for k, v in LAYOUTS.items()
    }
    t = s.lower()
    exact = [k for k, ns in names.items() if t in ns]
    found = exact or [k for k, ns in names.items() if any(n.startswith(t) for n in ns)]
    if len(found) == 1:
        return found[0]
    raise ConfigError(
        f"unknown layout {s!r}: use one of {', '.join(LAYOUTS)}"
        + (f" ({s!r} could be any of {', '.join(found)})" if found else "")
    )


def ensure_synthetic_dataset(
    root: str | Path,
    *,
    n_train: int,
    n_val: int,
    height: int,
    width: int,
    seed: int,
    progress=True,
    layout="NYUD_MT",
) -> Path:
    """Make sure ``root/<layout>`` (a key of :data:`LAYOUTS`, written by its
    ``write_synthetic``) holds the synthetic dataset with these parameters; return ``root``.

    Does nothing when the manifest matches; raises ``ValueError`` when it differs, when
    ``root/<layout>`` is not synthetic or the layout is unknown (a ``ConfigError``). Generation
    holds ``root/.synthetic.lock``, writes into ``root/.<layout>.tmp-<pid>`` and renames it into
    place, so concurrent callers (several ranks or jobs sharing ``root``) end up with one complete
    dataset and readers never see a partial one.
    """
    _check_args(n_train, n_val, height, width)
    writer = get_layout(layout).write_synthetic
    ensure_layout_files(Path(root), layout, writer, n_train, n_val, height, width, seed, progress=progress)
    return Path(root)
