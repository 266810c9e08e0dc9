"""ONNX export of stack levels, verification against PyTorch, and ONNX Runtime sessions.

    import exports
    report = exports.export_run("runs/tiny", level="all")     # files + verification numbers
    m = exports.OnnxModel(report["files"][-1]["path"])        # provider, metadata, .run(batch)

Modules: onnx (build a graph, metadata, export_run), verify (parity against PyTorch on real
images), runtime (ONNX Runtime sessions: provider choice, fast options, IO binding).
"""

from .onnx import VerificationError, build_onnx, export_levels, export_run, read_metadata
from .runtime import OnnxModel

__all__ = ["OnnxModel", "VerificationError", "build_onnx", "export_levels", "export_run", "read_metadata"]
