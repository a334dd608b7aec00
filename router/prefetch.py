"""Everything a config needs from disk or the network, fetched before anything is deployed.

``router serve`` calls :func:`prefetch` before it starts Ray, so that a missing dataset is one
clear error on the user's terminal instead of a failed deployment whose cause sits in Ray's log
files. The carbon sources' registered datasets are downloaded into the user cache (see
:mod:`forecasting.datasets`); local files (a source's ``path``, a region's price ``csv``) are
checked to exist; the ML.ENERGY tables the GPU energy prior fits on ship with the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from forecasting.datasets import dataset_path, zone_file
from forecasting.errors import DatasetError
from regions.config import Config, FileCarbon
from router.errors import RouterError


class MissingInputError(RouterError):
    """A file the config needs is neither on disk nor downloadable."""


@dataclass(frozen=True)
class Need:
    """One file a config needs: a registered dataset (``dataset``) or a local ``path``."""

    why: str  # e.g. "carbon source 'replay', zone SE"
    dataset: str | None = None
    path: Path | None = None


def needs(cfg: Config, base_dir: Path) -> list[Need]:
    out: list[Need] = []
    for name, spec in cfg.carbon_sources.items():
        if not isinstance(spec, FileCarbon):  # live APIs: nothing to fetch ahead
            continue
        zones = sorted({r.zone for r in cfg.regions if r.carbon_source == name})
        for zone in zones:
            why = f"carbon source {name!r}, zone {zone}"
            if spec.dataset:
                out.append(Need(why, dataset=zone_file(spec.dataset, zone)))
            else:
                out.append(Need(why, path=_local(str(spec.path).format(zone=zone), base_dir)))
    for region in cfg.regions:
        if region.price.csv:
            why = f"region {region.name!r} price"
            out.append(Need(why, path=_local(region.price.csv, base_dir)))
    return out


def prefetch(cfg: Config, base_dir: Path) -> list[Path]:
    """Local paths of everything ``cfg`` needs, downloading registered datasets not yet cached.

    Raises :class:`MissingInputError` (one line: what, why, from where, how to supply it) at
    the first file that cannot be had."""
    paths: list[Path] = []
    for need in needs(cfg, base_dir):
        if need.dataset is not None:
            try:
                paths.append(dataset_path(need.dataset))
            except DatasetError as e:
                raise MissingInputError(f"{need.why}: {e}") from e
        else:
            assert need.path is not None
            if not need.path.is_file():
                raise MissingInputError(
                    f"{need.why} needs {need.path}, which does not exist; fix the path in the "
                    "config (relative paths are read from the config file's folder)"
                )
            paths.append(need.path)
    return paths


def _local(path: str, base_dir: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base_dir / p
