"""ONNX Runtime session primitives: provider names, threads, the options that make it fast, and a
session on one provider that reports why it did not start (ONNX Runtime silently falls back to the
CPU when the CUDA provider cannot start: no GPU, missing cuDNN)."""

from __future__ import annotations

import os

from sjea_tools.errors import SjeaError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# Short names accepted by --provider, and the full ONNX Runtime names.
PROVIDER_ALIASES = {"cpu": CPU, "cuda": CUDA, "gpu": CUDA, "tensorrt": "TensorrtExecutionProvider",
                    "trt": "TensorrtExecutionProvider"}


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


def try_session(model_bytes_or_path, full: str, so, precise: bool):
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



def loaded_options(threads: int | None):
    """Session options for a graph that was optimised already."""
    import onnxruntime as ort

    so = session_options(threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return so
