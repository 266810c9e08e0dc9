"""The stacked model: level 0 encodes images, level k encodes the output of level k-1.

`forward_levels(images)` gives the representations Y[0..N-1] in one pass (what users embed);
`forward_train(images)` also gives the embeddings Z[0..N-1] that the VICReg losses compare.
`freeze(n)` fixes levels 0..n-1 (sjea train --from): they run forward only, in eval mode. Level 0
may be a frozen ONNX graph (onnx_level.OnnxLevel), rebuilt from the bytes the loaded state holds.
`set_centres` records each level's mean representation and whitening matrix (computed at the end
of training, sjea_tools.trainers.centring) as buffers `centre_K` and `whiten_K`, so model.pt
carries them; the forward pass never uses them (level k+1 reads level k's raw Y): only what is
embedded is centred and whitened (embed.backends.Embedder, vectors.centre_and_normalize). A model
without means is "not centred"; a level without a matrix is centred only.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..config import ONNX_BACKBONE, RunConfig
from ..levels import parse_levels
from ..spec import PreprocessSpec, ReadsPreprocessSpec
from .heads import MLPEncoder, projector
from .onnx_level import OnnxLevel, graph_bytes
from .registry import create_backbone
from .resnet import VectorResNet


CENTRE_PREFIX = "centre_"  # buffer names centre_0, centre_1, ... in model.pt's state_dict
WHITEN_PREFIX = "whiten_"  # whiten_0, ...: a (dim_K, dim_K) matrix, only for whitened levels


def resolve_stem(cfg: RunConfig) -> str:
    if cfg.model.stem != "auto":
        return cfg.model.stem
    return "small" if cfg.image_size <= 64 else "standard"


class StackedModel(nn.Module, ReadsPreprocessSpec):
    def __init__(self, cfg: RunConfig):
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        stem = resolve_stem(cfg)
        if m.backbone == ONNX_BACKBONE:  # a frozen graph: built when a state holding it is loaded
            backbone, dim = OnnxLevel(m.level0_dim, cfg.train.from_output), m.level0_dim
        else:
            backbone, dim = create_backbone(m.backbone, stem=stem, in_channels=3)
        encoders: list[nn.Module] = [backbone]
        projectors = [projector(dim, m.projector, m.projector_last_bias)]
        dims = [dim]
        for _ in range(1, m.levels):
            in_dim = dims[-1] if m.level_input == "representation" else projectors[-1][-1].out_features
            enc = VectorResNet(in_dim, stem) if m.encoder == "resnet" else MLPEncoder(in_dim, m.mlp_dims)
            encoders.append(enc)
            projectors.append(projector(enc.out_dim, m.projector, m.projector_last_bias))
            dims.append(enc.out_dim)
        self.encoders = nn.ModuleList(encoders)
        self.projectors = nn.ModuleList(projectors)
        self.level_dims: list[int] = dims
        self.embedding_dims: list[int] = [p[-1].out_features for p in projectors]
        self.frozen_levels = 0

    def freeze(self, levels: int) -> None:
        """Fix levels 0..levels-1: no gradients (so no optimiser state), BatchNorm statistics kept
        (eval mode, whatever train() asks), forward under no_grad, and no Z (no loss) in training."""
        self.frozen_levels = levels
        for k in range(levels):
            self.encoders[k].requires_grad_(False)
            self.projectors[k].requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for k in range(self.frozen_levels):
            self.encoders[k].eval()
            self.projectors[k].eval()
        return self

    def set_centres(self, centres, whitenings=None) -> None:
        """Record one mean representation per level (a (dim_K,) tensor each) and, optionally, one
        whitening matrix per level ((dim_K, dim_K) or None), or drop them all (centres None)."""
        for k in range(self.num_levels):
            self._buffers.pop(f"{WHITEN_PREFIX}{k}", None)
            if centres is None:
                self._buffers.pop(f"{CENTRE_PREFIX}{k}", None)
        if centres is None:
            return
        centres = list(centres)
        whitenings = [None] * self.num_levels if whitenings is None else list(whitenings)
        if len(centres) != self.num_levels or len(whitenings) != self.num_levels:
            raise ValueError(f"{len(centres)} centres and {len(whitenings)} whitenings for a model of "
                             f"{self.num_levels} levels")
        device = next(self.parameters()).device
        for k, (c, w) in enumerate(zip(centres, whitenings)):
            d = self.level_dims[k]
            c = torch.as_tensor(c, dtype=torch.float32).detach().reshape(-1)
            if c.shape[0] != d:
                raise ValueError(f"level {k}'s centre has width {c.shape[0]}, not {d}")
            self.register_buffer(f"{CENTRE_PREFIX}{k}", c.clone().to(device))
            if w is not None:
                w = torch.as_tensor(w, dtype=torch.float32).detach()
                if tuple(w.shape) != (d, d):
                    raise ValueError(f"level {k}'s whitening has shape {tuple(w.shape)}, not ({d}, {d})")
                self.register_buffer(f"{WHITEN_PREFIX}{k}", w.clone().to(device))

    @property
    def centres(self) -> list[torch.Tensor] | None:
        """Each level's mean representation (what is subtracted before normalising), or None for a
        model trained before centring existed."""
        found = [self._buffers.get(f"{CENTRE_PREFIX}{k}") for k in range(self.num_levels)]
        return None if any(c is None for c in found) else found

    @property
    def whitenings(self) -> list[torch.Tensor | None] | None:
        """Each level's whitening matrix (None for a level centred only), or None when no level has one."""
        found = [self._buffers.get(f"{WHITEN_PREFIX}{k}") for k in range(self.num_levels)]
        return None if self.centres is None or all(w is None for w in found) else found

    @property
    def onnx_level0(self) -> bool:
        """Whether level 0 is a frozen ONNX graph (converted by onnx2torch: exported with TorchScript)."""
        return isinstance(self.encoders[0], OnnxLevel)

    @property
    def num_levels(self) -> int:
        return len(self.encoders)

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        """The input this model expects (size, mean, std, colour mode); exports and stores record it."""
        return self.cfg.preprocess_spec

    def forward_train(self, images: torch.Tensor, upto: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Representations Y and embeddings Z of levels 0..upto-1 (all by default)."""
        upto = self.num_levels if upto is None else upto
        use_embedding = self.cfg.model.level_input == "embedding"
        ys: list[torch.Tensor] = []
        zs: list[torch.Tensor] = []
        x = images
        for k in range(upto):
            if k > 0 and self.cfg.model.stop_gradient:
                x = x.detach()
            frozen = k < self.frozen_levels
            with torch.no_grad() if frozen else contextlib.nullcontext():
                y = self.encoders[k](x)
                need_z = (self.training and not frozen) or use_embedding or k == upto - 1
                z = self.projectors[k](y) if need_z else None
            ys.append(y)
            zs.append(z)
            x = z if use_embedding else y
        return ys, zs

    def forward_levels(self, images: torch.Tensor, levels: list[int] | None = None) -> list[torch.Tensor]:
        """Representations Y[k] for the requested levels (default all, else in the order given),
        computed in one pass."""
        levels = parse_levels(levels, self.num_levels, ordered=True)
        upto = max(levels) + 1
        ys, _ = self.forward_train(images, upto=upto)
        return [ys[k] for k in levels]

    def forward_embeddings(self, images: torch.Tensor, levels: list[int] | None = None) -> list[torch.Tensor]:
        """Embeddings Z[k] (projector outputs) for the requested levels."""
        levels = parse_levels(levels, self.num_levels, ordered=True)
        ys, zs = self.forward_train(images, upto=max(levels) + 1)
        return [zs[k] if zs[k] is not None else self.projectors[k](ys[k]) for k in levels]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_levels(images)

    def preprocess(self, image) -> torch.Tensor:
        """The exact (3, H, W) float tensor this model expects for a PIL image."""
        from ..data.preprocess import preprocess_image

        spec = self.preprocess_spec
        return preprocess_image(image, spec.image_size, spec.mean, spec.std)

    def parameter_counts(self) -> list[dict[str, int]]:
        """Parameters of each level's encoder and projector."""
        count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
        return [{"encoder": count(e), "projector": count(p)} for e, p in zip(self.encoders, self.projectors)]


def build_model(cfg: RunConfig) -> StackedModel:
    return StackedModel(cfg)


def random_init(model: StackedModel) -> StackedModel:
    """`model`'s architecture with fresh weights (the floor a trained model must beat). A frozen
    ONNX level 0 keeps its graph, which has no initialisation of its own: the floor of the levels
    trained above it."""
    fresh = build_model(model.cfg)
    if model.onnx_level0:
        fresh.encoders[0].load_graph(graph_bytes(model.encoders[0].onnx))
    return fresh
