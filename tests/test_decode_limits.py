"""The decoder's edges: memory bounded by the model's input, only the supported formats opened,
errors that name the file as the user gave it.

Memory is measured in a fresh subprocess with resource.getrusage's ru_maxrss (the peak RSS):
the peak after the decode minus the peak after a warm-up decode of a small image."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, UnidentifiedImageError

from sjea_tools.data.images import DECODE_BUDGET_BYTES, decode_image
from sjea_tools.data.preprocess import file_pixels, model_pixels

MODEL_SIZE = 64
# The stated bounds (docs: the decoder's docstrings): a thin strip costs about a model-sized
# image; 16 concurrent decodes share DECODE_BUDGET_BYTES (512 MiB) plus their model-sized outputs.
STRIP_PEAK_MB = 64
CONCURRENT_PEAK_MB = 1024
HELD_AFTER_MB = 100

MEASURE = textwrap.dedent("""
    import resource, sys, threading
    from PIL import Image
    from sjea_tools.data.preprocess import file_pixels
    from sjea_tools.embed.runner import release_freed_buffers_promptly

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

    path, threads, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    release_freed_buffers_promptly()  # what a long-lived process (sjea embed, the server) does
    Image.new("RGB", (80, 60)).save(path + ".warm.png")
    file_pixels(path + ".warm.png", size)
    base_peak, base_rss = peak_mb(), rss_mb()
    ts = [threading.Thread(target=file_pixels, args=(path, size)) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print(peak_mb() - base_peak, rss_mb() - base_rss)
""")

MAKE_PNG = textwrap.dedent("""
    import sys
    import numpy as np
    from PIL import Image
    w, h, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    row = (np.arange(w, dtype=np.uint32) % 251).astype(np.uint8)
    a = np.broadcast_to(row, (h, w))
    img = Image.fromarray(np.stack([a, a.T, a], -1)) if w == h else Image.fromarray(np.ascontiguousarray(a))
    img.save(path, compress_level=1)
""")


def _make_png(path, w, h) -> None:
    # in its own process: building a 7000 x 7000 image would raise the measuring process's peak
    subprocess.run([sys.executable, "-c", MAKE_PNG, str(w), str(h), str(path)], check=True)


def _measure(path, threads: int) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(threads), str(MODEL_SIZE)],
                         check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1])


@pytest.mark.parametrize("length", [300_000, 2_000_000])
def test_a_thin_strip_costs_a_model_sized_image(tmp_path, length):
    """Was 5.3 GB for 1 x 300,000 (a 1.2 KB PNG) and a MemoryError for 1 x 2,000,000: the short
    side resized to 64 made a 64 x (64 x length) intermediate."""
    path = tmp_path / "strip.png"
    _make_png(path, length, 1)
    peak, _ = _measure(path, 1)
    assert peak < STRIP_PEAK_MB, f"decoding a 1 x {length} strip peaked at {peak:.0f} MB extra"


def test_16_concurrent_large_decodes_stay_under_1gb_and_give_it_back(tmp_path):
    """Was 5.3 GB for 16 threads decoding a 7000 x 7000 PNG (374 MB for one): now each decode
    waits for its share of DECODE_BUDGET_BYTES, and reduces to the model's size inside it."""
    path = tmp_path / "big.png"
    _make_png(path, 7000, 7000)
    peak, held = _measure(path, 16)
    assert DECODE_BUDGET_BYTES <= 512 << 20
    assert peak < CONCURRENT_PEAK_MB, f"16 concurrent decodes peaked at {peak:.0f} MB extra"
    assert held < HELD_AFTER_MB, f"{held:.0f} MB stayed resident after the decodes"


def _old_model_pixels(img: Image.Image, s: int) -> np.ndarray:
    """The resize-then-crop of every store written so far."""
    w, h = img.size
    scale = s / min(w, h)
    nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
    left, top = (nw - s) // 2, (nh - s) // 2
    return np.asarray(img.crop((left, top, left + s, top + s)))


def _noise(w, h, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(640, 480), (300, 1000), (1200, 160)])
def test_ordinary_shapes_keep_their_pixels(size):
    img = _noise(*size)
    np.testing.assert_array_equal(model_pixels(img, 32), _old_model_pixels(img, 32))


def test_a_long_strip_gets_the_same_centre_crop():
    """Beyond the aspect cut-off only the crop's region is resized: the same picture (resampling
    from another origin moves values by a few levels at most)."""
    img = Image.fromarray(np.tile(np.linspace(0, 255, 2000).astype(np.uint8), (40, 1))).convert("RGB")
    got, want = model_pixels(img, 16).astype(int), _old_model_pixels(img, 16).astype(int)
    assert got.shape == want.shape == (16, 16, 3)
    assert np.abs(got - want).max() <= 2


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
       b"newpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")


@pytest.fixture
def eps_spy(monkeypatch):
    opened = []
    real = EpsImagePlugin.EpsImageFile._open

    def spy(self):
        opened.append(True)
        return real(self)

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", spy)
    return opened


def test_postscript_named_png_never_reaches_the_eps_plugin(tmp_path, eps_spy):
    path = tmp_path / "cat.png"
    path.write_bytes(EPS)
    with pytest.raises(UnidentifiedImageError, match="cannot identify"):
        decode_image(path)
    with pytest.raises(OSError):
        file_pixels(path, MODEL_SIZE)
    assert not eps_spy, "the EPS plugin parsed the file"


def test_an_upload_of_postscript_is_refused_at_its_header(eps_spy):
    from sjea_tools.serve.media import BadImage, image_size

    with pytest.raises(BadImage, match="not an image"):
        image_size(io.BytesIO(EPS), 50_000_000)
    assert not eps_spy


@pytest.mark.parametrize("content", [b"not an image at all", EPS])
def test_errors_name_the_file_as_the_user_gave_it(tmp_path, content):
    tmp = tmp_path / "sjea-serve-x1y2.img"
    tmp.write_bytes(content)
    with pytest.raises(OSError) as e:
        file_pixels(tmp, MODEL_SIZE, display_name="upload:cat.png")
    assert "upload:cat.png" in str(e.value)
    assert str(tmp_path) not in str(e.value) and "sjea-serve" not in str(e.value)


def test_a_truncated_png_error_shows_no_path(tmp_path):
    buf = io.BytesIO()
    _noise(64, 64).save(buf, format="PNG")
    tmp = tmp_path / "sjea-serve-t.img"
    tmp.write_bytes(buf.getvalue()[:300])
    with pytest.raises(OSError) as e:
        decode_image(tmp, display_name="upload:t.png")
    assert str(tmp_path) not in str(e.value)
