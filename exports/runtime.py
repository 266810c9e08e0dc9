"""An exported sjea graph in an ONNX Runtime session (`OnnxModel`), and the choice of that session:
the cached optimised graph, else CUDA when it really starts, else the CPU.

    from sjea_tools.exports.runtime import OnnxModel
    m = OnnxModel("runs/tiny/onnx/all_levels.onnx")      # CUDA if it really works, else CPU
    ys = m.run(batch)                                     # float32 NCHW -> one array per level

Everything a caller needs to feed the graph comes from the file's metadata (onnx_meta), never from
guessing. Imports neither torch nor onnx: this module is the query path's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sjea_tools.errors import SjeaError
from sjea_tools.spec import PreprocessSpec

from .graph_cache import cached_session, content_key
from .onnx_meta import (ModelIdentityError, centres_of, check_model_contents, content_hashes, content_model_id,
                        graph_sha256, parse_metadata, preprocess_spec, verified_model_id, whitenings_of)
from .session import CPU, CUDA, cpu_threads, provider_name, session_options, try_session

# Names callers import from here (their homes are the modules above).
__all__ = ["CPU", "CUDA", "ModelIdentityError", "OnnxModel", "check_provider", "content_model_id", "cpu_threads",
           "create_session", "graph_sha256", "provider_name", "session_options"]

# Set once the CUDA provider failed to start in this process, so later sessions do not retry.
_cuda_failed: str | None = None


def _model_name(model) -> str:
    return str(model) if isinstance(model, (str, Path)) else "the model"


def create_session(model, provider: str | None = None, threads: int | None = None, precise: bool = False,
                   cache_key: str | None = None, graph_hash: str | None = None):
    """(session, provider actually used). provider=None: CUDA when it really starts, else CPU;
    a named provider that cannot start is an error, never a silent fallback. `cache_key` (the
    content hash of `model`'s bytes, `content_key`; `graph_hash`: its graph_sha256): on the CPU,
    its optimised graph is loaded from, or saved to, the cache folder (`optimized_cache_dir`)."""
    global _cuda_failed
    import onnxruntime as ort

    source = str(model) if isinstance(model, (str, Path)) else model
    so = session_options(threads)
    available = ort.get_available_providers()
    on_cpu = provider_name(provider) == CPU if provider is not None else CUDA not in available
    if cache_key is not None and on_cpu and CPU in available:
        sess = cached_session(source, cache_key, threads, graph_hash)
        if sess is not None:
            return sess, CPU
    if provider is not None:
        full = provider_name(provider)
        if full not in available:
            raise SjeaError(f"ONNX Runtime provider {full} is not available in this installation "
                            f"(available: {', '.join(available)}); run on the CPU instead.")
        sess, why = try_session(source, full, so, precise)
        if sess is None:
            if full == CUDA:
                _cuda_failed = why
            if full == CPU:  # the file itself is the problem: no provider advice helps
                raise SjeaError(f"ONNX Runtime cannot load {_model_name(model)}: {why}; re-export it with "
                                "'sjea export'.")
            raise SjeaError(f"provider {full} could not start: {why}; run on the CPU instead.")
        return sess, full
    if CUDA in available and _cuda_failed is None:
        sess, why = try_session(source, CUDA, so, precise)
        if sess is not None:
            return sess, CUDA
        _cuda_failed = why
    sess, why = try_session(source, CPU, so, precise)
    if sess is None:
        raise SjeaError(f"ONNX Runtime cannot load {_model_name(model)}: {why}; re-export it with 'sjea export'.")
    return sess, CPU


def check_provider(provider: str) -> str:
    """Fail fast, before a long export: the full name of `provider` if it really starts here.

    Starts it on a one-node graph, so a missing GPU or CUDA library is found in a second.
    """
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    probe.ir_version = min(probe.ir_version, onnx.IR_VERSION)
    try:
        _, used = create_session(probe.SerializeToString(), provider, threads=1)
    except SjeaError as e:  # the commands that call this have --provider: name the option
        raise SjeaError(str(e).replace("run on the CPU instead", "use --provider cpu")) from None
    return used


class OnnxModel:
    """An exported sjea graph in an ONNX Runtime session, described by its own metadata."""

    def __init__(self, path: str | Path, provider: str | None = None, threads: int | None = None,
                 precise: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise SjeaError(f"ONNX file {self.path} does not exist; create it with 'sjea export'.")
        # The bytes hashed are the bytes loaded: the file cannot change between check and use.
        data = self.path.read_bytes()
        try:
            check_model_contents(data, self.path)
        except ValueError as e:  # what cannot be walked is not loaded: nothing may hide from the check
            raise SjeaError(f"{self.path} is not a readable ONNX file ({e}); export it again with 'sjea export'.") from None
        try:
            graph_hash, descriptive_hash = content_hashes(data)
            key = content_key(graph_hash, descriptive_hash)
        except ValueError:  # not protobuf: ONNX Runtime says why below
            graph_hash = key = None
        self.session, self.provider = create_session(data, provider, threads, precise, cache_key=key,
                                                     graph_hash=graph_hash)
        self.metadata = parse_metadata(dict(self.session.get_modelmeta().custom_metadata_map))
        if "levels" not in self.metadata:
            raise SjeaError(f"{self.path} has no sjea metadata (levels, image size); export it with 'sjea export'.")
        self.preprocess: PreprocessSpec = preprocess_spec(self.metadata, self.path)
        # Copies of the frozen spec's fields under the names callers used before it existed.
        self.image_size, self.mean, self.std = self.preprocess.image_size, self.preprocess.mean, self.preprocess.std
        inputs = self.session.get_inputs()
        self.input_name: str = inputs[0].name
        self.output_names: list[str] = [o.name for o in self.session.get_outputs()]
        self.levels: list[int] = [int(k) for k in self.metadata["levels"]]
        self.dims: list[int] = [int(d) for d in self.metadata["dims"]]
        self._check_outputs()
        self.model_id: str = verified_model_id(data, self.metadata, self.path, graph_hash)
        self.output: str = str(self.metadata.get("output", "representation"))
        # Each output's centring mean (trainers.centring), or None: a file of a model without them.
        self.centres: list[np.ndarray] | None = centres_of(self.metadata, self.dims, self.path)
        # Each output's whitening matrix (None: centred only), or None: no output is whitened.
        self.whitenings: list[np.ndarray | None] | None = whitenings_of(self.metadata, self.dims, self.path)
        # uint8 NHWC pixels when normalisation is inside the graph, else float32 NCHW.
        self.takes_pixels: bool = self.metadata.get("preprocessing") == "normalize"
        self.input_dtype = np.uint8 if self.takes_pixels else np.float32

    def _check_outputs(self) -> None:
        """The graph declares the (N, dim) outputs its metadata promises: nothing else is run."""
        shapes = [o.shape for o in self.session.get_outputs()]
        wrong = len(shapes) != len(self.dims) or any(
            len(s) != 2 or (isinstance(s[1], int) and s[1] != d) for s, d in zip(shapes, self.dims))
        if wrong:
            raise SjeaError(f"{self.path} declares outputs of shapes {shapes}, not the (N, dim) rows of dims "
                            f"{self.dims} its metadata records; export it again with 'sjea export'.")

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, provider={self.provider!r}, levels={self.levels})"

    def _check(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=self.input_dtype)
        s = self.image_size
        want = (s, s, 3) if self.takes_pixels else (3, s, s)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != want:
            layout = "uint8 (N, H, W, 3)" if self.takes_pixels else "float32 (N, 3, H, W)"
            raise SjeaError(f"{self.path.name} takes a {layout} batch with H=W={s}; got shape {tuple(batch.shape)}.")
        return batch

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """One array (N, dim) per level, in `self.levels` order."""
        batch = self._check(batch)
        try:
            return self._run(batch)
        except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own Fail/RuntimeException types
            if isinstance(e, SjeaError):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SjeaError(f"ONNX Runtime could not run {self.path.name} on a batch of {len(batch)}: "
                            f"{first[:300]}; export the model again with 'sjea export'.") from None

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        if self.provider == CPU:
            return self.session.run(self.output_names, {self.input_name: batch})
        # On a GPU: copy the input once, leave outputs on the device until all are done, then
        # copy them back together (no per-output synchronisation, no arena reallocation).
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        for name in self.output_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def run_torch(self, batch):
        """A torch tensor in, torch tensors out, on the tensor's device; zero-copy on CUDA.

        For GPU pipelines that decode, normalise and embed without leaving the device: the input's
        memory is bound directly and outputs are written into preallocated tensors.
        """
        import torch

        if self.provider != CUDA or batch.device.type != "cuda":
            outs = self.run(batch.detach().cpu().numpy())
            return [torch.from_numpy(o).to(batch.device) for o in outs]
        batch = batch.contiguous()
        if self.takes_pixels:
            batch = batch.to(torch.uint8)
            element_type = np.uint8
        else:
            batch = batch.to(torch.float32)
            element_type = np.float32
        index = batch.device.index or 0
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", index, element_type, list(batch.shape), batch.data_ptr())
        outs = [torch.empty((batch.shape[0], d), dtype=torch.float32, device=batch.device) for d in self.dims]
        for name, out in zip(self.output_names, outs):
            binding.bind_output(name, "cuda", index, np.float32, list(out.shape), out.data_ptr())
        torch.cuda.current_stream(batch.device).synchronize()  # the input must be ready before ORT reads it
        self.session.run_with_iobinding(binding)
        return outs
