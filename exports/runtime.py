"""ONNX Runtime sessions for exported levels: provider choice, fast session options, IO binding.

    from exports.runtime import OnnxModel
    m = OnnxModel("runs/tiny/onnx/all_levels.onnx")      # CUDA if it really works, else CPU
    ys = m.run(batch)                                     # float32 NCHW -> one array per level

ONNX Runtime silently falls back to the CPU when the CUDA provider cannot start (no GPU, missing
cuDNN), so the provider actually used is read back from the session and exposed as `.provider`.
Everything a caller needs to feed the graph (its PreprocessSpec: image size, mean, std; levels,
dims, the checkpoint's sha256) comes from the file's metadata, never from guessing. The
checkpoint's sha256 is the model's identity only when the file's content (graph and weights)
still hashes to the `graph_sha256` recorded at export: a file changed afterwards is refused, and
a file without that record is identified by its content hash (`content_model_id`).
On the CPU, the graph ONNX Runtime optimised for a file is kept in a cache folder
(`optimized_cache_dir`: $SJEA_ORT_CACHE, default ~/.cache/sjea/ort; 'off' disables it) and loaded
instead of optimising again: a session starts in about half the time (ResNet-18 levels: 0.19 ->
0.09 s, docs/benchmarks.md). A cached graph is named by a hash of the file's content, the ONNX
Runtime version, the provider and this CPU's instruction sets (the optimised layout depends on
them); it is kept only after it gave the same vectors as the session that wrote it, and one that
cannot be loaded, or whose metadata records another export's graph, is passed over silently (and
written again). The folder is trusted as the user's own files are: a cached graph is not hashed
again when loaded.
Imports neither torch nor onnx: this module is the query path's.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np

from sjea_tools.errors import SjeaError
from sjea_tools.spec import PreprocessSpec

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# Short names accepted by --provider, and the full ONNX Runtime names.
PROVIDER_ALIASES = {"cpu": CPU, "cuda": CUDA, "gpu": CUDA, "tensorrt": "TensorrtExecutionProvider",
                    "trt": "TensorrtExecutionProvider"}
# Set once the CUDA provider failed to start in this process, so later sessions do not retry.
_cuda_failed: str | None = None


def provider_name(provider: str) -> str:
    """'cpu' / 'cuda' / 'tensorrt' or a full ONNX Runtime provider name -> the full name."""
    full = PROVIDER_ALIASES.get(provider.lower(), provider)
    if not full.endswith("ExecutionProvider"):
        known = ", ".join(PROVIDER_ALIASES)
        raise SjeaError(f"unknown provider '{provider}' (use one of {known}, or a full ONNX Runtime name).")
    return full


def cpu_threads() -> int:
    """Cores this process may use (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None, spinning: bool = False):
    """What makes ONNX Runtime fast here: every graph optimisation (Conv+BN+ReLU fusion, constant
    folding, NCHWc layout transforms) and one intra-op thread per core (threads that sleep when
    idle); inter-op parallelism does not help a chain of layers."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or cpu_threads()
    so.inter_op_num_threads = 1
    # Idle threads sleep instead of spinning: on a machine shared with data-loading workers or
    # other jobs, spinning threads steal the cores the work needs (measured on 2 shared cores:
    # 476 -> 731 img/s at 2 threads; see docs/benchmarks.md), and it costs little when alone.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3  # errors only: no per-node placement warnings on stderr
    return so


def _provider_list(full: str, precise: bool) -> list:
    if full == CUDA:
        # Exact fp32 (no TF32) when the session is used to verify parity; fastest otherwise.
        options = {"cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": "0" if precise else "1"}
        return [(CUDA, options), CPU]
    if full == CPU:
        return [CPU]
    return [full, CPU]


def _try_session(model_bytes_or_path, full: str, so, precise: bool):
    """A session whose first provider is `full`, or (None, reason) when that provider does not start."""
    import onnxruntime as ort

    # ONNX Runtime logs a warning to stderr on a failed provider and carries on with the CPU; the
    # failure is reported by us instead (the session's provider list says what really happened).
    previous = 2  # ONNX Runtime's default (warnings)
    ort.set_default_logger_severity(4 if full != CPU else 3)
    try:
        sess = ort.InferenceSession(model_bytes_or_path, so, providers=_provider_list(full, precise))
    except Exception as e:  # ONNX Runtime raises its own Fail/InvalidArgument types
        text = str(e).strip().splitlines()
        return None, (text[0] if text else type(e).__name__)
    finally:
        ort.set_default_logger_severity(previous)
    if sess.get_providers()[0] != full:
        return None, f"{full} did not initialise (no usable GPU, or its CUDA/cuDNN libraries are missing)"
    return sess, None


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
        sess = _cached_session(source, cache_key, threads, graph_hash)
        if sess is not None:
            return sess, CPU
    if provider is not None:
        full = provider_name(provider)
        if full not in available:
            raise SjeaError(f"ONNX Runtime provider {full} is not available in this installation "
                            f"(available: {', '.join(available)}); run on the CPU instead.")
        sess, why = _try_session(source, full, so, precise)
        if sess is None:
            if full == CUDA:
                _cuda_failed = why
            if full == CPU:  # the file itself is the problem: no provider advice helps
                raise SjeaError(f"ONNX Runtime cannot load {_model_name(model)}: {why}; re-export it with "
                                "'sjea export'.")
            raise SjeaError(f"provider {full} could not start: {why}; run on the CPU instead.")
        return sess, full
    if CUDA in available and _cuda_failed is None:
        sess, why = _try_session(source, CUDA, so, precise)
        if sess is not None:
            return sess, CUDA
        _cuda_failed = why
    sess, why = _try_session(source, CPU, so, precise)
    if sess is None:
        raise SjeaError(f"ONNX Runtime cannot load {_model_name(model)}: {why}; re-export it with 'sjea export'.")
    return sess, CPU


# --- the cache of optimised graphs (CPU) ---------------------------------------------------------
ORT_CACHE_ENV = "SJEA_ORT_CACHE"
CACHE_KEEP = 16  # optimised graphs kept (the most recently used); each is about its model's size
_CACHE_FORMAT = 1


def optimized_cache_dir() -> Path | None:
    """The folder of optimised graphs: $SJEA_ORT_CACHE, else ~/.cache/sjea/ort; None when the
    variable is empty or 'off' (no cache: every session optimises its graph again)."""
    value = os.environ.get(ORT_CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "none") else Path(value)
    return Path.home() / ".cache" / "sjea" / "ort"


def _cpu_fingerprint() -> str:
    """What an optimised CPU graph depends on besides ONNX Runtime: the architecture and its
    instruction sets (the NCHWc layout's block size follows AVX2/AVX-512)."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:  # not Linux
        flags = platform.processor()
    return f"{platform.machine()}:{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def content_key(graph_hash: str, descriptive_hash: str) -> str:
    """The name of a file's optimised graph in the cache: its content (computing and descriptive
    parts, `content_hashes`), ONNX Runtime's version, the provider, the optimisation level and
    this CPU. Made of hex digits only, whatever the file was called."""
    import onnxruntime as ort

    record = {"format": _CACHE_FORMAT, "graph": graph_hash, "descriptive": descriptive_hash,
              "onnxruntime": ort.__version__, "provider": CPU, "level": "ORT_ENABLE_ALL", "cpu": _cpu_fingerprint()}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:40]


def _cached_session(source, key: str, threads: int | None, graph_hash: str | None = None):
    """A CPU session on the cached optimised graph of `source` (written first when missing), or
    None when there is no cache folder or the cache cannot be used (the caller then optimises).
    A cached graph whose metadata records another graph_sha256 than `graph_hash` is passed over."""
    folder = optimized_cache_dir()
    if folder is None:
        return None
    path = folder / f"{key}.onnx"
    if path.is_file():
        sess, _ = _try_session(str(path), CPU, _loaded_options(threads), False)
        if sess is not None and graph_hash is not None:
            recorded = parse_metadata(dict(sess.get_modelmeta().custom_metadata_map)).get("graph_sha256")
            if recorded is not None and str(recorded) != graph_hash:
                sess = None  # not this file's graph: optimised again below, and replaced
        if sess is not None:
            try:
                os.utime(path)  # most recently used: kept by _prune
            except OSError:
                pass
            return sess
    # Optimise the original once, saving the result beside its place in the cache; keep it only
    # when a session on it gives the same vectors and metadata as this one.
    from sjea_tools.io import commit_temp, temp_path_beside

    try:
        tmp = temp_path_beside(path)
    except OSError:  # no writable cache folder: no cache
        return None
    try:
        so = session_options(threads)
        so.optimized_model_filepath = str(tmp)
        sess, _ = _try_session(source, CPU, so, False)
        if sess is None:
            return None  # the caller's own attempt reports why
        saved, _ = _try_session(str(tmp), CPU, _loaded_options(threads), False)
        if saved is not None and _same_outputs(sess, saved):
            commit_temp(tmp, path)
            _prune(folder)
        return sess
    except OSError:
        return None
    finally:
        if tmp.exists():
            tmp.unlink(missing_ok=True)


def _loaded_options(threads: int | None):
    """Session options for a graph that was optimised already."""
    import onnxruntime as ort

    so = session_options(threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return so


def _same_outputs(a, b, atol: float = 1e-6) -> bool:
    """Two sessions with the same inputs, outputs and metadata that give the same outputs (within
    atol, relative to the output's scale) on a fixed batch of two inputs; False on any failure."""
    try:
        return _compare_sessions(a, b, atol)
    except Exception:  # noqa: BLE001 - ONNX Runtime raises its own types; no cache then
        return False


def _compare_sessions(a, b, atol: float) -> bool:
    ins_a, ins_b = a.get_inputs(), b.get_inputs()
    if [(i.name, i.type, i.shape) for i in ins_a] != [(i.name, i.type, i.shape) for i in ins_b]:
        return False
    if [o.name for o in a.get_outputs()] != [o.name for o in b.get_outputs()]:
        return False
    if dict(a.get_modelmeta().custom_metadata_map) != dict(b.get_modelmeta().custom_metadata_map):
        return False
    rng = np.random.default_rng(0)
    feed = {}
    for i in ins_a:
        shape = [d if isinstance(d, int) and d > 0 else 2 for d in i.shape]
        if i.type == "tensor(uint8)":
            feed[i.name] = rng.integers(0, 256, shape, dtype=np.uint8)
        elif i.type == "tensor(float)":
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
        else:
            return False  # an input we cannot make up: no cache
    for x, y in zip(a.run(None, feed), b.run(None, feed)):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape or not np.all(np.abs(x - y) <= atol * max(1.0, float(np.abs(x).max(initial=0)))):
            return False
    return True


def _prune(folder: Path, keep: int = CACHE_KEEP) -> None:
    """Remove all but the `keep` most recently used optimised graphs (and stale temp files)."""
    try:
        files = sorted(folder.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
        for p in files[keep:]:
            p.unlink(missing_ok=True)
    except OSError:
        pass


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


def parse_metadata(props: dict[str, str]) -> dict:
    """metadata_props (all strings) -> typed values: JSON where the exporter wrote JSON."""
    out = {}
    for key, value in props.items():
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            out[key] = value
    return out


def preprocess_spec(metadata: dict, path: Path) -> PreprocessSpec:
    """The graph's input preprocessing: the 'preprocess' record, or, in files exported before it
    existed, the same numbers under their separate keys."""
    record = metadata.get("preprocess")
    if isinstance(record, dict):
        return PreprocessSpec.from_dict(record)
    if "image_size" not in metadata:
        raise SjeaError(f"{path} has no sjea metadata (levels, image size); export it with 'sjea export'.")
    return PreprocessSpec.from_dict({"image_size": metadata["image_size"], "mean": metadata.get("mean"),
                                     "std": metadata.get("std"),
                                     "colour_mode": metadata.get("color_mode", "RGB")})


# Top-level ModelProto fields that describe rather than compute (producer_name, producer_version,
# doc_string, metadata_props): left out of the content hash, so metadata can record the hash.
DESCRIPTIVE_FIELDS = frozenset({2, 3, 6, 14})


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def graph_sha256(data: bytes) -> str:
    """sha256 of a serialized ONNX model's computing content: every top-level protobuf field
    (graph with its weights, opsets, functions, IR version) except the descriptive ones, in file
    order. Reads the wire format directly (no onnx import); ValueError when it is not protobuf."""
    return content_hashes(data)[0]


def content_hashes(data: bytes) -> tuple[str, str]:
    """(graph_sha256, sha256 of the descriptive fields) in one pass: together they name the whole
    file's content (the key of its optimised graph, `content_key`)."""
    h, rest, pos, view = hashlib.sha256(), hashlib.sha256(), 0, memoryview(data)
    while pos < len(data):
        start = pos
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated field")
        (rest if key >> 3 in DESCRIPTIVE_FIELDS else h).update(view[start:pos])
    return h.hexdigest(), rest.hexdigest()


def content_model_id(graph_hash: str) -> str:
    """The model id of an ONNX file that records no verifiable checkpoint identity."""
    return f"onnx-graph-sha256:{graph_hash}"


class ModelIdentityError(SjeaError):
    """An ONNX file is not the model it claims (or is expected) to be."""


def verified_model_id(data: bytes, metadata: dict, path: Path, actual: str | None = None) -> str:
    """The model id a file may claim: the checkpoint's sha256 from its metadata when its content
    still hashes to the graph_sha256 recorded at export, else (no record) its content hash; a
    mismatch (weights or graph changed after export) is refused. `actual`: graph_sha256(data)
    when the caller has it."""
    try:
        actual = actual or graph_sha256(data)
    except ValueError as e:
        raise SjeaError(f"{path} is not a readable ONNX file ({e}); export it again with 'sjea export'.") from None
    recorded = str(metadata.get("graph_sha256", ""))
    if not recorded:
        return content_model_id(actual)
    if recorded != actual:
        raise ModelIdentityError(f"{path} was modified after export: its graph and weights hash to {actual[:12]}, "
                        f"not the {recorded[:12]} recorded when it was exported; use the genuine file or "
                        "export it again with 'sjea export'.")
    return str(metadata.get("model_sha256") or "") or content_model_id(actual)


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
        self.model_id: str = verified_model_id(data, self.metadata, self.path, graph_hash)
        self.output: str = str(self.metadata.get("output", "representation"))
        # uint8 NHWC pixels when normalisation is inside the graph, else float32 NCHW.
        self.takes_pixels: bool = self.metadata.get("preprocessing") == "normalize"
        self.input_dtype = np.uint8 if self.takes_pixels else np.float32

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
