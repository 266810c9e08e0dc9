"""What `sjea embed` is asked to do, as one value checked once: `EmbedRequest` (and `RayOptions`).

    req = EmbedRequest("photos/", "photos.h5", run="runs/tiny", batch_size=64)
    sjea_tools.engines.run_embed(req)                                    # local, torchrun or Ray
    EmbedRequest("photos/", "photos.h5", engine="ray", ray=RayOptions(partitions=8))

Built by the CLI (or by the keyword forms embed_folder / pipeline.embed_and_index), it travels
unchanged through the engine to the runner; a shard or Ray task gets a copy (dataclasses.replace),
re-checked on the way. Checks that need the file system (OUT a folder, the model's files) or the
scan (--partitions against the image count) stay where that is at hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import SjeaError
from ..store import parse_shard

DTYPES = ("float32", "float16")
ENGINES = ("local", "ray")
# Seconds between durable commits of the journal: at most this much work is redone after a kill.
COMMIT_EVERY_S = 2.0


@dataclass(frozen=True)
class RayOptions:
    """--engine ray's own options; None: the engine's default (see engines.ray.embed_with_ray)."""

    partitions: int | None = None
    address: str | None = None
    cpus_per_task: float | None = None  # None: 1
    gpus_per_task: float | None = None  # None: 1 when the cluster has a GPU, else 0

    FLAGS = {"partitions": "--partitions", "address": "--ray-address", "cpus_per_task": "--ray-cpus",
             "gpus_per_task": "--ray-gpus"}

    def given(self) -> list[str]:
        """The command-line names of the options set, in declaration order."""
        return [self.FLAGS[f.name] for f in fields(self) if getattr(self, f.name) is not None]


@dataclass(frozen=True)
class EmbedRequest:
    """Embed `images` (a folder, a list file or one image) into the store `out`, then index it
    unless index=False. The fields are `sjea embed`'s options, under their library names."""

    images: Path
    out: Path
    run: Path | None = None
    onnx: Path | None = None
    levels: Any = None  # parse_levels' forms: None/"all", 1, "0,1", [0, 1]; resolved against the model
    batch_size: int = 256
    workers: int | None = None  # None: reader.default_workers(), or the Ray task's CPUs minus one
    device: str = "cpu"
    backend: str = "auto"
    dtype: str = "float32"
    normalize: bool = True
    whiten: bool = True  # False: rows centred only, even with a model that whitens (faster ANN at scale)
    shard: tuple[int, int] | None = None  # "I/N" or (I, N) given, (I, N) kept
    update: bool = False
    keep_missing: bool = False  # --update keeps the rows of files gone from the folder
    overwrite: bool = False
    commit_every_s: float = COMMIT_EVERY_S
    follow_symlinks: bool = False
    allow_outside: bool = False
    index: bool = True
    engine: str = "local"
    ray: RayOptions | None = None

    def __post_init__(self) -> None:
        # frozen: the given forms are normalised once, here
        object.__setattr__(self, "images", Path(self.images))
        object.__setattr__(self, "out", Path(self.out))
        self._check_engine()  # first: a misplaced engine option is the likelier mistake
        object.__setattr__(self, "shard", parse_shard(self.shard))
        self._check_values()

    def _check_values(self) -> None:
        if self.dtype not in DTYPES:
            raise SjeaError(f"--dtype must be float32 or float16, not '{self.dtype}'.")
        if not _whole(self.batch_size) or self.batch_size < 1:
            raise SjeaError(f"--batch-size must be a whole number of at least 1 (got {self.batch_size}).")
        if self.workers is not None and (not _whole(self.workers) or self.workers < 0):
            raise SjeaError(f"--workers must be 0 (decode in this process) or more (got {self.workers}).")
        if not _number(self.commit_every_s) or self.commit_every_s < 0:
            raise SjeaError(f"--commit-every must be a finite number of seconds >= 0 (got {self.commit_every_s}); 0 "
                            "commits after every batch.")
        if self.update and self.overwrite:
            raise SjeaError("pass --update (bring the store up to date with the folder) or --overwrite (replace the "
                            "store), not both.")
        if self.keep_missing and not self.update:
            raise SjeaError("--keep-missing applies to --update (keep the rows of files gone from the folder); add "
                            "--update or leave it out.")

    def _check_engine(self) -> None:
        if self.engine not in ENGINES:
            raise SjeaError(f"--engine must be {' or '.join(ENGINES)}, not '{self.engine}'.")
        given = self.ray.given() if self.ray is not None else []
        if self.engine != "ray":
            if given:
                raise SjeaError(f"{given[0]} applies to --engine ray; add --engine ray or leave {given[0]} out.")
            return
        if self.update:
            raise SjeaError("--update runs on the plain engine only: add images to an existing store without "
                            "--engine ray, or embed into a new OUT.")
        if self.shard is not None:
            raise SjeaError("--shard and --engine ray do not combine: the engine splits the images into "
                            "--partitions shards itself.")
        ray = self.ray or RayOptions()
        for flag, value in (("--ray-cpus", ray.cpus_per_task), ("--ray-gpus", ray.gpus_per_task)):
            if value is not None and (not _number(value) or value < 0):
                raise SjeaError(f"{flag} must be a number >= 0 (got {value}).")
        if ray.cpus_per_task is not None and ray.cpus_per_task <= 0:
            raise SjeaError(f"--ray-cpus must be more than 0 (got {ray.cpus_per_task}); each task runs a model.")


def _whole(v) -> bool:
    return isinstance(v, int)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
