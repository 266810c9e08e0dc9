"""The cache of graphs ONNX Runtime optimised for the CPU: a session on a cached graph starts in
about half the time (ResNet-18 levels: 0.19 -> 0.09 s, docs/benchmarks.md).

The folder is $SJEA_ORT_CACHE (default ~/.cache/sjea/ort; 'off' disables it). A cached graph is
named by the file's content, the ONNX Runtime version, the provider and this CPU's instruction sets;
it is kept only after it gave the same vectors as the session that wrote it. One that cannot be
loaded, or that records another export's graph, is passed over and written again. The folder is
trusted as the user's own files are: a cached graph is not hashed again when loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np

from .onnx_meta import parse_metadata
from .session import CPU, loaded_options, session_options, try_session

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


def cached_session(source, key: str, threads: int | None, graph_hash: str | None = None):
    """A CPU session on the cached optimised graph of `source` (written first when missing), or
    None when there is no cache folder or the cache cannot be used (the caller then optimises).
    A cached graph whose metadata records another graph_sha256 than `graph_hash` is passed over."""
    folder = optimized_cache_dir()
    if folder is None:
        return None
    path = folder / f"{key}.onnx"
    if path.is_file():
        sess, _ = try_session(str(path), CPU, loaded_options(threads), False)
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
        sess, _ = try_session(source, CPU, so, False)
        if sess is None:
            return None  # the caller's own attempt reports why
        saved, _ = try_session(str(tmp), CPU, loaded_options(threads), False)
        if saved is not None and _same_outputs(sess, saved):
            commit_temp(tmp, path)
            _prune(folder)
        return sess
    except OSError:
        return None
    finally:
        if tmp.exists():
            tmp.unlink(missing_ok=True)


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
