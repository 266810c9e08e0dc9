"""One way from an image file to its vector: `sjea embed`, queries, the Python call and a plain
ONNX client agree on a folder of every kind of file; the CPU query path does not import torch;
a changed ONNX file cannot pass as the genuine model; oversized images are refused before decoding."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SJEA = [sys.executable, "-c", "import sys; from sjea_tools.cli import main; sys.argv[0] = 'sjea'; sys.exit(main())"]


def write_mixed_folder(root: Path, data) -> list[str]:
    """Real Fashion-MNIST pictures saved as every kind of file a user has (one picture each)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    px = [data.pixels[i] for i in range(0, 160, 10)]
    big = lambda i, size: Image.fromarray(px[i]).resize(size, Image.BICUBIC)  # noqa: E731
    big(0, (4000, 3000)).save(root / "camera.jpg", quality=90)  # camera size: draft-decoded at 1/8
    big(1, (640, 480)).save(root / "medium.jpg", quality=85)
    Image.fromarray(px[2]).save(root / "small.jpg", quality=95)
    big(3, (300, 200)).save(root / "plain.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    big(4, (320, 240)).save(root / "rotated.jpg", quality=90, exif=exif.tobytes())
    rgba = big(5, (120, 90)).convert("RGBA")
    rgba.putalpha(128)  # half transparent: composited over white
    rgba.save(root / "halfalpha.png")
    gray16 = (np.asarray(big(6, (100, 80)).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(root / "gray16.png")  # mode I;16
    big(7, (90, 90)).convert("P", palette=Image.ADAPTIVE, colors=64).save(root / "palette.png")
    Image.fromarray(px[8]).convert("L").save(root / "gray.png")
    big(9, (200, 200)).save(root / "photo.webp", quality=90)
    for i in range(10, len(px)):  # more pictures in the store, so rank 1 means something
        Image.fromarray(px[i]).save(root / f"other{i}.png")
    modes = {p: Image.open(root / p).mode for p in ("gray16.png", "palette.png", "halfalpha.png")}
    assert modes == {"gray16.png": "I;16", "palette.png": "P", "halfalpha.png": "RGBA"}, modes
    return sorted(p.name for p in root.iterdir())


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, fmnist_test):
    """(run, image folder, store written by sjea embed, file names) with a 2-level run."""
    from conftest import make_run

    from sjea_tools.pipeline import embed_and_index

    base = tmp_path_factory.mktemp("mixed")
    run = make_run(base / "run", levels=2, encoder="mlp", whitened=True)  # the README's client centres and whitens too
    names = write_mixed_folder(base / "images", fmnist_test)
    store = base / "mixed.h5"
    embed_and_index(base / "images", store, run=run, workers=0, batch_size=4)
    return run, base / "images", store, names


def stored_rows(store: Path) -> tuple[list[str], dict[int, np.ndarray]]:
    from sjea_tools.store import open_store

    with open_store(store) as s:
        return list(s.paths), {lv: s.read_embeddings(lv, np.arange(s.n)) for lv in s.levels}


def test_every_file_queried_by_itself_is_rank_one_at_every_level(mixed):
    from sjea_tools.search import search_store

    run, images, store, names = mixed
    paths, _ = stored_rows(store)
    assert sorted(paths) == names  # every kind of file was stored, none failed
    for name in names:
        res = search_store(store, queries=[str(images / name)], k=1, mode="per-level", level="all")
        for level, hits in res["results"][0]["per_level"].items():
            assert hits[0]["path"] == name, (name, level, hits)
            assert hits[0]["score"] >= 0.99999, (name, level, hits[0]["score"])


def test_python_call_returns_the_stored_rows(mixed):
    import sjea_tools

    run, images, store, names = mixed
    paths, rows = stored_rows(store)
    files = [images / p for p in paths]
    for source in ({"store": store}, {"run": run}):
        got = sjea_tools.embed_files(files, **source)
        assert sorted(got) == sorted(rows)
        for lv, want in rows.items():
            assert got[lv].shape == want.shape
            assert np.abs(got[lv] - want).max() <= 1e-5, (source, lv, np.abs(got[lv] - want).max())
    one = sjea_tools.embed_files([images / "camera.jpg"], store=store, levels="1")
    assert list(one) == [1] and np.abs(one[1][0] - rows[1][paths.index("camera.jpg")]).max() <= 1e-5


def test_an_image_opened_without_the_decoder_differs_on_a_camera_jpeg(mixed):
    """Why the call above exists: full-size decoding (no JPEG draft) gives another vector."""
    from PIL import Image

    from sjea_tools.embed import Embedder

    run, images, store, names = mixed
    emb = Embedder.from_source(run=run)
    (full,) = emb.embed_images([Image.open(images / "camera.jpg").convert("RGB")])[:1]
    (drafted,) = emb.embed_files([images / "camera.jpg"])[:1]
    assert np.abs(full - drafted).max() > 1e-5


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    after = text.split("<!-- snippet:onnx-numpy", 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def run_plain_client(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run client code with only onnxruntime, numpy and Pillow importable (no sjea on the path)."""
    import onnxruntime
    import PIL

    code += ("\nimport importlib.util, sys\n"
             "assert importlib.util.find_spec('sjea_tools') is None and importlib.util.find_spec('exports') is None\n"
             "assert 'torch' not in sys.modules\n")
    script = tmp_path / "client.py"
    script.write_text(code)
    site_dirs = sorted({str(Path(m.__file__).parents[1]) for m in (onnxruntime, np, PIL)})
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join(site_dirs)}
    return subprocess.run([sys.executable, "-S", str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("with_preprocessing", [False, True])
def test_plain_client_from_the_readme_gives_the_stored_rows(mixed, tmp_path, with_preprocessing):
    from sjea_tools.exports.onnx import export_run

    run, images, store, names = mixed
    report = export_run(run, level="all", out=tmp_path / "onnx", with_preprocessing=with_preprocessing)
    model = report["files"][-1]["path"]
    assert model.endswith("all_levels-uint8.onnx" if with_preprocessing else "all_levels.onnx")
    paths, rows = stored_rows(store)
    code = readme_snippet()
    assert 'MODEL = "runs/tiny/onnx/all_levels.onnx"' in code and 'IMAGES = ["shoe.jpg", "bag.png"]' in code
    code = code.replace('"runs/tiny/onnx/all_levels.onnx"', repr(model))
    code = code.replace('["shoe.jpg", "bag.png"]', repr([str(images / p) for p in paths]))
    code += f"\nnp.savez({str(tmp_path / 'out.npz')!r}, *vectors)\n"  # one array per level: dims differ
    done = run_plain_client(code, tmp_path)
    assert done.returncode == 0, done.stderr
    saved = np.load(tmp_path / "out.npz")
    got = [saved[f"arr_{j}"] for j in range(len(saved.files))]
    for j, lv in enumerate(sorted(rows)):
        want = rows[lv] / np.linalg.norm(rows[lv], axis=1, keepdims=True)
        cosines = np.sum(got[j] * want, axis=1)
        worst = int(np.argmin(cosines))
        assert cosines.min() >= 0.9999, (lv, paths[worst], float(cosines.min()))


def test_cli_search_of_a_file_does_not_import_torch(mixed):
    run, images, store, names = mixed
    probe = ("import sys, atexit\n"
             "atexit.register(lambda: print('TORCH_IMPORTED', 'torch' in sys.modules, file=sys.stderr))\n"
             "from sjea_tools.cli import main\nsys.argv[0] = 'sjea'\nsys.exit(main())\n")
    done = subprocess.run([sys.executable, "-c", probe, "search", str(images / "rotated.jpg"), "--store", str(store),
                           "--level", "0", "--k", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert '"rotated.jpg"' in done.stdout
    assert "TORCH_IMPORTED False" in done.stderr, done.stderr


def test_cli_search_imports_only_its_own_command(mixed):
    """`sjea search` imports none of the other commands (train, embed: their progress bars)."""
    run, images, store, names = mixed
    unneeded = ("rich.progress", "sjea_tools.cli.train", "sjea_tools.cli.embed", "sjea_tools.grid")
    probe = ("import sys, atexit\n"
             f"atexit.register(lambda: print('LOADED', [m for m in {unneeded!r} if m in sys.modules], file=sys.stderr))\n"
             "from sjea_tools.cli import main\nsys.argv[0] = 'sjea'\nsys.exit(main())\n")
    done = subprocess.run([sys.executable, "-c", probe, "search", str(images / "rotated.jpg"), "--store", str(store),
                           "--level", "0", "--k", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stderr, done.stderr


# --- the cache of optimised graphs ----------------------------------------------------------------

def test_optimised_graph_cache_gives_the_same_vectors_and_passes_over_a_bad_file(mixed, tmp_path, monkeypatch):
    """A CPU session loads the graph ONNX Runtime optimised before (one file per content, named by
    hex digits only, in $SJEA_ORT_CACHE) and gives the vectors of an uncached session; an
    unreadable cached file, or another model's graph under this name, is passed over silently and
    replaced; with the cache off nothing is written."""
    import sjea_tools.exports.graph_cache as graph_cache
    import sjea_tools.exports.runtime as runtime
    from sjea_tools.exports.runtime import OnnxModel

    from sjea_tools.embed.backends import ONNX_CACHE_DIR, cache_name
    from sjea_tools.runs import model_file, model_id

    run, images, store, names = mixed
    model = Path(run) / ONNX_CACHE_DIR / cache_name(model_id(model_file(run)))
    cache = tmp_path / "ort"
    monkeypatch.setenv("SJEA_ORT_CACHE", "off")
    plain = OnnxModel(model, provider="cpu")
    batch = np.random.default_rng(1).integers(0, 256, (3, plain.image_size, plain.image_size, 3), dtype=np.uint8)
    if not plain.takes_pixels:
        batch = np.random.default_rng(1).standard_normal((3, 3, plain.image_size, plain.image_size)).astype(np.float32)
    want = plain.run(batch)
    assert not cache.exists()

    monkeypatch.setenv("SJEA_ORT_CACHE", str(cache))
    loads = []
    real = graph_cache.try_session
    monkeypatch.setattr(graph_cache, "try_session", lambda src, *a: loads.append(src) or real(src, *a))

    def check(expect_loaded_from_cache: bool) -> Path:
        loads.clear()
        m = OnnxModel(model, provider="cpu")
        files = sorted(cache.iterdir())
        assert len(files) == 1 and re.fullmatch(r"[0-9a-f]{40}\.onnx", files[0].name), files
        assert (loads == [str(files[0])]) == expect_loaded_from_cache, loads
        for got, ref in zip(m.run(batch), want):
            assert np.abs(got - ref).max() <= 1e-6 * max(1.0, float(np.abs(ref).max()))
        assert (m.model_id, m.levels, m.preprocess) == (plain.model_id, plain.levels, plain.preprocess)
        return files[0]

    cached = check(False)  # written
    check(True)  # loaded
    cached.write_bytes(b"not an onnx graph")
    check(False)  # unreadable: optimised again, replaced
    check(True)
    # Another export's optimised graph under this name: its metadata records another graph.
    import onnx

    proto = onnx.load(str(model))
    for entry in proto.metadata_props:
        if entry.key == "graph_sha256":
            entry.value = "0" * 64
    other = tmp_path / "other.onnx"
    other.write_bytes(proto.SerializeToString())
    monkeypatch.setenv("SJEA_ORT_CACHE", str(tmp_path / "other-cache"))
    with pytest.raises(runtime.ModelIdentityError):  # refused, after its optimised graph was written
        OnnxModel(other, provider="cpu")
    (written,) = (tmp_path / "other-cache").iterdir()
    cached.write_bytes(written.read_bytes())
    monkeypatch.setenv("SJEA_ORT_CACHE", str(cache))
    check(False)
    check(True)


# --- a changed ONNX file is not the genuine model -------------------------------------------------

def flip_weight_bytes(src: Path, dst: Path, count: int = 2000) -> None:
    """Copy src with `count` bytes of its largest weight tensor inverted (structure intact)."""
    import onnx

    data = bytearray(src.read_bytes())
    proto = onnx.load_from_string(bytes(data))
    raw = max((t.raw_data for t in proto.graph.initializer), key=len)
    assert len(raw) > 4 * count
    start = data.find(raw[:256])
    assert start > 0 and data[start:start + len(raw)] == raw
    for i in range(start + 1000, start + 1000 + count):
        data[i] ^= 0xFF
    dst.write_bytes(bytes(data))


def test_a_tampered_onnx_cannot_add_rows_to_a_genuine_store(mixed, tmp_path):
    from sjea_tools.exports.onnx import export_run

    run, images, store, names = mixed
    export_run(run, level="all", out=tmp_path / "onnx")
    genuine = tmp_path / "onnx" / "all_levels.onnx"
    flipped = tmp_path / "flipped.onnx"
    flip_weight_bytes(genuine, flipped)
    first = tmp_path / "first"
    first.mkdir()
    for name in names[:5]:
        (first / name).write_bytes((images / name).read_bytes())
    gstore = tmp_path / "genuine.h5"
    done = subprocess.run([*SJEA, "embed", str(first), str(gstore), "--onnx", str(genuine), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    before = gstore.read_bytes()
    done = subprocess.run([*SJEA, "embed", str(images), str(gstore), "--onnx", str(flipped), "--update", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "modified after export" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert gstore.read_bytes() == before


def test_the_genuine_file_keeps_the_checkpoint_identity_and_a_changed_cache_is_re_exported(mixed, tmp_path):
    from sjea_tools.exports.onnx import export_run
    from sjea_tools.exports.runtime import OnnxModel, content_model_id, graph_sha256

    from sjea_tools.embed import Embedder
    from sjea_tools.embed.backends import ONNX_CACHE_DIR, cache_name
    from sjea_tools.runs import model_file, model_id

    run, images, store, names = mixed
    sha = model_id(model_file(run))
    export_run(run, level="all", out=tmp_path / "onnx")
    genuine = tmp_path / "onnx" / "all_levels.onnx"
    assert OnnxModel(genuine, provider="cpu").model_id == sha
    # The same graph with its metadata record removed claims nothing: identified by content.
    import onnx

    proto = onnx.load(str(genuine))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != "graph_sha256"]
    del proto.metadata_props[:]
    for key, value in kept:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(proto.SerializeToString())
    assert OnnxModel(bare, provider="cpu").model_id == content_model_id(graph_sha256(bare.read_bytes())) != sha
    # A changed file in the run's cache is replaced by a fresh export, never used.
    cached = Path(run) / ONNX_CACHE_DIR / cache_name(sha)
    assert cached.is_file()
    flip_weight_bytes(cached, cached)
    emb = Embedder.from_source(run=run)
    assert emb.model_id == sha and OnnxModel(cached, provider="cpu").model_id == sha


# --- the pixel cap ----------------------------------------------------------------------------------

def write_huge_png(path: Path, side: int = 18000) -> None:
    """A valid grayscale PNG of side x side black pixels, streamed (about 1 MB on disk)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    comp, row, parts = zlib.compressobj(9), b"\x00" * (side + 1), []
    for _ in range(side):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def test_pixel_cap_is_pillows_default_and_stated():
    from PIL import Image

    from sjea_tools.data.images import MAX_PIXELS, check_pixel_count

    assert MAX_PIXELS == Image.MAX_IMAGE_PIXELS == 89_478_485  # and Pillow's global is left alone
    check_pixel_count((9459, 9459))  # 89.47 MP: allowed
    check_pixel_count((8000, 6000))  # a 48 MP camera photo
    with pytest.raises(ValueError, match="over the 89.5 MP cap"):
        check_pixel_count((9460, 9460))


def test_huge_png_is_refused_before_decoding_recorded_when_embedding_one_line_as_query(mixed, tmp_path):
    run, images, store, names = mixed
    huge = tmp_path / "imgs" / "huge.png"
    huge.parent.mkdir()
    write_huge_png(huge)
    assert huge.stat().st_size < 2_000_000
    (huge.parent / "small.jpg").write_bytes((images / "small.jpg").read_bytes())
    # Decoding it alone stays small: refused from the header (a full decode is 324 MB of pixels).
    # (VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent.)
    probe = ("import re, sys\nfrom sjea_tools.data.preprocess import file_pixels\n"
             "try:\n    file_pixels(sys.argv[1], 28)\nexcept ValueError as e:\n    print('REFUSED', e)\n"
             "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
             "print('PEAK_MB', int(hwm) / 1024)\n")
    done = subprocess.run([sys.executable, "-c", probe, str(huge)], capture_output=True, text=True, timeout=120)
    refused = done.stdout.split("REFUSED", 1)[-1]
    assert "too large to decode safely" in refused and "89.5 MP cap" in refused, done.stdout + done.stderr
    assert float(done.stdout.split("PEAK_MB")[1]) < 250, done.stdout  # its pixels alone are 324 MB
    # Embedding a folder holding it: the other file is stored, the huge one listed in /failed.
    from sjea_tools.embed import embed_folder
    from sjea_tools.store import open_store

    out = tmp_path / "withhuge.h5"
    embed_folder(huge.parent, out, run=run, workers=0)
    with open_store(out) as s:
        assert list(s.paths) == ["small.jpg"]
        failed = dict(s.failed)
    assert "too large to decode safely" in failed["huge.png"] and "89.5 MP cap" in failed["huge.png"]
    # As a query: one line, rc 2.
    done = subprocess.run([*SJEA, "search", str(huge), "--store", str(store), "--level", "0"],
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "too large to decode safely" in lines[0], done.stderr
