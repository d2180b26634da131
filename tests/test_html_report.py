"""The HTML report: its SVG and PNG writers, and the page rendered in headless Chromium."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

from sparsec import cli, html_report

TESTS = Path(__file__).parent
STRUCTURED = f"{TESTS / 'cli_model.py'}:structured_mlp"
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium") if p and Path(p).exists()), None)


def read_png(data: bytes) -> torch.Tensor:
    """Decode an 8-bit RGB or RGBA, non-interlaced PNG to a (height, width, 3) uint8 tensor."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    channels = 3 if colour_type == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    out = bytearray(height * stride)
    prev = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - channels] if x >= channels else 0
            b = prev[x]
            c = prev[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + a) & 255
            elif kind == 2:
                line[x] = (line[x] + b) & 255
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out[y * stride:(y + 1) * stride] = line
        prev = line
    return torch.frombuffer(out, dtype=torch.uint8).reshape(height, width, channels)[..., :3]


def test_occupancy_counts_each_tile():
    w = torch.zeros(32, 48)
    w[:16, :16] = 1  # one full tile
    w[20, 40] = 1  # one element in tile (1, 2)
    grid = html_report.occupancy(w, 16)
    assert grid.shape == (2, 3)
    assert grid[0, 0] == 1 and grid[1, 2] == pytest.approx(1 / 256) and int((grid > 0).sum()) == 2


def test_svg_heatmap_draws_only_non_empty_runs():
    grid = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    svg = html_report.svg_heatmap(grid)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    full = "#%02x%02x%02x" % html_report.HIGH
    assert svg.count(f'fill="{full}"') == 1  # the two full tiles are one run
    assert svg.count("<rect") == 4  # background, the full run, the half tile, the frame


def test_png_writer_round_trips():
    pixels = torch.randint(0, 256, (7, 5, 3), dtype=torch.uint8)
    assert torch.equal(read_png(html_report.png_bytes(pixels)), pixels)


def test_layer_png_puts_before_and_after_side_by_side():
    before = torch.zeros(64, 64)
    before[::16, ::16] = 1  # one non-zero in each 16x16 tile
    after = torch.zeros(64, 64)
    after[:16, :16] = 1
    image = read_png(html_report.layer_png(before, after, 16, max_px=64))
    assert image.shape == (66, 2 * 66 + 12, 3)
    dark = (image.int() - torch.tensor(html_report.HIGH)).abs().sum(-1) < 10
    assert int(dark[:, 66:].sum()) == 16 * 16  # the after map: one full tile of 16x16 pixels


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(tmp_path, capsys):
    page = tmp_path / "report.html"
    assert cli.main(["report", STRUCTURED, "-o", str(page)]) == 0
    shot = tmp_path / "shot.png"
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--hide-scrollbars", "--window-size=1100,900", f"--screenshot={shot}", page.as_uri()],
                          capture_output=True, text=True, timeout=60)
    assert shot.exists(), proc.stderr
    image = read_png(shot.read_bytes())
    assert image.shape[:2] == (900, 1100)
    pixels = image.reshape(-1, 3).int()
    white = (pixels > 240).all(-1).float().mean().item()
    near = lambda rgb: ((pixels - torch.tensor(rgb)).abs().sum(-1) < 30).float().mean().item()  # noqa: E731
    assert 0.3 < white < 0.98  # a page with content, not blank, not all ink
    assert near(html_report.HIGH) > 0.005  # the dark-blue cells of full tiles are drawn
    assert near((238, 243, 248)) > 0.001  # the table header background: the layer table is there
