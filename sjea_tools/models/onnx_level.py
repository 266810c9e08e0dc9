"""A frozen ONNX graph as level 0 (`sjea train --from FILE.onnx`).

The graph's bytes are kept in the model as a uint8 buffer (`encoders.0.onnx` in model.pt), so the
run is self-contained and its model file still loads with torch.load(weights_only=True); the torch
module that computes them is rebuilt from those bytes whenever a state is loaded. Its weights are
not saved a second time: they are the graph's.

From bytes to a module (`convert_graph`): the content check every ONNX loader here runs first
(onnx_proto: no external data, no constant-shaped memory bombs), a graph newer than opset 17 moved
to 17 by onnx's version converter (onnx2torch 1.5 has no converters for the opset-18 Reduce ops
that `sjea export` writes), onnxscript's optimizer (constant folding; it removes the Identity nodes
the TorchScript exporter puts in front of shared weights, which onnx2torch cannot convert), then
onnx2torch. The level is always frozen: no gradients, eval mode whatever train() asks.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import SjeaError
from ..onnx_proto import check_model_contents

CONVERT_OPSET = 17  # the newest opset onnx2torch 1.5 converts every common vision op of


def _quietly():
    """onnx, onnxscript and onnx2torch print and warn about what they rewrite: keep the CLI clean."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def read_graph(data: bytes, where: str):
    """The onnx ModelProto of `data` after the content check; `where` names the file in errors."""
    import onnx

    try:
        check_model_contents(data, Path(where))
        return onnx.load_from_string(data)
    except SjeaError:
        raise
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, the walker's ValueError
        raise SjeaError(f"{where} is not a readable ONNX file ({type(e).__name__}); pass a model saved by "
                        "onnx.save or 'sjea export'.") from None


def convert_graph(data: bytes, where: str) -> tuple[nn.Module, list[str]]:
    """(a torch module computing the graph of `data`, the graph's output names in its order)."""
    import onnxscript.optimizer
    from onnx import version_converter
    from onnx2torch import convert

    proto = read_graph(data, where)
    names = [o.name for o in proto.graph.output]
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=CONVERT_OPSET)
    with _quietly():
        try:
            if opset > CONVERT_OPSET:
                proto = version_converter.convert_version(proto, CONVERT_OPSET)
            proto = onnxscript.optimizer.optimize(proto)
        except Exception as e:  # noqa: BLE001 - the converters raise their own types
            raise SjeaError(f"{where} cannot be prepared for conversion ({_first_line(e)}); save it at opset "
                            f"{CONVERT_OPSET} or 18 with standard operators.") from None
        try:
            net = convert(proto)
        except NotImplementedError as e:
            raise SjeaError(f"{where} uses an operator onnx2torch cannot convert ({_first_line(e)}); export the "
                            "encoder with standard operators (e.g. torch.onnx.export at opset 17).") from None
        except Exception as e:  # noqa: BLE001
            raise SjeaError(f"onnx2torch cannot convert {where} ({type(e).__name__}: {_first_line(e)}); export "
                            "the encoder again at opset 17 with static weights.") from None
    return net, names


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def graph_bytes(buffer: torch.Tensor) -> bytes:
    return buffer.detach().cpu().numpy().tobytes()


class OnnxLevel(nn.Module):
    """Level 0 computed by an ONNX graph: images (N, 3, H, W) -> the graph's output `output`
    (its only one by default), as (N, out_dim) rows ((N, C, 1, 1) maps are flattened)."""

    def __init__(self, out_dim: int, output: str | None = None):
        super().__init__()
        self.out_dim = int(out_dim)
        self.output = output
        self.register_buffer("onnx", torch.zeros(0, dtype=torch.uint8))
        self.net: nn.Module | None = None
        self.index = 0
        self.register_state_dict_post_hook(_drop_converted_weights)

    def load_graph(self, data: bytes, where: str = "the ONNX level 0") -> None:
        """Convert `data` and keep it: the buffer that model.pt saves and the module that runs it."""
        net, names = convert_graph(data, where)
        if self.output is None and len(names) != 1:
            raise SjeaError(f"{where} has {len(names)} outputs ({', '.join(names)}); choose one with --set "
                            "train.from_output=NAME.")
        if self.output is not None and self.output not in names:
            raise SjeaError(f"{where} has no output '{self.output}' (it has {', '.join(names)}); pass one of "
                            "those with --set train.from_output=NAME.")
        device = self.onnx.device
        self.index = names.index(self.output) if self.output is not None else 0
        self.net = net.requires_grad_(False).eval().to(device)
        self.onnx = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.net is None:
            raise SjeaError("level 0 is a frozen ONNX graph that was never loaded; load the run with "
                            "sjea_tools.runs.load_model (its model.pt holds the graph).")
        y = self.net(x)
        if isinstance(y, (list, tuple)):
            y = y[self.index]
        return y.flatten(1)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.net is not None:
            self.net.eval()  # frozen: BatchNorm and dropout as the graph was exported
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Rebuild the module from the graph the state holds (a run's model.pt, a checkpoint, the
        source file's bytes): its weights come from the graph, so they are put into the state here
        for the children to load."""
        data = state_dict.get(prefix + "onnx")
        if isinstance(data, torch.Tensor) and data.numel() and not (
                self.net is not None and data.shape == self.onnx.shape and torch.equal(data.cpu(), self.onnx.cpu())):
            self.load_graph(graph_bytes(data))
        if self.net is not None:
            for key, value in self.net.state_dict().items():
                state_dict.setdefault(f"{prefix}net.{key}", value)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _drop_converted_weights(module: OnnxLevel, state_dict, prefix, local_metadata) -> None:
    """The converted module's weights are the graph's: saved once, inside the `onnx` buffer."""
    for key in [k for k in state_dict if k.startswith(prefix + "net.")]:
        del state_dict[key]
