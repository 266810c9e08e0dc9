"""ONNX export of stack levels, verification against PyTorch, and ONNX Runtime sessions.

    import sjea_tools.exports
    report = sjea_tools.exports.export_run("runs/tiny", level="all")     # files + verification numbers
    m = sjea_tools.exports.OnnxModel(report["files"][-1]["path"])        # provider, metadata, .run(batch)

Modules: onnx (build a graph, metadata, export_run), verify (parity against PyTorch on real
images), runtime (ONNX Runtime sessions: provider choice, fast options, IO binding).

Names are imported on first use: running a graph (sjea_tools.exports.runtime) must not import torch,
which building one (sjea_tools.exports.onnx) needs.
"""

from __future__ import annotations

from sjea_tools import lazy_attributes

_LAZY = {"OnnxModel": "runtime", "VerificationError": "onnx", "build_onnx": "onnx", "export_levels": "onnx",
         "export_run": "onnx", "read_metadata": "onnx"}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
