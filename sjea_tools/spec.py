"""PreprocessSpec: what a model expects as input, carried by the model, its ONNX files and stores.

One value describes the whole path from decoded pixels to the input tensor (short side resized
to `image_size` with bilinear filtering, centre crop, RGB, divided by 255, minus `mean`, over
`std`), so that training runs, exported ONNX graphs and embedding stores can each record it and be
compared with `==`. Deliberately free of torch and numpy: the query path reads it without
importing either.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from .errors import SjeaError


@dataclass(frozen=True)
class PreprocessSpec:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    colour_mode: str = "RGB"

    def __post_init__(self):
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.image_size < 1 or len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise SjeaError(f"invalid preprocessing (image_size {self.image_size}, mean {self.mean}, std {self.std}): "
                            "image_size must be positive and mean/std three numbers with std > 0.")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        try:
            return cls(int(d["image_size"]), tuple(d["mean"]), tuple(d["std"]), str(d.get("colour_mode", "RGB")))
        except (KeyError, TypeError, ValueError) as e:
            raise SjeaError(f"preprocessing record is incomplete or malformed ({e}); re-export or re-embed "
                            "with this version of sjea.") from None

    @classmethod
    def from_json(cls, text: str) -> "PreprocessSpec":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError:
            raise SjeaError("preprocessing record is not valid JSON; re-export or re-embed with this version "
                            "of sjea.") from None


class ReadsPreprocessSpec:
    """`image_size`, `mean` and `std` as reads of `self.preprocess_spec`, for the classes that carry
    one (RunConfig, StackedModel): the numbers live in the spec alone."""

    preprocess_spec: PreprocessSpec

    @property
    def image_size(self) -> int:
        return self.preprocess_spec.image_size

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.preprocess_spec.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.preprocess_spec.std
