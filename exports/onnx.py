"""Export levels of a stacked model to ONNX: one graph, one output per level, metadata inside.

    from sjea_tools.exports.onnx import export_levels
    export_levels(model, "all_levels.onnx", levels=[0, 1, 2])     # Y[0..2] in one pass

The graph takes a float32 NCHW batch preprocessed exactly as `sjea_tools.data.normalize_pixels`
does (or, with preprocessing, uint8 NHWC RGB pixels of the model's size, normalised inside by
that same function), and gives `level{k}` = Y[k] (or Z[k] with output="embedding") for each
requested level. The batch axis is dynamic. Lower levels are computed once and shared.

Exporter: torch.onnx's torch.export-based (dynamo) exporter, the default and maintained one in
torch >= 2.9. It implements opset 18 and newer; opset 17 (for runtimes older than ONNX Runtime
1.14) uses the TorchScript exporter, because the dynamo exporter's down-conversion to 17 fails on
ResNet graphs and silently keeps 18. A model whose level 0 is a frozen ONNX graph (sjea train --from
FILE.onnx, converted by onnx2torch) is exported with the TorchScript exporter at any opset:
onnx2torch's modules branch on the values of their shape tensors, which torch.export cannot trace,
and export themselves as the ONNX nodes they came from under TorchScript. Either way the opset
written in the file is checked.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sjea_tools.errors import SjeaError
from sjea_tools.io import atomic_path, commit_temp, temp_path_beside
from sjea_tools.levels import format_levels, parse_levels
from sjea_tools.progress import Counter, ProgressFn

DEFAULT_OPSET = 18
MIN_OPSET = 17
OUTPUTS = ("representation", "embedding")
FORMAT = "sjea-onnx/1"


class LevelsGraph(nn.Module):
    """What is exported: (preprocess) -> stacked model -> one float32 tensor per requested level."""

    def __init__(self, model, levels: list[int], output: str = "representation",
                 with_preprocessing: bool = False, fp16: bool = False):
        super().__init__()
        self.model = model
        self.levels = list(levels)
        self.output = output
        self.with_preprocessing = with_preprocessing
        self.fp16 = fp16

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.with_preprocessing:
            from sjea_tools.data import normalize_pixels

            # The one preprocess, traced into the graph: uint8 NHWC -> normalised float NCHW.
            x = normalize_pixels(x, self.model.preprocess_spec)
        if self.fp16:
            x = x.half()
        if self.output == "embedding":
            ys = self.model.forward_embeddings(x, self.levels)
        else:
            ys = self.model.forward_levels(x, self.levels)
        # Outputs stay float32 in every precision, so clients never need to know.
        return tuple(y.float() for y in ys)


def output_names(levels: list[int]) -> list[str]:
    return [f"level{k}" for k in levels]


def level_dims(model, levels: list[int], output: str) -> list[int]:
    dims = model.embedding_dims if output == "embedding" else model.level_dims
    return [int(dims[k]) for k in levels]


def build_metadata(model, levels: list[int], output: str, with_preprocessing: bool, fp16: bool,
                   opset: int, single_level: bool) -> dict[str, str]:
    """Everything a client needs to feed the graph and to know where it came from (all strings)."""
    import sjea_tools
    from sjea_tools.runs import model_id

    source = getattr(model, "model_file", None)
    spec = model.preprocess_spec
    s = spec.image_size
    return {
        "format": FORMAT,
        "level": str(levels[0]) if single_level else "all",
        "levels": json.dumps(levels),
        "outputs": json.dumps(output_names(levels)),
        "dims": json.dumps(level_dims(model, levels, output)),
        "output": output,
        "input_name": "pixels" if with_preprocessing else "images",
        "input_format": (f"uint8 (N, {s}, {s}, 3) RGB pixels at the model's size" if with_preprocessing else
                         f"float32 (N, 3, {s}, {s}): RGB / 255, minus mean, divided by std"),
        "preprocessing": "normalize" if with_preprocessing else "none",
        # The spec's fields under the keys files written before it existed have (read by old clients
        # and the numpy-only snippet), and the whole spec as JSON under 'preprocess'.
        "image_size": str(s),
        "mean": json.dumps(list(spec.mean)),
        "std": json.dumps(list(spec.std)),
        "color_mode": spec.colour_mode,
        "preprocess": spec.to_json(),
        "resize": f"short side to {s} (bilinear), centre crop {s}x{s}; done by the client, not the graph",
        "precision": "fp16" if fp16 else "fp32",
        "sjea_version": sjea_tools.__version__,
        "opset": str(opset),
        "exporter": f"torch.onnx {'dynamo' if opset >= DEFAULT_OPSET else 'torchscript'} (torch {torch.__version__})",
        "model_sha256": model_id(source) if source is not None else "",
        "source": str(Path(source).parent.resolve()) if source is not None else "",
        **centre_metadata(model, levels, output),
    }


def centre_metadata(model, levels: list[int], output: str) -> dict[str, str]:
    """`centres`: each output's centring mean (JSON list of float lists, in `levels` order) for a
    model that has them (trainers.centring). The graph's outputs stay raw: a client subtracts
    centres[i] from output i, then L2-normalises, to get the rows a store holds. Projector outputs
    (--output embedding) have no means: no key."""
    if output != "representation" or getattr(model, "centres", None) is None:
        return {}
    meta = {"centres": json.dumps([[float(v) for v in model.centres[k].cpu().tolist()] for k in levels]),
            "centring": "row minus centres[i], then L2-normalised: the vectors sjea stores and searches"}
    whitenings = getattr(model, "whitenings", None)
    if whitenings is not None:
        meta["whitening"] = json.dumps([encode_matrix(whitenings[k]) for k in levels])
        meta["centring"] = ("row minus centres[i], times the (d, d) matrix whitening[i] when it is not null (computed "
                            "in float64, rounded to float32), then L2-normalised: the vectors sjea stores and searches")
    return meta


def encode_matrix(matrix) -> dict | None:
    """A float32 matrix as JSON-friendly {shape, dtype, base64} (little-endian, C order): 4 bytes a
    value instead of ~20 for decimal floats, and exact; None stays None."""
    import base64

    import numpy as np

    if matrix is None:
        return None
    a = np.ascontiguousarray(matrix.detach().cpu().numpy() if hasattr(matrix, "detach") else matrix, dtype="<f4")
    return {"shape": list(a.shape), "dtype": "<f4", "base64": base64.b64encode(a.tobytes()).decode("ascii")}


def _example_input(model, with_preprocessing: bool, batch: int = 4) -> torch.Tensor:
    s = int(model.image_size)
    if with_preprocessing:
        return torch.randint(0, 256, (batch, s, s, 3), dtype=torch.uint8)
    return torch.randn(batch, 3, s, s)


def _export_proto(graph: LevelsGraph, example: torch.Tensor, input_name: str, names: list[str], opset: int,
                  torchscript: bool = False):
    """torch.onnx.export -> onnx.ModelProto with a dynamic batch axis, quietly (no stdout noise);
    `torchscript`: the TorchScript exporter whatever the opset."""
    import onnx

    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        if opset >= DEFAULT_OPSET and not torchscript:
            batch = torch.export.Dim("batch", min=1, max=1 << 20)
            program = torch.onnx.export(graph, (example,), None, dynamo=True, opset_version=opset,
                                        input_names=[input_name], output_names=names,
                                        dynamic_shapes=({0: batch},), verbose=False, optimize=True)
            proto = program.model_proto
        else:
            buffer = io.BytesIO()
            axes = {name: {0: "batch"} for name in [input_name, *names]}
            torch.onnx.export(graph, (example,), buffer, dynamo=False, opset_version=opset,
                              input_names=[input_name], output_names=names, dynamic_axes=axes,
                              do_constant_folding=True)
            proto = onnx.load_from_string(buffer.getvalue())
    drop_source_locations(proto)
    written = {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")}
    if written != {opset}:
        raise SjeaError(f"the exporter wrote opset {sorted(written)} instead of {opset}; pass --opset "
                        f"{DEFAULT_OPSET} (the default).")
    return proto


def drop_source_locations(proto) -> None:
    """Remove the dynamo exporter's per-node stack traces: they hold this machine's source paths
    (/home/.../sjea_tools/models/convnet.py), so the same checkpoint exported from two checkouts gave
    two graph_sha256s and told every reader of the file where the code was installed."""
    def strip(graph):
        for node in graph.node:
            keep = [p for p in node.metadata_props if "stack_trace" not in p.key]
            if len(keep) != len(node.metadata_props):
                del node.metadata_props[:]
                node.metadata_props.extend(keep)
            for attr in node.attribute:
                if attr.g.node:
                    strip(attr.g)
                for sub in attr.graphs:
                    strip(sub)
    strip(proto.graph)
    for function in proto.functions:
        strip(function)


def set_metadata(proto, metadata: dict[str, str]) -> None:
    """Replace the graph's metadata_props with `metadata` (string keys and values), plus
    'graph_sha256': the hash of the graph and weights as serialized, which OnnxModel checks on
    every load, so the checkpoint identity (model_sha256) cannot be claimed by a changed file."""
    from .onnx_meta import graph_sha256

    del proto.metadata_props[:]
    metadata = {**metadata, "graph_sha256": graph_sha256(proto.SerializeToString())}
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    proto.producer_name = "sjea-tools"
    proto.producer_version = metadata.get("sjea_version", "")
    proto.doc_string = (f"S-JEA levels {metadata.get('levels')} ({metadata.get('output')}); input "
                        f"'{metadata.get('input_name')}': {metadata.get('input_format')}.")


def build_onnx(model, levels, output: str = "representation", with_preprocessing: bool = False,
               fp16: bool = False, opset: int = DEFAULT_OPSET, single_level: bool | None = None):
    """The ONNX ModelProto of `levels` (metadata set), not yet written anywhere.

    Metadata 'level' is the level number for a single-level graph, 'all' otherwise
    (`single_level` overrides: a one-level run's all-levels model still says 'all').
    """
    ExportOptions(output, with_preprocessing, fp16, opset).check()
    levels = parse_levels(levels, model.num_levels, ordered=True)
    source = model
    if fp16:
        import copy

        source = copy.deepcopy(model).half()
    graph = LevelsGraph(source, levels, output, with_preprocessing, fp16).eval()
    input_name = "pixels" if with_preprocessing else "images"
    with torch.no_grad():
        proto = _export_proto(graph, _example_input(model, with_preprocessing), input_name,
                              output_names(levels), opset, torchscript=getattr(model, "onnx_level0", False))
    set_metadata(proto, build_metadata(model, levels, output, with_preprocessing, fp16, opset,
                                       single_level=len(levels) == 1 if single_level is None else single_level))
    return proto


def extract_levels(proto, levels: list[int], single_level: bool = True):
    """The sub-graph of a multi-level model that computes only `levels` (exact: same nodes and
    weights, nothing else), with metadata rewritten for it."""
    import onnx

    meta = {p.key: p.value for p in proto.metadata_props}
    have = json.loads(meta["levels"])
    dims = dict(zip(have, json.loads(meta["dims"])))
    sub = onnx.utils.Extractor(proto).extract_model([proto.graph.input[0].name], output_names(levels))
    meta.update({"level": str(levels[0]) if single_level else "all", "levels": json.dumps(levels),
                 "outputs": json.dumps(output_names(levels)), "dims": json.dumps([dims[k] for k in levels])})
    if "centres" in meta:  # one mean per output: only the kept outputs'
        centres = dict(zip(have, json.loads(meta["centres"])))
        meta["centres"] = json.dumps([centres[k] for k in levels])
    if "whitening" in meta:
        whitening = dict(zip(have, json.loads(meta["whitening"])))
        meta["whitening"] = json.dumps([whitening[k] for k in levels])
    set_metadata(sub, meta)
    return sub


def read_metadata(path: str | Path) -> dict[str, str]:
    """metadata_props of an ONNX file as a plain dict of strings (no weights loaded)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def export_levels(model, path: str | Path, levels, output: str = "representation",
                  with_preprocessing: bool = False, fp16: bool = False, opset: int = DEFAULT_OPSET) -> Path:
    """Export `levels` of `model` as one graph to `path` (written atomically) and return the path.

    Python entry point without verification; `export_run` (and `sjea export`) also verifies.
    """
    proto = build_onnx(model, levels, output, with_preprocessing, fp16, opset)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    return path


# --- the whole job behind `sjea export`: build, verify on real images, then install ---------------

class VerificationError(SjeaError):
    """Parity failed: nothing was installed; `.report` holds the measured numbers."""

    def __init__(self, message: str, report: dict):
        super().__init__(message, exit_code=1)
        self.report = report


@dataclass(frozen=True)
class ExportOptions:
    """What kind of graph `sjea export` makes and how it checks it (its options, validated)."""

    output: str = "representation"
    with_preprocessing: bool = False
    fp16: bool = False
    opset: int = DEFAULT_OPSET
    provider: str | None = None
    images: str | Path | None = None
    overwrite: bool = False

    def check(self) -> "ExportOptions":
        if self.output not in OUTPUTS:
            raise SjeaError(f"--output must be one of {', '.join(OUTPUTS)}, not '{self.output}'.")
        if self.opset < MIN_OPSET:
            raise SjeaError(f"--opset must be {MIN_OPSET} or newer (got {self.opset}).")
        if self.provider is not None:
            from .runtime import check_provider

            check_provider(self.provider)  # a provider that cannot start fails now, not after the export
        return self

    @property
    def suffix(self) -> str:
        """Variants get their own names so that exporting one never replaces another."""
        return file_suffix(self.output, self.with_preprocessing, self.fp16)


def file_suffix(output: str, with_preprocessing: bool, fp16: bool) -> str:
    return ("-embedding" if output == "embedding" else "") + ("-uint8" if with_preprocessing else "") + \
        ("-fp16" if fp16 else "")


@dataclass(frozen=True)
class PlannedFile:
    name: str
    levels: list[int]
    whole: bool  # the exported graph itself, not a sub-graph cut out of it


def asks_for_all(level) -> bool:
    """'all' also asks for all_levels.onnx; level numbers ask only for those levels' files."""
    return level is None or (isinstance(level, str) and level.strip().lower() == "all")


def plan_files(levels: list[int], want_all: bool, suffix: str) -> list[PlannedFile]:
    """level{K}.onnx per level and, for 'all', all_levels.onnx (then `levels` is every level).

    One graph computes `levels`; a lone level's file is that graph, every other per-level file is
    an exact sub-graph of it."""
    plan = [PlannedFile(f"level{k}{suffix}.onnx", [k], whole=len(levels) == 1 and not want_all) for k in levels]
    if want_all:
        plan.append(PlannedFile(f"all_levels{suffix}.onnx", list(levels), whole=True))
    return plan


def prepare_out_dir(out: Path) -> Path:
    """Create the folder and prove it is writable before any work is done."""
    if out.exists() and not out.is_dir():
        raise SjeaError(f"output folder {out} is a file; pass --out with a folder.")
    try:
        temp_path_beside(out / ".sjea-write-test").unlink()
    except OSError as e:
        raise SjeaError(f"output folder {out} is not writable ({e.strerror or e}); pass --out with a "
                        "folder you can write to.") from None
    return out


def export_run(run=None, level="all", out=None, output: str = "representation", with_preprocessing: bool = False,
               fp16: bool = False, provider: str | None = None, images=None, overwrite: bool = False,
               opset: int = DEFAULT_OPSET, progress: ProgressFn | None = None) -> dict:
    """Export levels of a run ('all', K or '0,1'), verify, install.

    Files go to RUN/onnx (or the folder `out`): level{K}.onnx per level and, for level='all',
    all_levels.onnx computing every level in one pass; an `out` ending in .onnx that is not a folder
    is the one file of a single level. Each file is written under a temporary name, checked with
    onnx.checker and against PyTorch on real images, and renamed into place only when every file
    passed; on any failure nothing new is left behind. `progress` follows sjea_tools.progress.
    Returns a report dict; raises VerificationError (with `.report`) on failed parity.
    """
    from sjea_tools.runs import find_run, load_model

    opts = ExportOptions(output, with_preprocessing, fp16, opset, provider, images, overwrite).check()
    run_dir = find_run(run)
    model = load_model(run_dir)
    levels = parse_levels(level, model.num_levels, option="--level")
    out_dir = Path(out) if out is not None else Path(run_dir) / "onnx"
    file_name = None
    if out_dir.suffix.lower() == ".onnx" and not out_dir.is_dir():  # --out names the one file to write
        file_name, out_dir = out_dir.name, out_dir.parent
        planned = plan_files(levels, asks_for_all(level), opts.suffix)
        if len(planned) > 1:
            raise SjeaError(f"--out {out} names one .onnx file, but --level {level} writes {len(planned)} files "
                            f"({', '.join(f.name for f in planned)}); pass --level K for one file, or --out FOLDER.")
    created = not out_dir.exists()
    prepare_out_dir(out_dir)
    try:
        return _export_into(model, run_dir, out_dir, levels, asks_for_all(level), opts, progress, file_name)
    except BaseException:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a folder this call made and could not fill goes away again
        raise


def _refuse_existing(out_dir: Path, plan: list[PlannedFile], overwrite: bool) -> None:
    existing = [f.name for f in plan if (out_dir / f.name).exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise SjeaError(f"{out_dir / existing[0]} already exists{more}; pass --overwrite to replace, or --out "
                        "for another folder.")


def _export_into(model, run_dir, out_dir: Path, levels: list[int], want_all: bool, opts: ExportOptions,
                 progress: ProgressFn | None, file_name: str | None = None) -> dict:
    from .verify import reference_by_batch, verification_pixels

    plan = plan_files(levels, want_all, opts.suffix)
    if file_name is not None:  # one file, at the name the user gave
        plan = [PlannedFile(file_name, plan[0].levels, plan[0].whole)]
    _refuse_existing(out_dir, plan, opts.overwrite)
    pixels, image_source = verification_pixels(model, opts.images)
    # The first report comes after the last check of the input, so a bad option prints only its error.
    stage = Counter(progress, "exporting the graph", 2)
    reference = reference_by_batch(model, pixels, levels, opts.output)
    stage.advance()
    full = build_onnx(model, levels, opts.output, opts.with_preprocessing, opts.fp16, opts.opset,
                      single_level=len(levels) == 1 and not want_all)
    stage.advance()
    temps: dict[str, Path] = {}
    try:
        files = _write_and_verify(full, plan, out_dir, model, pixels, reference, opts, temps, progress)
        report = _report(model, run_dir, out_dir, full, levels, want_all, opts, image_source, files)
        _raise_if_failed(report)
        for name, temp in temps.items():
            commit_temp(temp, out_dir / name)  # verified: now put in place, with the umask's mode
        return report
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)


def _write_and_verify(full, plan: list[PlannedFile], out_dir: Path, model, pixels, reference,
                      opts: ExportOptions, temps: dict[str, Path], progress: ProgressFn | None) -> list[dict]:
    """Each planned file written to a temporary file beside its target (recorded in `temps`, so
    the caller removes it on failure) and verified there; one entry per file for the report."""
    from .verify import verify_onnx

    files = []
    verified = Counter(progress, "verifying files", len(plan))
    for f in plan:
        proto = full if f.whole else extract_levels(full, f.levels)
        temps[f.name] = temp = temp_path_beside(out_dir / f.name)
        data = proto.SerializeToString()
        temp.write_bytes(data)
        check = verify_onnx(temp, model, pixels, provider=opts.provider, fp16=opts.fp16, reference=reference)
        check["path"] = str(out_dir / f.name)
        files.append({"path": str(out_dir / f.name), "levels": f.levels,
                      "dims": level_dims(model, f.levels, opts.output), "bytes": len(data), "verification": check})
        verified.advance()
    return files


def _report(model, run_dir, out_dir: Path, full, levels: list[int], want_all: bool, opts: ExportOptions,
            image_source: str, files: list[dict]) -> dict:
    from .verify import tolerance_for

    metadata = {p.key: p.value for p in full.metadata_props}
    return {
        "run": str(run_dir), "model_sha256": metadata["model_sha256"], "metadata": metadata,
        "run_levels": list(range(model.num_levels)),
        "level": "all" if want_all else levels[0] if len(levels) == 1 else format_levels(levels),
        "output": opts.output, "precision": "fp16" if opts.fp16 else "fp32",
        "with_preprocessing": opts.with_preprocessing, "opset": opts.opset,
        "provider": files[0]["verification"]["provider"], "images": image_source,
        "tolerance": tolerance_for(opts.fp16).describe(), "out": str(out_dir), "files": files,
        "passed": all(f["verification"]["passed"] for f in files),
    }


def _raise_if_failed(report: dict) -> None:
    if report["passed"]:
        return
    bad = next(f for f in report["files"] if not f["verification"]["passed"])
    v = bad["verification"]
    if v["checker"] != "passed":
        why = f"onnx.checker {v['checker']}"
    else:
        row = next(r for r in v["levels"] if not r["passed"])
        why = (f"level {row['level']} max abs diff {row['max_abs_diff']:.3g}, min cosine "
               f"{row['min_cosine']:.7f} ({report['tolerance']})")
    raise VerificationError(f"verification failed for {Path(bad['path']).name}: {why}; nothing was written.", report)
