"""One command's model, opened once and passed on: the source (its shard headers read once), its architecture,
its statistics (read once) and the local errors they hold. Planning, the sensitivity cache, the probes and the
conversion take it instead of opening the paths again."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ggufmoe.arch import Architecture, architecture_for
from ggufmoe.source import open_source
from ggufmoe.stats.file import Stats, load_stats
from ggufmoe.stats.local_errors import LocalErrors, local_errors
from ggufmoe.stats.probe_results import KEY as PROBES_KEY, StreamedProbes


@dataclass
class OpenedModel:
    source: object  # an opened source (ggufmoe.source.open_source)
    arch: Architecture
    stats: Stats | None = None
    stats_path: Path | None = None  # where ``stats`` was read, and where a sensitivity cache is written

    @classmethod
    def open(cls, path: str | Path | OpenedModel, stats_path: str | Path | None = None,
             config_ok: bool = True) -> OpenedModel:
        """``path`` opened (an opened model is taken as it is, its statistics read if it has none yet)."""
        if isinstance(path, OpenedModel):
            model = path
        else:
            source = open_source(path, config_ok=config_ok)
            model = cls(source, architecture_for(source))
        if stats_path is not None and model.stats_path != Path(stats_path):
            model.stats = load_stats(stats_path, top_k=model.arch.top_k)
            model.stats_path = Path(stats_path)
        return model

    @property
    def path(self) -> Path:
        return self.source.path

    @functools.cached_property
    def local(self) -> LocalErrors | None:
        """The local errors the statistics hold (None without statistics or local errors)."""
        return local_errors(self.stats) if self.stats is not None else None

    @functools.cached_property
    def probes(self) -> StreamedProbes | None:
        """The end-to-end probes the streamed calibration carried (None without statistics or probes)."""
        raw = self.stats.extras.get(PROBES_KEY) if self.stats is not None else None
        return StreamedProbes.from_json(raw) if raw else None
