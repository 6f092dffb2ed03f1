"""The built-in benchmark: a procedurally generated instance-retrieval dataset.

``make_synthetic(root)`` renders, from a seed and with no download, a small landmark-retrieval
benchmark laid out exactly like the revisitop datasets (Revisited Oxford / Paris)::

    <root>/jpg/<name>.jpg        database and query images (RGB JPEG)
    <root>/gnd_synthetic.pkl     {"imlist", "qimlist", "gnd"}; gnd[i] = {"easy", "hard", "junk", "bbx"}
    <root>/synthetic.json        generation parameters, seed and format version (the "complete" marker)
    <root>/meta_synthetic.json   per-image render record (scene, label, pose, visible fraction), for tuning

so one loader and one evaluation path serve it and ROxf/RPar.

*Landmarks* are procedural scenes -- facades (walls, window grids, doors, roofs, towers, domes,
ornaments), panels (mosaics, stripes, rose windows, murals) and sculptures (obelisks, gates,
stacked and abstract shape compositions).  Scenes are drawn from a few shared *style families*
(palette + structure), so several landmarks look alike and the same families also produce the
non-landmark *distractor* scenes.  Every image is a *view*: the scene is warped by a camera
homography (yaw / pitch / roll, scale, position, so partial views happen) onto a cluttered
background (sky, ground, distant buildings, trees), occluded by foreground objects, re-lit,
blurred, noised and JPEG-compressed.

Database views are labelled from what was rendered, as revisitop does by hand: the landmark
barely visible (visible fraction of its area < ``junk_visible`` or it covers < ``junk_area`` of the
image) -> ``junk``; a mild view (visible >= ``easy_visible``, large enough, small yaw / pitch /
roll, mild lighting) -> ``easy``; anything in between -> ``hard``.  Queries are mild views of
the landmark with ``bbx`` the box of its visible region.

Every image is rendered from its own integer seed drawn from ``np.random.default_rng(seed)``,
so the output is byte-identical for a seed and independent of how many worker processes render.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import multiprocessing as mp
import os
import pickle
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["DATASET", "FORMAT_VERSION", "SIZES", "SyntheticConfig", "contact_sheet", "make_synthetic"]

DATASET = "synthetic"
FORMAT_VERSION = 1
_PREFIX = "synth_"  # every image name starts with it

Color = tuple[int, int, int]
Rng = np.random.Generator


@dataclass(frozen=True)
class SyntheticConfig:
    """Size, look and difficulty of the synthetic benchmark (all knobs are part of the cache key).

    Angles are in degrees.  ``*_scale`` is the landmark size relative to "just fits the frame"
    (1.0 = its larger relative side spans the image).  Label thresholds decide how a rendered
    database view is labelled; the ``label_mix`` only decides which kind of view is *attempted*.
    """

    # -- size --------------------------------------------------------------------------------
    n_landmarks: int = 48
    views_per_landmark: int = 9  # database views per landmark
    queries_per_landmark: int = 2
    n_distractors: int = 420  # database images that show no benchmark landmark
    clutter_fraction: float = 0.3  # share of distractors that are pure clutter (no main object)
    distractor_views: int = 3  # a distractor scene is seen in 1..distractor_views images
    image_sizes: tuple[tuple[int, int], ...] = ((320, 240), (240, 320), (288, 288))  # (width, height)
    jpeg_quality: int = 90
    # -- confusability -------------------------------------------------------------------------
    n_families: int = 10  # style families shared by landmarks and distractor scenes
    family_variation: float = 0.45  # 0: landmarks of a family are near-twins, 1: independent
    scene_mix: tuple[float, float, float] = (0.6, 0.2, 0.2)  # facade, panel, sculpture families
    distractor_family_share: float = 0.75  # distractor scenes drawn from the landmark families
    # -- which views are attempted (easy, hard, junk) --------------------------------------------
    label_mix: tuple[float, float, float] = (0.4, 0.42, 0.18)
    # -- viewpoint -------------------------------------------------------------------------------
    easy_yaw: float = 22.0
    hard_yaw: float = 62.0
    easy_pitch: float = 10.0
    hard_pitch: float = 28.0
    easy_roll: float = 5.0
    hard_roll: float = 22.0
    easy_scale: tuple[float, float] = (0.6, 0.92)
    query_scale: tuple[float, float] = (0.62, 0.9)
    far_scale: tuple[float, float] = (0.25, 0.42)
    close_scale: tuple[float, float] = (1.2, 2.2)
    junk_scale: tuple[float, float] = (0.07, 0.16)
    # -- occlusion, lighting, image quality --------------------------------------------------------
    occluders: float = 1.0  # mean number of small foreground occluders in a mild view
    hard_occlusion: tuple[float, float] = (0.3, 0.6)  # box coverage of the big occluder in hard views
    photometric: float = 1.0  # strength of exposure / gamma / contrast / colour-cast changes
    max_blur: float = 1.8  # Gaussian blur sigma (px) of the worst views
    max_noise: float = 7.0  # sensor noise sigma (0..255) of the worst views
    clutter: float = 1.0  # density of background clutter (buildings, trees, people)
    # -- labelling -------------------------------------------------------------------------------
    junk_visible: float = 0.2  # visible fraction of the landmark below which a view is junk
    junk_area: float = 0.025  # image fraction covered by the landmark (silhouette-normalised) -> junk
    easy_visible: float = 0.72  # an easy view shows at least this fraction of the landmark ...
    easy_area: float = 0.15  # ... covering at least this fraction of the image (see ``_render_view``)
    easy_quality: float = 0.5  # ... with lighting/blur/noise severity (0..1) at most this
    junk_min_visible: float = 0.04  # ... but a junk view still shows this fraction of it (else redrawn)
    junk_min_area: float = 0.005  # ... covering at least this (silhouette-normalised) image fraction
    query_visible: float = 0.8  # queries show at least this fraction of the landmark

    def __post_init__(self) -> None:
        if self.n_landmarks < 1 or self.views_per_landmark < 1 or self.queries_per_landmark < 1:
            raise ValueError("SyntheticConfig: need at least one landmark, view and query per landmark")
        if self.n_distractors < 0 or self.n_families < 1 or self.distractor_views < 1:
            raise ValueError("SyntheticConfig: n_distractors >= 0, n_families >= 1, distractor_views >= 1")
        if not self.image_sizes or any(min(s) < 32 for s in self.image_sizes):
            raise ValueError("SyntheticConfig: image_sizes must be non-empty (width, height) pairs >= 32")
        for name in ("scene_mix", "label_mix"):
            mix = getattr(self, name)
            if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
                raise ValueError(f"SyntheticConfig.{name} must be 3 non-negative weights")
        if not 0 <= self.clutter_fraction <= 1 or not 0 <= self.family_variation <= 1:
            raise ValueError("SyntheticConfig: clutter_fraction and family_variation must be in [0, 1]")

    @property
    def n_images(self) -> int:
        """Total number of JPEGs (database + queries)."""
        return self.n_landmarks * (self.views_per_landmark + self.queries_per_landmark) + self.n_distractors


SIZES: dict[str, SyntheticConfig] = {
    # unit tests: 6 landmarks x (4 views + 1 query) + 12 distractors = 42 images, ~1 s
    "tiny": SyntheticConfig(n_landmarks=6, views_per_landmark=4, queries_per_landmark=1, n_distractors=12,
                            n_families=3, distractor_views=2, label_mix=(0.45, 0.4, 0.15)),
    # 48 x (9 + 2) + 420 = 948 images
    "default": SyntheticConfig(),
    # 120 x (10 + 2) + 2600 = 4040 images
    "large": SyntheticConfig(n_landmarks=120, views_per_landmark=10, n_distractors=2600, n_families=16),
}


# ================================================================================================
# small drawing helpers
# ================================================================================================

def _jit(rng: Rng, col: Color, amt: float = 12.0) -> Color:
    c = np.clip(np.asarray(col, dtype=np.float64) + rng.normal(0.0, amt, 3), 0, 255)
    return (int(c[0]), int(c[1]), int(c[2]))


def _mix(a: Color, b: Color, t: float) -> Color:
    return (int(a[0] + (b[0] - a[0]) * t), int(a[1] + (b[1] - a[1]) * t), int(a[2] + (b[2] - a[2]) * t))


def _mul(col: Color, f: float) -> Color:
    return (min(255, int(col[0] * f)), min(255, int(col[1] * f)), min(255, int(col[2] * f)))


def _a(col: Color, alpha: int = 255) -> tuple[int, int, int, int]:
    return (col[0], col[1], col[2], alpha)


def _rect(d: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float, fill: Any,
          outline: Any = None, width: int = 1) -> None:
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    d.rectangle((x0, y0, x1, y1), fill=fill, outline=outline, width=width)


def _ellipse(d: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, fill: Any,
             outline: Any = None, width: int = 1) -> None:
    rx, ry = abs(rx), abs(ry)
    d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill, outline=outline, width=width)


def _ngon(cx: float, cy: float, r: float, n: int, rot: float = 0.0, ry: float | None = None) -> list[tuple]:
    ry = r if ry is None else ry
    return [(cx + r * math.cos(rot + 2 * math.pi * k / n), cy + ry * math.sin(rot + 2 * math.pi * k / n))
            for k in range(n)]


def _value_noise(rng: Rng, w: int, h: int, cells: float, octaves: int = 3) -> np.ndarray:
    """Smooth fractal noise in [0, 1], shape (h, w), float32 (bicubic-upsampled random grids)."""
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        c = cells * 2**o
        gw, gh = max(2, int(round(c * w / max(w, h))) + 1), max(2, int(round(c * h / max(w, h))) + 1)
        grid = Image.fromarray(rng.random((gh, gw), dtype=np.float32))
        out += amp * np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC))
        total += amp
        amp *= 0.5
    return np.clip(out / total, 0.0, 1.0)


def _weather(rng: Rng, im: Image.Image, amount: float) -> Image.Image:
    """Stains and rain streaks: multiplicative low-frequency noise on the RGB of an RGBA scene."""
    a = np.asarray(im).astype(np.float32)
    h, w = a.shape[:2]
    blotch = _value_noise(rng, w, h, rng.uniform(3, 7))
    streak = np.asarray(Image.fromarray(rng.random((3, int(rng.integers(12, 30))), dtype=np.float32))
                        .resize((w, h), Image.Resampling.BICUBIC))
    f = 1.0 + amount * (blotch - 0.5) + 0.5 * amount * (np.clip(streak, 0, 1) - 0.5)
    a[..., :3] *= f[..., None]
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGBA")


# ================================================================================================
# scenes: families, landmark variation, drawing
# ================================================================================================

_PALETTES: list[dict[str, Color]] = [
    # wall, trim, roof, glass, accent
    {"wall": (205, 178, 135), "trim": (236, 222, 192), "roof": (150, 82, 60), "glass": (55, 62, 74),
     "accent": (118, 88, 60)},  # sandstone
    {"wall": (152, 74, 56), "trim": (226, 216, 200), "roof": (82, 62, 56), "glass": (42, 48, 58),
     "accent": (44, 74, 62)},  # brick
    {"wall": (234, 230, 220), "trim": (72, 110, 168), "roof": (170, 92, 62), "glass": (60, 80, 110),
     "accent": (72, 110, 168)},  # whitewash
    {"wall": (146, 144, 138), "trim": (192, 190, 182), "roof": (72, 76, 82), "glass": (36, 40, 46),
     "accent": (122, 110, 90)},  # grey stone
    {"wall": (208, 160, 82), "trim": (240, 230, 210), "roof": (160, 72, 52), "glass": (60, 56, 52),
     "accent": (92, 120, 80)},  # ochre
    {"wall": (224, 176, 170), "trim": (244, 240, 230), "roof": (122, 100, 100), "glass": (70, 80, 92),
     "accent": (100, 140, 130)},  # pastel pink
    {"wall": (172, 204, 186), "trim": (240, 240, 234), "roof": (92, 92, 96), "glass": (50, 60, 72),
     "accent": (200, 122, 92)},  # mint
    {"wall": (96, 102, 112), "trim": (172, 172, 176), "roof": (52, 54, 60), "glass": (30, 36, 46),
     "accent": (172, 142, 62)},  # slate
    {"wall": (226, 222, 214), "trim": (200, 194, 184), "roof": (120, 126, 132), "glass": (50, 56, 62),
     "accent": (182, 150, 72)},  # marble
    {"wall": (186, 106, 76), "trim": (230, 200, 160), "roof": (110, 60, 46), "glass": (46, 42, 42),
     "accent": (62, 92, 112)},  # terracotta
    {"wall": (122, 142, 162), "trim": (202, 206, 212), "roof": (82, 86, 96), "glass": (62, 92, 124),
     "accent": (222, 222, 226)},  # glass and steel
]
_EXTRA = [(196, 48, 44), (40, 92, 170), (232, 190, 50), (44, 130, 80), (120, 60, 140), (236, 236, 230),
          (30, 30, 34), (220, 120, 40), (80, 170, 190), (160, 30, 70)]
_KINDS = ("facade", "panel", "sculpture")
_COLOR_KEYS = ("wall", "trim", "roof", "glass", "accent", "c1", "c2", "c3", "c4", "c5")


def _palette(rng: Rng) -> dict[str, Color]:
    base = _PALETTES[int(rng.integers(len(_PALETTES)))]
    pal = {k: _jit(rng, v, 14) for k, v in base.items()}
    extra = rng.choice(len(_EXTRA), 3, replace=False)
    cols = [pal["accent"], pal["trim"], *(_jit(rng, _EXTRA[i], 18) for i in extra)]
    for k, c in zip(("c1", "c2", "c3", "c4", "c5"), cols, strict=True):
        pal[k] = c
    return pal


def _facade_params(rng: Rng) -> dict[str, Any]:
    return {
        "floors": int(rng.integers(2, 6)), "cols": int(rng.integers(3, 8)),
        "floor_h": float(rng.uniform(42, 62)), "col_w": float(rng.uniform(40, 58)),
        "ground": float(rng.uniform(1.1, 1.5)),
        "win_w": float(rng.uniform(0.38, 0.62)), "win_h": float(rng.uniform(0.45, 0.68)),
        "win_style": str(rng.choice(["rect", "arch", "round", "double", "tall", "pediment"])),
        "top": str(rng.choice(["flat", "gable", "dome", "towers", "mansard", "stepped", "spire"])),
        "door": str(rng.choice(["arch", "rect", "arcade", "shops"])),
        "shutters": bool(rng.random() < 0.35), "bands": bool(rng.random() < 0.6),
        "pilasters": bool(rng.random() < 0.45), "balcony": bool(rng.random() < 0.35),
        "masonry": str(rng.choice(["plaster", "brick", "stone"])), "pitch": float(rng.uniform(0.22, 0.42)),
    }


def _panel_params(rng: Rng) -> dict[str, Any]:
    return {
        "shape": str(rng.choice(["rect", "arch", "circle", "octagon"])),
        "pattern": str(rng.choice(["tiles", "stripes", "rings", "sectors", "mosaic", "checker", "marble"])),
        "width": float(rng.uniform(250, 360)), "aspect": float(rng.uniform(0.7, 1.4)),
        "frame": float(rng.uniform(0.03, 0.08)), "cells": int(rng.integers(4, 10)),
        "emblem": str(rng.choice(["none", "circle", "star", "diamond"])),
        "mount": str(rng.choice(["none", "legs", "plinth"])), "angle": float(rng.uniform(-60, 60)),
    }


def _sculpture_params(rng: Rng) -> dict[str, Any]:
    return {
        "style": str(rng.choice(["obelisk", "gate", "stack", "abstract", "column", "figure"])),
        "width": float(rng.uniform(200, 300)), "height": float(rng.uniform(280, 400)),
        "tiers": int(rng.integers(1, 4)), "parts": int(rng.integers(3, 8)),
    }


_PARAMS = {"facade": _facade_params, "panel": _panel_params, "sculpture": _sculpture_params}


def _family(seed: int, scene_mix: tuple[float, float, float]) -> dict[str, Any]:
    """A style family: scene kind, palette and base structure, shared by several scenes."""
    rng = np.random.default_rng(seed)
    p = np.asarray(scene_mix, dtype=np.float64)
    kind = _KINDS[int(rng.choice(3, p=p / p.sum()))]
    return {"kind": kind, "palette": _palette(rng), "params": _PARAMS[kind](rng)}


def _scene_params(family: dict[str, Any], rng: Rng, variation: float) -> dict[str, Any]:
    """A member of a family: each structural attribute / colour re-drawn with prob ``variation``."""
    fresh = _PARAMS[family["kind"]](rng)
    params = {k: (fresh[k] if rng.random() < variation else v) for k, v in family["params"].items()}
    fresh_pal = _palette(rng)
    pal = {}
    for k, v in family["palette"].items():
        if rng.random() < 0.6 * variation:
            v = _mix(v, fresh_pal[k], float(rng.uniform(0.4, 1.0)))
        pal[k] = _jit(rng, v, 7)
    params.update(pal)
    return params


def _glass(d: ImageDraw.ImageDraw, rng: Rng, box: tuple[float, float, float, float], p: dict, shape: str,
           lit: bool) -> None:
    """A window pane (rect or arch) with a sky reflection and frame."""
    x0, y0, x1, y1 = box
    w = x1 - x0
    base = _mix(p["glass"], (235, 200, 120), 0.55) if lit else p["glass"]
    refl = _mix(base, (170, 190, 210), float(rng.uniform(0.15, 0.4)))
    frame = _a(p["trim"])
    if shape == "arch":
        _ellipse(d, (x0 + x1) / 2, y0 + w / 2, w / 2 + 2, w / 2 + 2, fill=frame)
        _rect(d, x0 - 2, y0 + w / 2, x1 + 2, y1 + 2, fill=frame)
        _ellipse(d, (x0 + x1) / 2, y0 + w / 2, w / 2, w / 2, fill=_a(refl))
        _rect(d, x0, y0 + w / 2, x1, y1, fill=_a(base))
    elif shape == "round":
        r = min(w, y1 - y0) / 2
        _ellipse(d, (x0 + x1) / 2, (y0 + y1) / 2, r + 2, r + 2, fill=frame)
        _ellipse(d, (x0 + x1) / 2, (y0 + y1) / 2, r, r, fill=_a(base))
        d.line(((x0 + x1) / 2 - r, (y0 + y1) / 2, (x0 + x1) / 2 + r, (y0 + y1) / 2), fill=frame, width=2)
        return
    else:
        _rect(d, x0 - 2, y0 - 2, x1 + 2, y1 + 2, fill=frame)
        _rect(d, x0, y0, x1, y1, fill=_a(base))
        _rect(d, x0, y0, x1, y0 + (y1 - y0) * 0.35, fill=_a(refl))
    # mullions
    d.line(((x0 + x1) / 2, y0 + (w / 2 if shape == "arch" else 0), (x0 + x1) / 2, y1), fill=frame, width=2)
    d.line((x0, y0 + (y1 - y0) * 0.45, x1, y0 + (y1 - y0) * 0.45), fill=frame, width=2)


def _draw_window(d: ImageDraw.ImageDraw, rng: Rng, cx: float, top: float, ww: float, wh: float, p: dict,
                 style: str) -> None:
    lit = rng.random() < 0.12
    x0, x1, y0, y1 = cx - ww / 2, cx + ww / 2, top, top + wh
    if p["shutters"] and style not in ("round",):
        sc = _a(p["accent"] if rng.random() > 0.1 else _mul(p["accent"], 0.7))
        _rect(d, x0 - ww * 0.45, y0, x0 - 3, y1, fill=sc)
        _rect(d, x1 + 3, y0, x1 + ww * 0.45, y1, fill=sc)
    if style == "double":
        g = ww * 0.12
        _glass(d, rng, (x0, y0, cx - g / 2, y1), p, "arch" if rng.random() < 0.5 else "rect", lit)
        _glass(d, rng, (cx + g / 2, y0, x1, y1), p, "rect", lit)
    elif style == "pediment":
        _glass(d, rng, (x0, y0, x1, y1), p, "rect", lit)
        d.polygon([(x0 - 5, y0 - 4), (cx, y0 - ww * 0.4), (x1 + 5, y0 - 4)], fill=_a(p["trim"]))
    else:
        _glass(d, rng, (x0, y0, x1, y1), p, {"arch": "arch", "round": "round"}.get(style, "rect"), lit)
    _rect(d, x0 - 4, y1 + 2, x1 + 4, y1 + 5, fill=_a(_mul(p["trim"], 0.92)))  # sill
    if rng.random() < 0.08:  # flower box
        for k in range(4):
            _ellipse(d, x0 + (k + 0.5) * ww / 4, y1 + 1, ww / 7, ww / 9,
                     fill=_a(_jit(rng, (200, 60, 70), 40)))


def _draw_facade(rng: Rng, p: dict[str, Any]) -> Image.Image:
    fh, cw, cols, floors = p["floor_h"], p["col_w"], p["cols"], p["floors"]
    side = cw * 0.4
    bw = cols * cw + 2 * side
    gh = fh * p["ground"]
    body_h = floors * fh + gh
    roof = p["top"]
    roof_h = {"flat": 0.35 * fh, "gable": p["pitch"] * bw, "dome": 0.55 * bw, "towers": 2.4 * fh,
              "mansard": 1.0 * fh, "stepped": 0.38 * bw, "spire": 0.5 * bw + 1.2 * fh}[roof]
    W, H = int(bw) + 2, int(body_h + roof_h) + 2
    im = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    y0 = H - body_h - 1
    wall, trim, roofc = _a(p["wall"]), _a(p["trim"]), _a(p["roof"])
    cx = bw / 2
    # -- roof ---------------------------------------------------------------------------------
    if roof == "flat":
        _rect(d, 0, y0 - 0.2 * fh, bw, y0, fill=trim)
        n = int(bw // 9)
        for k in range(n):  # balustrade
            _rect(d, k * bw / n + 2, y0 - 0.35 * fh, k * bw / n + 5, y0 - 0.2 * fh, fill=trim)
        _rect(d, 0, y0 - 0.37 * fh, bw, y0 - 0.33 * fh, fill=trim)
    elif roof == "gable":
        d.polygon([(0, y0), (cx, y0 - roof_h), (bw, y0)], fill=roofc)
        d.polygon([(bw * 0.12, y0 - 2), (cx, y0 - roof_h * 0.8), (bw * 0.88, y0 - 2)], fill=wall,
                  outline=trim)
        _ellipse(d, cx, y0 - roof_h * 0.33, roof_h * 0.16, roof_h * 0.16, fill=_a(p["glass"]), outline=trim,
                 width=3)
    elif roof == "dome":
        dw = bw * float(rng.uniform(0.35, 0.55))
        drum = roof_h * 0.28
        _rect(d, cx - dw / 2, y0 - drum, cx + dw / 2, y0, fill=wall)
        for k in range(5):
            _rect(d, cx - dw / 2 + (k + 0.3) * dw / 5, y0 - drum * 0.8, cx - dw / 2 + (k + 0.7) * dw / 5,
                  y0 - drum * 0.2, fill=_a(p["glass"]))
        d.chord((cx - dw / 2, y0 - drum - dw / 2 * 1.1, cx + dw / 2, y0 - drum + dw / 2 * 1.1), 180, 360,
                fill=roofc)
        _rect(d, cx - dw * 0.06, y0 - roof_h, cx + dw * 0.06, y0 - drum - dw * 0.5, fill=trim)
    elif roof == "towers":
        tw = cw * 1.2
        _rect(d, 0, y0 - 0.2 * fh, bw, y0, fill=trim)
        for tx in (0, bw - tw):
            _rect(d, tx, y0 - roof_h * 0.6, tx + tw, y0, fill=wall)
            _glass(d, rng, (tx + tw * 0.3, y0 - roof_h * 0.5, tx + tw * 0.7, y0 - roof_h * 0.2), p, "arch",
                   False)
            if rng.random() < 0.5:
                d.polygon([(tx - 2, y0 - roof_h * 0.6), (tx + tw / 2, y0 - roof_h),
                           (tx + tw + 2, y0 - roof_h * 0.6)],
                          fill=roofc)
            else:
                for k in range(3):
                    _rect(d, tx + k * tw / 3 + 2, y0 - roof_h * 0.7, tx + (k + 0.55) * tw / 3 + 2,
                          y0 - roof_h * 0.6,
                          fill=wall)
    elif roof == "mansard":
        d.polygon([(0, y0), (bw * 0.06, y0 - roof_h), (bw * 0.94, y0 - roof_h), (bw, y0)], fill=roofc)
        for c in range(cols):
            dx = side + (c + 0.5) * cw
            _rect(d, dx - cw * 0.2, y0 - roof_h * 0.7, dx + cw * 0.2, y0 - roof_h * 0.1, fill=trim)
            _rect(d, dx - cw * 0.14, y0 - roof_h * 0.62, dx + cw * 0.14, y0 - roof_h * 0.18,
                  fill=_a(p["glass"]))
    elif roof == "stepped":
        steps = 4
        pts = [(0.0, y0)]
        for k in range(steps):
            x = bw * 0.5 * k / steps
            y = y0 - roof_h * (k + 1) / steps
            pts += [(x, y), (x + bw * 0.5 / steps, y)]
        pts += [(bw - x, y) for x, y in reversed(pts[1:])] + [(bw, y0)]
        d.polygon(pts, fill=wall, outline=trim)
        _glass(d, rng, (cx - cw * 0.25, y0 - roof_h * 0.7, cx + cw * 0.25, y0 - roof_h * 0.15), p, "arch",
               False)
    else:  # spire
        tw = cw * 1.3
        th = 1.2 * fh
        _rect(d, cx - tw / 2, y0 - th, cx + tw / 2, y0, fill=wall)
        _ellipse(d, cx, y0 - th * 0.5, tw * 0.3, tw * 0.3, fill=_a((236, 234, 226)), outline=trim, width=3)
        d.line((cx, y0 - th * 0.5, cx, y0 - th * 0.5 - tw * 0.22), fill=(30, 30, 30, 255), width=2)
        d.line((cx, y0 - th * 0.5, cx + tw * 0.16, y0 - th * 0.5), fill=(30, 30, 30, 255), width=2)
        d.polygon([(cx - tw / 2 - 3, y0 - th), (cx, y0 - roof_h), (cx + tw / 2 + 3, y0 - th)], fill=roofc)
        _rect(d, 0, y0 - 0.15 * fh, bw, y0, fill=trim)
    # -- wall ---------------------------------------------------------------------------------
    _rect(d, 0, y0, bw, H - 1, fill=wall)
    dark = _a(_mul(p["wall"], 0.86))
    if p["masonry"] == "brick":
        for y in np.arange(y0 + 5, H, 6.0):
            d.line((0, y, bw, y), fill=dark, width=1)
    elif p["masonry"] == "stone":
        for i, y in enumerate(np.arange(y0 + 12, H, 12.0)):
            d.line((0, y, bw, y), fill=dark, width=1)
            for x in np.arange((i % 2) * 14.0, bw, 28.0):
                d.line((x, y - 12, x, y), fill=dark, width=1)
    _rect(d, 0, H - 1 - gh * 0.18, bw, H - 1, fill=_a(_mul(p["wall"], 0.78)))  # plinth
    if p["pilasters"]:
        for c in range(cols + 1):
            x = side + c * cw
            _rect(d, x - cw * 0.07, y0, x + cw * 0.07, H - 1, fill=_a(_mix(p["wall"], p["trim"], 0.6)))
    if p["bands"]:
        for f in range(1, floors + 1):
            y = y0 + f * fh
            _rect(d, 0, y - fh * 0.05, bw, y + fh * 0.05, fill=trim)
    # -- windows ------------------------------------------------------------------------------
    ww, wh = p["win_w"] * cw, p["win_h"] * fh * (1.25 if p["win_style"] == "tall" else 1.0)
    for f in range(floors):
        top = y0 + f * fh + (fh - wh) * 0.55
        style = p["win_style"] if not (f == 0 and floors > 2 and rng.random() < 0.3) else "round"
        for c in range(cols):
            if rng.random() < 0.04:  # bricked-up window
                continue
            _draw_window(d, rng, side + (c + 0.5) * cw, top, ww, min(wh, fh * 0.85), p, style)
    if p["balcony"] and floors >= 2:
        f = int(rng.integers(1, floors)) if floors > 1 else 0
        y = y0 + (f + 1) * fh - fh * 0.08
        c0 = int(rng.integers(0, max(1, cols - 2)))
        c1 = min(cols, c0 + int(rng.integers(1, 4)))
        x0, x1 = side + c0 * cw + 3, side + c1 * cw - 3
        _rect(d, x0, y - 3, x1, y + 3, fill=trim)
        _rect(d, x0, y - fh * 0.3, x1, y - fh * 0.3 + 3, fill=_a((40, 40, 44)))
        for x in np.arange(x0, x1, 5.0):
            d.line((x, y - fh * 0.3, x, y), fill=(40, 40, 44, 255), width=1)
    # -- ground floor ---------------------------------------------------------------------------
    gy0, gy1 = H - 1 - gh, H - 1 - gh * 0.18
    door_c = _a(_jit(rng, _mix(p["accent"], (70, 45, 30), 0.5), 10))
    if p["door"] == "arcade":
        for c in range(cols):
            x = side + (c + 0.5) * cw
            aw = cw * 0.34
            _ellipse(d, x, gy0 + gh * 0.3, aw, aw, fill=_a((28, 26, 26)), outline=trim, width=3)
            _rect(d, x - aw, gy0 + gh * 0.3, x + aw, gy1, fill=_a((28, 26, 26)))
    elif p["door"] == "shops":
        for c in range(cols):
            x0, x1 = side + c * cw + 4, side + (c + 1) * cw - 4
            _rect(d, x0, gy0 + gh * 0.35, x1, gy1, fill=_a(p["glass"]), outline=_a((40, 40, 40)), width=2)
            aw = _a(p["c3"] if (c + int(rng.integers(2))) % 2 else p["c4"])
            d.polygon([(x0 - 2, gy0 + gh * 0.12), (x1 + 2, gy0 + gh * 0.12), (x1 + 6, gy0 + gh * 0.32),
                       (x0 - 6, gy0 + gh * 0.32)], fill=aw)
    else:
        dc = int(rng.integers(0, cols)) if rng.random() < 0.4 else cols // 2
        for c in range(cols):
            x = side + (c + 0.5) * cw
            if c == dc:
                dw = cw * 0.36
                if p["door"] == "arch":
                    _ellipse(d, x, gy0 + gh * 0.25 + dw, dw + 4, dw + 4, fill=trim)
                    _rect(d, x - dw - 4, gy0 + gh * 0.25 + dw, x + dw + 4, gy1, fill=trim)
                    _ellipse(d, x, gy0 + gh * 0.25 + dw, dw, dw, fill=door_c)
                    _rect(d, x - dw, gy0 + gh * 0.25 + dw, x + dw, gy1, fill=door_c)
                else:
                    _rect(d, x - dw - 4, gy0 + gh * 0.2, x + dw + 4, gy1, fill=trim)
                    _rect(d, x - dw, gy0 + gh * 0.28, x + dw, gy1, fill=door_c)
                d.line((x, gy0 + gh * 0.5, x, gy1), fill=_a(_mul(door_c[:3], 0.6)), width=2)
            else:
                _draw_window(d, rng, x, gy0 + gh * 0.25, ww, gh * 0.45, p, "rect")
    # -- unique ornaments -------------------------------------------------------------------------
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.choice(["clock", "plaque", "banner", "crest", "niche", "flag"])
        ox = side + (int(rng.integers(cols)) + 0.5) * cw
        oy = y0 + (int(rng.integers(floors)) + 0.5) * fh
        s = cw * float(rng.uniform(0.25, 0.4))
        if kind == "clock":
            _ellipse(d, ox, oy, s, s, fill=_a((238, 236, 228)), outline=_a((30, 30, 30)), width=3)
            d.line((ox, oy, ox + s * 0.6, oy - s * 0.3), fill=(20, 20, 20, 255), width=2)
            d.line((ox, oy, ox - s * 0.1, oy - s * 0.8), fill=(20, 20, 20, 255), width=2)
        elif kind == "plaque":
            _rect(d, ox - 1.8 * s, oy - 0.6 * s, ox + 1.8 * s, oy + 0.6 * s, fill=_a(p["c3"]), outline=trim,
                  width=2)
            for k in range(2):
                _rect(d, ox - 1.4 * s, oy - 0.3 * s + k * 0.45 * s, ox + (1.4 - 0.6 * k) * s,
                      oy - 0.15 * s + k * 0.45 * s,
                      fill=_a(_mix(p["c3"], (250, 250, 250), 0.7)))
        elif kind == "banner":
            bc = _a(p["c4"] if rng.random() < 0.5 else p["c5"])
            _rect(d, ox - 0.6 * s, oy - 1.5 * fh * 0.5, ox + 0.6 * s, oy + fh * 0.8, fill=bc)
            _rect(d, ox - 0.6 * s, oy, ox + 0.6 * s, oy + 0.3 * s, fill=_a((240, 236, 220)))
        elif kind == "crest":
            d.polygon([(ox - s, oy - s), (ox + s, oy - s), (ox + s, oy + 0.2 * s), (ox, oy + 1.2 * s),
                       (ox - s, oy + 0.2 * s)], fill=_a(p["c3"]), outline=_a(p["c5"]), width=3)
            _rect(d, ox - 0.2 * s, oy - s, ox + 0.2 * s, oy + 1.0 * s, fill=_a(p["c5"]))
        elif kind == "niche":
            _ellipse(d, ox, oy - 0.4 * s, 0.7 * s, 0.7 * s, fill=_a(_mul(p["wall"], 0.5)))
            _rect(d, ox - 0.7 * s, oy - 0.4 * s, ox + 0.7 * s, oy + 1.2 * s, fill=_a(_mul(p["wall"], 0.5)))
            _ellipse(d, ox, oy - 0.3 * s, 0.2 * s, 0.2 * s, fill=_a((225, 222, 212)))
            _rect(d, ox - 0.3 * s, oy - 0.1 * s, ox + 0.3 * s, oy + 1.1 * s, fill=_a((225, 222, 212)))
        else:  # flag on the roof line
            fx = float(rng.uniform(0.2, 0.8)) * bw
            d.line((fx, y0, fx, y0 - 1.3 * fh), fill=(60, 60, 60, 255), width=2)
            _rect(d, fx + 1, y0 - 1.3 * fh, fx + 1 + cw * 0.7, y0 - 0.9 * fh, fill=_a(p["c4"]))
            _rect(d, fx + 1, y0 - 1.17 * fh, fx + 1 + cw * 0.7, y0 - 1.03 * fh, fill=_a(p["c5"]))
    return _weather(rng, im, float(rng.uniform(0.12, 0.3)))


def _draw_panel(rng: Rng, p: dict[str, Any]) -> Image.Image:
    w = int(p["width"])
    h = int(w * p["aspect"]) if p["shape"] not in ("circle", "octagon") else w
    colors = [p[k] for k in ("c1", "c2", "c3", "c4", "c5", "wall")]
    pat = Image.new("RGBA", (w, h), _a(p["wall"]))
    d = ImageDraw.Draw(pat)
    n = p["cells"]
    kind = p["pattern"]
    if kind == "tiles":
        cs = max(w, h) / (n * 1.6)
        grout = _a(_mul(p["trim"], 0.8))
        for i in range(int(h / cs) + 1):
            for j in range(int(w / cs) + 1):
                _rect(d, j * cs, i * cs, (j + 1) * cs - 2, (i + 1) * cs - 2,
                      fill=_a(colors[int(rng.integers(6))]))
                if rng.random() < 0.25:
                    _ellipse(d, (j + 0.5) * cs, (i + 0.5) * cs, cs * 0.3, cs * 0.3,
                             fill=_a(colors[int(rng.integers(6))]))
        for i in range(int(h / cs) + 1):
            d.line((0, i * cs - 1, w, i * cs - 1), fill=grout, width=2)
    elif kind == "stripes":
        big = Image.new("RGBA", (2 * max(w, h), 2 * max(w, h)), _a(p["wall"]))
        bd = ImageDraw.Draw(big)
        y = 0.0
        while y < big.height:
            sw = float(rng.uniform(6, 40))
            _rect(bd, 0, y, big.width, y + sw, fill=_a(colors[int(rng.integers(6))]))
            y += sw
        big = big.rotate(p["angle"], resample=Image.Resampling.BILINEAR)
        pat.paste(big.crop(((big.width - w) // 2, (big.height - h) // 2, (big.width + w) // 2,
                            (big.height + h) // 2)))
    elif kind == "rings":
        rmax = math.hypot(w, h) / 2
        k = 0
        r = rmax
        while r > 4:
            _ellipse(d, w / 2, h / 2, r, r * h / w,
                     fill=_a(colors[int(rng.integers(6))] if k % 2 else colors[k % 3]))
            r -= float(rng.uniform(rmax / (2 * n), rmax / n))
            k += 1
    elif kind == "sectors":
        m = int(n * 2)
        for k in range(m):
            d.pieslice((0, 0, w, h), 360 * k / m, 360 * (k + 1) / m,
                       fill=_a(colors[k % 2 if rng.random() < 0.7 else 3]))
        for r, c in ((0.55, colors[2]), (0.35, colors[int(rng.integers(6))]), (0.15, colors[4])):
            _ellipse(d, w / 2, h / 2, w * r / 2, h * r / 2, fill=_a(c))
            for k in range(m):
                a = 2 * math.pi * (k + 0.5) / m
                _ellipse(d, w / 2 + math.cos(a) * w * r * 0.38, h / 2 + math.sin(a) * h * r * 0.38, w * 0.025,
                         h * 0.025,
                         fill=_a(colors[1]))
    elif kind == "mosaic":
        for _ in range(n * 8):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.2) * w
            d.polygon(_ngon(cx, cy, r, int(rng.integers(3, 7)), float(rng.uniform(0, 6.3))),
                      fill=_a(colors[int(rng.integers(6))]))
    elif kind == "checker":
        cs = max(w, h) / n
        c0, c1 = colors[0], colors[int(rng.integers(2, 5))]
        for i in range(n + 1):
            for j in range(n + 1):
                c = c0 if (i + j) % 2 else c1
                if rng.random() < 0.12:
                    c = colors[int(rng.integers(6))]
                _rect(d, j * cs, i * cs, (j + 1) * cs, (i + 1) * cs, fill=_a(c))
    else:  # marble / camouflage: quantised noise
        q = _value_noise(rng, w, h, n / 2, octaves=4)
        lvl = np.clip((q * 5).astype(int), 0, 4)
        lut = np.asarray(colors[:5], dtype=np.uint8)
        arr = np.dstack([lut[lvl], np.full((h, w), 255, np.uint8)])
        pat = Image.fromarray(arr, "RGBA")
        d = ImageDraw.Draw(pat)
    em = p["emblem"]
    es = min(w, h) * float(rng.uniform(0.12, 0.22))
    ex, ey = w / 2 + rng.uniform(-0.15, 0.15) * w, h / 2 + rng.uniform(-0.15, 0.15) * h
    if em == "circle":
        _ellipse(d, ex, ey, es, es, fill=_a(p["c2"]), outline=_a(p["c5"]), width=4)
    elif em == "star":
        radii = [es if k % 2 == 0 else es * 0.45 for k in range(10)]
        angles = [math.pi * k / 5 - math.pi / 2 for k in range(10)]
        pts = [(ex + r * math.cos(t), ey + r * math.sin(t)) for r, t in zip(radii, angles, strict=True)]
        d.polygon(pts, fill=_a(p["c2"]))
    elif em == "diamond":
        d.polygon(_ngon(ex, ey, es, 4), fill=_a(p["c3"]), outline=_a(p["c2"]), width=3)
    # shape mask + frame
    mask = Image.new("L", (w, h), 0)
    md = ImageDraw.Draw(mask)
    fw = max(3, int(p["frame"] * min(w, h)))
    shape = p["shape"]
    if shape == "circle":
        md.ellipse((0, 0, w - 1, h - 1), fill=255)
    elif shape == "octagon":
        md.polygon(_ngon(w / 2, h / 2, w / 2, 8, math.pi / 8), fill=255)
    elif shape == "arch":
        md.ellipse((0, 0, w - 1, w - 1), fill=255)
        md.rectangle((0, w / 2, w - 1, h - 1), fill=255)
    else:
        md.rectangle((0, 0, w - 1, h - 1), fill=255)
    inner = mask.filter(ImageFilter.MinFilter(2 * (fw // 2) + 1))
    frame = Image.new("RGBA", (w, h), _a(p["trim"]))
    frame.paste(pat, (0, 0), inner)
    frame.putalpha(mask)
    mount = p["mount"]
    if mount == "none":
        return _weather(rng, frame, float(rng.uniform(0.08, 0.2)))
    extra = int(h * 0.35)
    out = Image.new("RGBA", (w, h + extra), (0, 0, 0, 0))
    od = ImageDraw.Draw(out)
    stone = _a(_mix(p["roof"], (150, 150, 150), 0.5))
    if mount == "legs":
        for x in (w * 0.2, w * 0.8):
            _rect(od, x - w * 0.03, h * 0.5, x + w * 0.03, h + extra - 1, fill=_a((70, 70, 74)))
    else:
        _rect(od, w * 0.25, h * 0.5, w * 0.75, h + extra - 1, fill=stone)
        _rect(od, w * 0.15, h + extra * 0.7, w * 0.85, h + extra - 1, fill=_a(_mul(stone[:3], 0.85)))
    out.alpha_composite(frame, (0, 0))
    return _weather(rng, out, float(rng.uniform(0.08, 0.2)))


def _draw_sculpture(rng: Rng, p: dict[str, Any]) -> Image.Image:
    w, h = int(p["width"]), int(p["height"])
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    mat = p["roof"] if rng.random() < 0.5 else p["wall"]
    lit, shade = _a(_mul(mat, 1.12)), _a(_mul(mat, 0.72))
    stone = _a(p["trim"])
    # pedestal tiers
    y = float(h - 1)
    pw = w * 0.8
    for _ in range(p["tiers"]):
        th = h * 0.06
        _rect(d, w / 2 - pw / 2, y - th, w / 2 + pw / 2, y, fill=stone, outline=_a(_mul(p["trim"], 0.8)))
        y -= th
        pw *= 0.82
    top = y
    style = p["style"]
    if style == "obelisk":
        bw = w * float(rng.uniform(0.16, 0.26))
        d.polygon([(w / 2 - bw / 2, top), (w / 2 - bw * 0.33, h * 0.12), (w / 2, h * 0.04),
                   (w / 2, top)], fill=lit)
        d.polygon([(w / 2 + bw / 2, top), (w / 2 + bw * 0.33, h * 0.12), (w / 2, h * 0.04),
                   (w / 2, top)], fill=shade)
        for k in range(p["parts"]):  # hieroglyph bands
            yy = h * 0.2 + k * (top - h * 0.25) / p["parts"]
            _rect(d, w / 2 - bw * 0.2, yy, w / 2 + bw * 0.05, yy + 5, fill=_a(_mul(mat, 0.55)))
    elif style == "gate":
        gw, gt = w * 0.9, h * 0.15
        _rect(d, w / 2 - gw / 2, gt, w / 2 + gw / 2, top, fill=lit)
        _rect(d, w / 2 - gw / 2, gt - h * 0.08, w / 2 + gw / 2, gt + h * 0.05, fill=stone)
        aw = gw * float(rng.uniform(0.25, 0.36))
        _ellipse(d, w / 2, gt + h * 0.22 + aw, aw, aw, fill=(0, 0, 0, 0))
        _rect(d, w / 2 - aw, gt + h * 0.22 + aw, w / 2 + aw, top, fill=(0, 0, 0, 0))
        for sx in (-1, 1):
            x = w / 2 + sx * gw * 0.38
            _rect(d, x - gw * 0.04, gt + h * 0.1, x + gw * 0.04, top, fill=shade)
            _ellipse(d, x, gt + h * 0.28, gw * 0.05, gw * 0.05, fill=_a(p["c3"]))
    elif style == "column":
        cw = w * 0.18
        _rect(d, w / 2 - cw / 2, h * 0.3, w / 2 + cw / 2, top, fill=lit)
        for k in range(4):
            x = w / 2 - cw / 2 + (k + 0.5) * cw / 4
            d.line((x, h * 0.3, x, top), fill=shade, width=2)
        _rect(d, w / 2 - cw * 0.9, h * 0.27, w / 2 + cw * 0.9, h * 0.31, fill=stone)
        _ellipse(d, w / 2, h * 0.18, cw * 0.45, h * 0.09, fill=_a(p["c1"]))
        _ellipse(d, w / 2, h * 0.06, cw * 0.25, cw * 0.25, fill=_a(p["c1"]))
    elif style == "figure":
        bw = w * 0.22
        _rect(d, w / 2 - bw / 2, h * 0.3, w / 2 + bw / 2, top, fill=lit)
        d.polygon([(w / 2 - bw / 2, h * 0.32), (w / 2 - bw * 1.3, h * float(rng.uniform(0.15, 0.5))),
                   (w / 2 - bw * 1.1, h * 0.52), (w / 2 - bw / 2, h * 0.45)], fill=shade)
        d.polygon([(w / 2 + bw / 2, h * 0.32), (w / 2 + bw * 1.3, h * float(rng.uniform(0.15, 0.5))),
                   (w / 2 + bw * 1.1, h * 0.52), (w / 2 + bw / 2, h * 0.45)], fill=shade)
        _ellipse(d, w / 2, h * 0.22, bw * 0.4, bw * 0.45, fill=lit)
        _rect(d, w / 2 - bw * 0.7, h * 0.3, w / 2 + bw * 0.7, h * 0.36, fill=_a(p["c3"]))
    else:  # stack / abstract: composition of primitives
        n = p["parts"] + (3 if style == "abstract" else 0)
        yy = top
        for k in range(n):
            c = [lit, shade, _a(p["c1"]), _a(p["c3"]), _a(p["c4"])][int(rng.integers(5))]
            r = w * float(rng.uniform(0.1, 0.28))
            if style == "stack":
                cx, cy = w / 2 + rng.normal(0, w * 0.04), yy - r * 0.9
                yy = max(h * 0.15, cy - r * 0.6)
            else:
                cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.15, 0.85) * top
            prim = int(rng.integers(4))
            if prim == 0:
                _ellipse(d, cx, cy, r, r, fill=c)
                _ellipse(d, cx + r * 0.25, cy + r * 0.25, r * 0.55, r * 0.55, fill=_a(_mul(c[:3], 0.85)))
            elif prim == 1:
                d.polygon(_ngon(cx, cy, r, int(rng.integers(3, 8)), float(rng.uniform(0, 6.3))), fill=c)
            elif prim == 2:
                _rect(d, cx - r, cy - r * 0.7, cx + r, cy + r * 0.7, fill=c)
                _rect(d, cx + r * 0.4, cy - r * 0.7, cx + r, cy + r * 0.7, fill=_a(_mul(c[:3], 0.75)))
            else:
                d.arc((cx - r, cy - r, cx + r, cy + r), 0, 360, fill=c, width=max(4, int(r * 0.3)))
            if style == "abstract" and k % 3 == 2:  # struts keep the composition connected
                d.line((cx, cy, w / 2, top), fill=shade, width=max(3, int(w * 0.03)))
    return _weather(rng, im, float(rng.uniform(0.1, 0.25)))


_DRAW = {"facade": _draw_facade, "panel": _draw_panel, "sculpture": _draw_sculpture}


class _Scene:
    """A rendered scene: premultiplied RGBA mip levels plus what the area integral needs."""

    def __init__(self, im: Image.Image):
        a = np.asarray(im).astype(np.float32)
        a[..., :3] *= a[..., 3:4] / 255.0  # premultiply
        self.size = (im.width, im.height)
        self.levels = [a]
        while min(self.levels[-1].shape[:2]) >= 48 and len(self.levels) < 5:
            x = self.levels[-1]
            h2, w2 = x.shape[0] // 2, x.shape[1] // 2
            self.levels.append(x[: 2 * h2, : 2 * w2].reshape(h2, 2, w2, 2, 4).mean(axis=(1, 3)))
        # coarse alpha grid (cells of 4x4 px) for the warped-area integral
        h4, w4 = a.shape[0] // 4, a.shape[1] // 4
        self.alpha4 = a[: 4 * h4, : 4 * w4, 3].reshape(h4, 4, w4, 4).mean(axis=(1, 3)).ravel() / 255.0
        vv, uu = np.mgrid[0:h4, 0:w4]
        self.uv4 = np.stack([(uu.ravel() + 0.5) * 4, (vv.ravel() + 0.5) * 4, np.ones(h4 * w4)])
        self.area = float(self.alpha4.sum() * 16)


def _make_scene(family: dict[str, Any], scene_seed: int, variation: float) -> _Scene:
    rng = np.random.default_rng(scene_seed)
    params = _scene_params(family, rng, variation)
    return _Scene(_DRAW[family["kind"]](rng, params))


# ================================================================================================
# views: camera, background, occluders, photometry
# ================================================================================================

_SKIES = [((92, 142, 212), (186, 214, 240)), ((160, 168, 178), (214, 216, 218)),
          ((72, 92, 152), (236, 178, 122)),
          ((118, 160, 212), (226, 230, 236)), ((190, 195, 202), (236, 236, 232)), ((60, 100, 170),
                                                                                   (150, 190, 230))]
_GROUNDS = [(118, 118, 112), (92, 122, 64), (176, 160, 128), (136, 120, 104), (100, 100, 106),
            (152, 146, 136)]
_CLOTHES = [(30, 30, 36), (180, 40, 40), (40, 70, 150), (220, 220, 214), (90, 110, 60), (200, 160, 60),
            (120, 80, 60)]


def _homography(w0: float, h0: float, yaw: float, pitch: float, roll: float, mag: float, cx: float, cy: float,
                depth: float) -> np.ndarray:
    """Scene pixel (u, v) -> image pixel, for the scene plane seen from ``depth`` x its size."""
    D = depth * max(w0, h0)
    F = mag * D
    y, p, r = math.radians(yaw), math.radians(pitch), math.radians(roll)
    Ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    Rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    Rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    R = Rz @ Ry @ Rx
    M = np.column_stack([R[:, 0], R[:, 1], [0.0, 0.0, D]])
    K = np.array([[F, 0, cx], [0, F, cy], [0, 0, 1.0]])
    T = np.array([[1, 0, -w0 / 2], [0, 1, -h0 / 2], [0, 0, 1.0]])
    return K @ M @ T


def _project(Hm: np.ndarray, pts: np.ndarray) -> np.ndarray:
    q = Hm @ np.vstack([pts.T, np.ones(len(pts))])
    return (q[:2] / q[2]).T


def _sample_view(rng: Rng, mode: str, cfg: SyntheticConfig) -> dict[str, Any]:
    """Camera / occlusion / quality parameters of one view; ``mode`` is the kind attempted."""
    v: dict[str, Any] = {
        "yaw": float(rng.uniform(-1, 1) * cfg.easy_yaw), "pitch": float(rng.uniform(-1, 1) * cfg.easy_pitch),
        "roll": float(np.clip(rng.normal(0, cfg.easy_roll / 2), -cfg.easy_roll, cfg.easy_roll)),
        "scale": float(rng.uniform(*cfg.easy_scale)), "place": "free", "dx": float(rng.uniform(-1, 1)),
        "dy": float(rng.uniform(-1, 1)), "depth": float(rng.uniform(1.5, 3.2)),
        "q": float(rng.uniform(0, 0.45)), "occ": cfg.occluders * 0.7, "big": 0.0, "factors": [],
    }
    if mode == "query":
        v.update(scale=float(rng.uniform(*cfg.query_scale)), q=float(rng.uniform(0, 0.35)),
                 occ=cfg.occluders * 0.3,
                 roll=v["roll"] / 2)
    elif mode == "hard":
        k = 1 + int(rng.random() < 0.35)
        factors = list(rng.choice(["view", "scale", "occlusion", "light", "crop"], size=k, replace=False,
                                  p=[0.32, 0.22, 0.2, 0.12, 0.14]))
        v["factors"] = [str(f) for f in factors]
        sgn = 1.0 if rng.random() < 0.5 else -1.0
        if "view" in factors:
            v.update(yaw=sgn * float(rng.uniform(cfg.easy_yaw, cfg.hard_yaw)),
                     pitch=float(rng.uniform(-cfg.hard_pitch, cfg.hard_pitch)), depth=float(rng.uniform(1.2,
                                                                                                        2.2)),
                     roll=float(rng.uniform(-cfg.hard_roll,
                                            cfg.hard_roll)) if rng.random() < 0.5 else v["roll"])
        if "scale" in factors:
            if rng.random() < 0.5:
                v.update(scale=float(rng.uniform(*cfg.far_scale)))
            else:  # close-up of a part of the landmark
                v.update(scale=float(rng.uniform(*cfg.close_scale)), place="offset",
                         dx=float(rng.uniform(-0.25, 0.25)), dy=float(rng.uniform(-0.25, 0.25)))
        if "occlusion" in factors:
            v["big"] = float(rng.uniform(*cfg.hard_occlusion))
        if "light" in factors:
            v["q"] = float(rng.uniform(0.6, 1.0))
        if "crop" in factors:
            v.update(place="edge", dx=sgn * float(rng.uniform(0.4, 0.75)),
                     scale=float(rng.uniform(0.65, 1.0)))
        v["occ"] = cfg.occluders * 1.2
    elif mode == "junk":
        how = str(rng.choice(["tiny", "closeup", "out", "occluded"], p=[0.3, 0.25, 0.25, 0.2]))
        v["factors"] = [how]
        if how == "tiny":
            v.update(scale=float(rng.uniform(*cfg.junk_scale)))
        elif how == "closeup":
            v.update(scale=float(rng.uniform(2.8, 4.5)), place="offset", dx=float(rng.uniform(-0.4, 0.4)),
                     dy=float(rng.uniform(-0.4, 0.4)))
        elif how == "out":
            v.update(place="edge", dx=(1 if rng.random() < 0.5 else -1) * float(rng.uniform(0.05, 0.18)),
                     dy=float(rng.uniform(-0.2, 0.2)))
        else:
            v["big"] = float(rng.uniform(0.85, 0.98))
        if rng.random() < 0.4:
            v["q"] = float(rng.uniform(0.3, 1.0))
        v["occ"] = cfg.occluders
    return v


def _tree(d: ImageDraw.ImageDraw, rng: Rng, x: float, base: float, hgt: float, haze: float = 0.0,
          sky: Color = (200, 200, 200)) -> None:
    g = _mix(_jit(rng, (70, 110, 50), 18), sky, haze)
    _rect(d, x - hgt * 0.04, base - hgt * 0.5, x + hgt * 0.04, base, fill=_a(_mix((86, 64, 46), sky, haze)))
    for _ in range(int(rng.integers(5, 10))):
        r = hgt * float(rng.uniform(0.15, 0.28))
        _ellipse(d, x + rng.normal(0, hgt * 0.14), base - hgt * 0.62 + rng.normal(0, hgt * 0.12), r, r,
                 fill=_a(_mul(g, float(rng.uniform(0.75, 1.15)))))


def _person(d: ImageDraw.ImageDraw, rng: Rng, x: float, base: float, hgt: float) -> None:
    c = _jit(rng, _CLOTHES[int(rng.integers(len(_CLOTHES)))], 15)
    w = hgt * 0.26
    _rect(d, x - w * 0.4, base - hgt * 0.45, x + w * 0.4, base, fill=_a(_mul(c, 0.6)))
    d.rounded_rectangle((x - w / 2, base - hgt * 0.82, x + w / 2, base - hgt * 0.4), radius=w * 0.3,
                        fill=_a(c))
    _ellipse(d, x, base - hgt * 0.9, w * 0.3, hgt * 0.09, fill=_a(_jit(rng, (200, 160, 130), 30)))


def _car(d: ImageDraw.ImageDraw, rng: Rng, x: float, base: float, wid: float) -> None:
    c = _jit(rng, _CLOTHES[int(rng.integers(len(_CLOTHES)))], 25)
    h = wid * 0.4
    d.rounded_rectangle((x - wid * 0.3, base - h, x + wid * 0.25, base - h * 0.5), radius=h * 0.15,
                        fill=_a(c))
    _rect(d, x - wid * 0.24, base - h * 0.92, x + wid * 0.18, base - h * 0.55, fill=_a((60, 70, 84)))
    d.rounded_rectangle((x - wid / 2, base - h * 0.6, x + wid / 2, base - h * 0.15), radius=h * 0.12,
                        fill=_a(c))
    for wx in (x - wid * 0.3, x + wid * 0.3):
        _ellipse(d, wx, base - h * 0.15, h * 0.17, h * 0.17, fill=_a((24, 24, 24)))


def _pole(d: ImageDraw.ImageDraw, rng: Rng, x: float, base: float, hgt: float) -> None:
    c = _a(_jit(rng, (50, 52, 56), 10))
    _rect(d, x - 2.5, base - hgt, x + 2.5, base, fill=c)
    if rng.random() < 0.5:
        _ellipse(d, x, base - hgt, hgt * 0.05, hgt * 0.035, fill=_a((230, 226, 200)))
    else:
        s = hgt * 0.12
        _rect(d, x - s, base - hgt, x + s, base - hgt + s * 1.2,
              fill=_a(_jit(rng, _EXTRA[int(rng.integers(10))], 20)))


def _building(d: ImageDraw.ImageDraw, rng: Rng, x: float, base: float, wid: float, hgt: float, haze: float,
              sky: Color) -> None:
    pal = _PALETTES[int(rng.integers(len(_PALETTES)))]
    wall = _mix(_jit(rng, pal["wall"], 20), sky, haze)
    _rect(d, x, base - hgt, x + wid, base, fill=_a(wall))
    if rng.random() < 0.4:
        d.polygon([(x, base - hgt), (x + wid / 2, base - hgt - wid * 0.3), (x + wid, base - hgt)],
                  fill=_a(_mix(pal["roof"], sky, haze)))
    win = _a(_mix(_mul(wall, 0.55), sky, haze * 0.5))
    cs = float(rng.uniform(7, 14))
    for yy in np.arange(base - hgt + cs * 0.6, base - cs, cs):
        for xx in np.arange(x + cs * 0.5, x + wid - cs * 0.5, cs):
            _rect(d, xx, yy, xx + cs * 0.45, yy + cs * 0.55, fill=win)


def _background(rng: Rng, W: int, H: int, horizon: float, density: float) -> Image.Image:
    top, bottom = (np.asarray(_jit(rng, c, 10), np.float32) for c in _SKIES[int(rng.integers(len(_SKIES)))])
    yy = np.arange(H, dtype=np.float32)[:, None, None]
    t = np.clip(yy / max(horizon, 1.0), 0, 1) ** 0.8
    sky = np.broadcast_to(top * (1 - t) + bottom * t, (H, W, 3)).copy()
    cover = float(rng.uniform(0, 1))
    if cover > 0.2:
        n = _value_noise(rng, W, H, float(rng.uniform(2, 5)))
        cl = np.clip((n - (1.0 - 0.5 * cover)) * 4, 0, 1)[..., None]
        sky = sky * (1 - cl) + np.asarray(_jit(rng, (238, 238, 240), 10), np.float32) * cl
    ground_c = np.asarray(_jit(rng, _GROUNDS[int(rng.integers(len(_GROUNDS)))], 12), np.float32)
    tex = _value_noise(rng, W, H, float(rng.uniform(6, 16)), octaves=2)[..., None]
    g = np.clip((yy - horizon) / max(H - horizon, 1.0), 0, 1)
    ground = ground_c * (0.82 + 0.3 * tex) * (1.0 - 0.12 * g)
    img = np.where(yy < horizon, sky, ground)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im, "RGBA")
    skyc = tuple(int(v) for v in bottom)
    if rng.random() < 0.6:  # paving joints
        for k in range(1, 7):
            y = horizon + (H - horizon) * (k / 7) ** 1.6
            d.line((0, y, W, y), fill=_a(_mul(tuple(int(v) for v in ground_c), 0.8), 120), width=1)
    for _ in range(int(rng.poisson(2.5 * density))):
        _building(d, rng, float(rng.uniform(-0.1, 1.0)) * W, horizon + rng.uniform(0, 0.03) * H,
                  float(rng.uniform(0.1, 0.35)) * W, float(rng.uniform(0.08,
                                                                       0.45)) * H, float(rng.uniform(0.15,
                                                                                                     0.5)),
                  skyc)
    for _ in range(int(rng.poisson(1.5 * density))):
        _tree(d, rng, float(rng.uniform(0, W)), horizon + rng.uniform(0, 0.05) * H,
              float(rng.uniform(0.08, 0.3)) * H,
              float(rng.uniform(0.1, 0.4)), skyc)
    for _ in range(int(rng.poisson(1.0 * density))):
        _person(d, rng, float(rng.uniform(0, W)), horizon + rng.uniform(0.02, 0.15) * H,
                float(rng.uniform(0.05, 0.12)) * H)
    return im


def _occluders(rng: Rng, W: int, H: int, horizon: float, lam: float, big: float,
               box: tuple[float, float, float, float] | None) -> Image.Image:
    """Foreground objects on a transparent layer (its alpha is the occlusion mask)."""
    layer = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    for _ in range(int(rng.poisson(lam))):
        kind = int(rng.choice(5, p=[0.35, 0.2, 0.2, 0.15, 0.1]))
        x = float(rng.uniform(box[0],
                              box[2])) if box is not None and rng.random() < 0.7 else float(rng.uniform(0, W))
        base = float(rng.uniform(max(horizon, 0.75 * H), 1.08 * H))
        if kind == 0:
            _person(d, rng, x, base, float(rng.uniform(0.15, 0.45)) * H)
        elif kind == 1:
            _tree(d, rng, x, base, float(rng.uniform(0.35, 0.8)) * H)
        elif kind == 2:
            _car(d, rng, x, base, float(rng.uniform(0.2, 0.45)) * W)
        elif kind == 3:
            _pole(d, rng, x, base, float(rng.uniform(0.4, 0.95)) * H)
        else:  # bush / hedge
            r = float(rng.uniform(0.05, 0.12)) * H
            g = _jit(rng, (62, 100, 50), 15)
            for _ in range(int(rng.integers(4, 8))):
                rr = r * float(rng.uniform(0.5, 0.9))
                _ellipse(d, x + rng.normal(0, r), base - rr * 0.8 + rng.normal(0, r * 0.2), rr, rr * 0.8,
                         fill=_a(_mul(g, float(rng.uniform(0.75, 1.2)))))
    if big > 0 and box is not None:
        x0, y0, x1, y1 = box
        bw, bh = x1 - x0, y1 - y0
        kind = int(rng.integers(3))
        col = _jit(rng, _PALETTES[int(rng.integers(len(_PALETTES)))]["wall"], 20)
        if kind == 0:  # foreground wall / building corner from one side, in shadow
            col = _mul(col, float(rng.uniform(0.5, 0.85)))
            left = rng.random() < 0.5
            edge = x0 + big * bw if left else x1 - big * bw
            wx0, wx1 = (-1.0, edge) if left else (edge, W + 1.0)
            _rect(d, wx0, -1, wx1, H + 1, fill=_a(col))
            step = float(rng.uniform(6, 16))
            for y in np.arange(step / 2, H, step):  # masonry courses
                d.line((wx0, y, wx1, y), fill=_a(_mul(col, 0.85)), width=1)
            d.line((edge, 0, edge, H), fill=_a(_mul(col, 1.25)), width=3)  # lit corner
            if rng.random() < 0.5:  # drainpipe
                px = edge + (-12 if left else 12)
                _rect(d, px - 3, -1, px + 3, H + 1, fill=_a((70, 72, 76)))
        elif kind == 1:  # big tree canopy
            r = math.sqrt(big * bw * bh / math.pi) * 0.8
            cx, cy = float(rng.uniform(x0 + r * 0.3, x1 - r * 0.3)), float(rng.uniform(y0 + r * 0.3,
                                                                                       y1 - r * 0.3))
            _rect(d, cx - r * 0.12, cy, cx + r * 0.12, H + 1, fill=_a((80, 60, 44)))
            g = _jit(rng, (64, 104, 48), 15)
            for _ in range(14):
                rr = r * float(rng.uniform(0.35, 0.6))
                _ellipse(d, cx + rng.normal(0, r * 0.4), cy + rng.normal(0, r * 0.4), rr, rr,
                         fill=_a(_mul(g, float(rng.uniform(0.75, 1.15)))))
        else:  # bus / truck across the lower part
            top = y1 - big * bh
            d.rounded_rectangle((x0 - 0.3 * bw, top, x1 + 0.3 * bw, H + 5), radius=10, fill=_a(col))
            for xx in np.arange(x0 - 0.25 * bw, x1 + 0.25 * bw, max(12.0, 0.12 * bw)):
                _rect(d, xx, top + 8, xx + max(8.0, 0.08 * bw), top + min(40.0, 0.4 * (H - top)),
                      fill=_a((50, 60, 72)))
    if rng.random() < 0.4:  # foreground defocus
        layer = layer.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
    return layer


@functools.lru_cache(maxsize=8)
def _radius2(W: int, H: int) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    return ((xx - W / 2) / (W / 2)) ** 2 + ((yy - H / 2) / (H / 2)) ** 2


def _photometric(x: np.ndarray, rng: Rng, q: float, strength: float) -> np.ndarray:
    """Exposure, gamma, contrast, saturation, colour cast, haze / dusk and vignetting; x in [0, 1]."""
    s = strength * (0.2 + 0.8 * q)
    H, W = x.shape[:2]
    x = x * math.exp(rng.normal(0, 0.3 * s))
    x = np.clip(x, 0, 1) ** math.exp(rng.uniform(-0.5, 0.5) * s)
    m = float(x.mean())
    x = (x - m) * (1 + rng.uniform(-0.45, 0.3) * s) + m
    g = x.mean(axis=2, keepdims=True)
    x = g + (x - g) * (1 + rng.uniform(-0.6, 0.35) * s)
    x = x * (1 + rng.normal(0, 0.08 * s, 3)).astype(np.float32)
    if q > 0.6 and rng.random() < 0.6:
        if rng.random() < 0.5:  # haze / fog
            h = float(rng.uniform(0.2, 0.5)) * s
            x = x * (1 - h) + h * np.asarray([0.82, 0.83, 0.85], np.float32)
        else:  # dusk
            x = x * (np.asarray([1.0, 0.8, 0.62], np.float32) * float(rng.uniform(0.45, 0.75)))
    x = x * (1 - float(rng.uniform(0, 0.25)) * s * _radius2(W, H) / 2)[..., None]
    return x


def _render_view(scene: _Scene | None, mode: str, size: tuple[int, int], rng: Rng,
                 cfg: SyntheticConfig) -> tuple[Image.Image, dict[str, Any]]:
    """One photo of ``scene`` (None: pure clutter); returns the image and its render record."""
    W, H = size
    v = _sample_view(rng, mode, cfg)
    info: dict[str, Any] = {"mode": mode, "factors": v["factors"]}
    obj = None
    box = None
    if scene is not None:
        w0, h0 = scene.size
        mag = v["scale"] * min(W / w0, H / h0)
        ow, oh = w0 * mag, h0 * mag
        if v["place"] == "free":  # anywhere the (unwarped) object still fits, plus a little slack
            cx = W / 2 + v["dx"] * max(0.0, W - ow) / 2 * 0.9 + rng.normal(0, 0.03) * ow
            cy = H / 2 + v["dy"] * max(0.0, H - oh) / 2 * 0.9 + rng.normal(0, 0.03) * oh
        elif v["place"] == "offset":  # look at a point of the object
            cx, cy = W / 2 - v["dx"] * ow, H / 2 - v["dy"] * oh
        else:  # "edge": only a fraction |dx| of its width inside the frame
            f = abs(v["dx"])
            cx = f * ow - ow / 2 if v["dx"] < 0 else W - f * ow + ow / 2
            cy = H / 2 + v["dy"] * oh
        Hm = _homography(w0, h0, v["yaw"], v["pitch"], v["roll"], mag, cx, cy, v["depth"])
        corners = _project(Hm, np.array([[0, 0], [w0, 0], [w0, h0], [0, h0]], np.float64))
        lo, hi = corners.min(0), corners.max(0)
        box = (max(0.0, lo[0]), max(0.0, lo[1]), min(float(W), hi[0]), min(float(H), hi[1]))
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:
            box = None
        bottom = float(np.clip((corners[2, 1] + corners[3, 1]) / 2, 0.0, float(H)))
        horizon = float(np.clip(bottom - rng.uniform(0.0, 0.08) * H, 0.25 * H, 0.92 * H))
        # warp the best mip level, with a directional shading of the object
        level = int(np.clip(math.floor(math.log2(1.0 / mag)), 0, len(scene.levels) - 1)) if mag < 1 else 0
        L = scene.levels[level]
        sh = float(rng.uniform(-1, 1)) * (0.1 + 0.3 * v["q"])
        shade = (1.0 + sh * np.linspace(-0.5, 0.5, L.shape[1], dtype=np.float32))[None, :, None]
        src = L.copy()
        src[..., :3] *= shade
        src_im = Image.frombytes("RGBa", (L.shape[1], L.shape[0]),
                                 np.clip(src, 0, 255).astype(np.uint8).tobytes())
        Hinv = np.diag([0.5**level, 0.5**level, 1.0]) @ np.linalg.inv(Hm)
        Hinv /= Hinv[2, 2]
        warped = src_im.transform((W, H), Image.Transform.PERSPECTIVE, tuple(Hinv.ravel()[:8]),
                                  resample=Image.Resampling.BICUBIC)
        obj = np.asarray(warped).astype(np.float32)
        # area the whole landmark would cover on an infinite sensor: integral of |det J| over its alpha
        w3 = Hm[2] @ scene.uv4
        full = float(np.sum(scene.alpha4 * abs(np.linalg.det(Hm)) / np.abs(w3) ** 3) * 16)
        info.update(yaw=round(v["yaw"], 2), pitch=round(v["pitch"], 2), roll=round(v["roll"], 2),
                    scale=round(v["scale"], 3))
    else:
        horizon = float(rng.uniform(0.35, 0.75)) * H
        full = 0.0
    density = cfg.clutter * (2.5 if scene is None else 1.0)
    bg = _background(rng, W, H, horizon, density)
    img = np.asarray(bg).astype(np.float32)
    if obj is not None:
        a = np.clip(obj[..., 3:4] / 255.0, 0, 1)
        img = img * (1 - a) + np.clip(obj[..., :3], 0, 255)
    occ_lam = v["occ"] * (2.0 if scene is None else 1.0)
    layer = _occluders(rng, W, H, horizon, occ_lam, v["big"], box)
    la = np.asarray(layer).astype(np.float32)
    oa = la[..., 3:4] / 255.0
    img = img * (1 - oa) + la[..., :3] * oa
    visible = 0.0
    bbx = None
    if obj is not None:
        vis = (obj[..., 3] > 127) & (la[..., 3] < 128)
        visible = float(vis.sum())
        if visible > 0:
            ys, xs = np.nonzero(vis)
            bbx = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    q = v["q"]
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    blur = q * cfg.max_blur * float(rng.uniform(0.3, 1.0)) if rng.random() < 0.5 + 0.5 * q else 0.0
    if blur > 0.2:
        im = im.filter(ImageFilter.GaussianBlur(blur))
    x = _photometric(np.asarray(im).astype(np.float32) / 255.0, rng, q, cfg.photometric)
    noise = 0.8 + q * cfg.max_noise * float(rng.uniform(0.3, 1.0))
    x = x * 255.0 + rng.normal(0.0, noise, x.shape).astype(np.float32)
    out = Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8), "RGB")
    # visible: fraction of the landmark's own area that is in the frame and not occluded;
    # area: fraction of the image its visible part covers, normalised by the fill of its silhouette
    # (so a slender obelisk and a facade of the same extent count as the same size)
    fill = scene.area / (scene.size[0] * scene.size[1]) if scene is not None else 1.0
    info.update(q=round(q, 3), visible=round(min(1.0, visible / full), 4) if full > 0 else 0.0,
                area=round(visible / (W * H) / fill, 4), bbx=bbx)
    return out, info


def _label(info: dict[str, Any], cfg: SyntheticConfig) -> str:
    """revisitop-style label of a rendered database view of a landmark."""
    if info["visible"] < cfg.junk_visible or info["area"] < cfg.junk_area:
        return "junk"
    mild = (abs(info["yaw"]) <= cfg.easy_yaw and abs(info["pitch"]) <= cfg.easy_pitch
            and abs(info["roll"]) <= cfg.easy_roll and info["q"] <= cfg.easy_quality)
    if mild and info["visible"] >= cfg.easy_visible and info["area"] >= cfg.easy_area:
        return "easy"
    return "hard"


def _junk_ok(info: dict[str, Any], cfg: SyntheticConfig) -> bool:
    return info["visible"] >= cfg.junk_min_visible and info["area"] >= cfg.junk_min_area


def _query_ok(info: dict[str, Any], cfg: SyntheticConfig) -> bool:
    b = info["bbx"]
    return (info["visible"] >= cfg.query_visible and info["area"] >= cfg.easy_area and b is not None
            and b[2] - b[0] >= 16 and b[3] - b[1] >= 16)


# ================================================================================================
# plan and parallel rendering
# ================================================================================================

@dataclass
class _ViewJob:
    name: str
    mode: str  # easy | hard | junk | query | distractor | clutter
    size: tuple[int, int]
    seed: int


@dataclass
class _SceneJob:
    kind: str  # landmark | distractor | clutter
    landmark: int  # -1 for distractors
    family_seed: int
    scene_seed: int
    views: list[_ViewJob] = field(default_factory=list)


def _seed_stream(rng: Rng, cfg: SyntheticConfig) -> list[int]:
    """The per-item seeds of a benchmark; the first ``n_families`` are its style families."""
    return rng.integers(0, 2**63 - 1, size=10 * cfg.n_images + 4 * cfg.n_families + 16).tolist()


def family_seeds(cfg: SyntheticConfig, seed: int) -> list[int]:
    """The style-family seeds of the benchmark drawn from ``seed`` (its train split reuses them)."""
    return _seed_stream(np.random.default_rng(seed), cfg)[: cfg.n_families]


def _plan(cfg: SyntheticConfig, seed: int) -> tuple[list[_SceneJob], list[str], list[str]]:
    """All scenes and views with their seeds and names; returns (jobs, imlist, qimlist)."""
    rng = np.random.default_rng(seed)
    seeds = iter(_seed_stream(rng, cfg))
    fam_seeds = [next(seeds) for _ in range(cfg.n_families)]
    sizes = [tuple(int(v) for v in s) for s in cfg.image_sizes]
    mix = np.asarray(cfg.label_mix, np.float64)
    mix /= mix.sum()

    def size() -> tuple[int, int]:
        return sizes[int(rng.integers(len(sizes)))]

    jobs: list[_SceneJob] = []
    db: list[_ViewJob] = []
    queries: list[_ViewJob] = []
    fams = rng.permutation(np.arange(cfg.n_landmarks) % cfg.n_families)
    for lm in range(cfg.n_landmarks):
        job = _SceneJob("landmark", lm, fam_seeds[int(fams[lm])], next(seeds))
        modes = [("easy", "hard", "junk")[int(i)] for i in rng.choice(3, size=cfg.views_per_landmark, p=mix)]
        if "easy" not in modes:
            modes[0] = "easy"
        for m in modes:
            job.views.append(_ViewJob("", m, size(), next(seeds)))
        db += job.views
        qv = [_ViewJob("", "query", size(), next(seeds)) for _ in range(cfg.queries_per_landmark)]
        job.views += qv
        queries += qv
        jobs.append(job)
    n_clutter = int(round(cfg.n_distractors * cfg.clutter_fraction))
    left = cfg.n_distractors - n_clutter
    while left > 0:
        k = min(left, int(rng.integers(1, cfg.distractor_views + 1)))
        shared = rng.random() < cfg.distractor_family_share
        fam = fam_seeds[int(rng.integers(cfg.n_families))] if shared else next(seeds)
        job = _SceneJob("distractor", -1, fam, next(seeds))
        job.views = [_ViewJob("", "distractor", size(), next(seeds)) for _ in range(k)]
        db += job.views
        jobs.append(job)
        left -= k
    for start in range(0, n_clutter, 8):
        job = _SceneJob("clutter", -1, 0, 0)
        job.views = [_ViewJob("", "clutter", size(), next(seeds)) for _ in range(min(8, n_clutter - start))]
        db += job.views
        jobs.append(job)
    imlist, qimlist = [], []
    for i, k in enumerate(rng.permutation(len(db))):
        db[int(k)].name = f"{_PREFIX}db_{i:05d}"
    for i, k in enumerate(rng.permutation(len(queries))):
        queries[int(k)].name = f"{_PREFIX}q_{i:04d}"
    imlist = sorted(v.name for v in db)
    qimlist = sorted(v.name for v in queries)
    return jobs, imlist, qimlist


def _render_job(job: _SceneJob, cfg: SyntheticConfig, jpg_dir: str) -> list[dict[str, Any]]:
    """Render (and write) every view of one scene; returns one render record per view."""
    scene = None
    if job.kind != "clutter":
        scene = _make_scene(_family(job.family_seed, cfg.scene_mix), job.scene_seed, cfg.family_variation)
    out: list[tuple[_ViewJob, Image.Image, dict[str, Any]]] = []
    for vj in job.views:
        mode = vj.mode
        if mode == "distractor":
            mode = "easy" if np.random.default_rng([vj.seed, 7]).random() < 0.5 else "hard"
        im, info = _render_view(scene, mode, vj.size, np.random.default_rng(vj.seed), cfg)
        if vj.mode == "query":
            attempt = 1
            while not _query_ok(info, cfg):  # redraw until the landmark is well visible
                m = "query" if attempt < 20 else "easy"
                im, info = _render_view(scene, m, vj.size, np.random.default_rng([vj.seed, attempt]), cfg)
                attempt += 1
                if attempt > 60:
                    raise RuntimeError(f"synthetic: no usable query view of scene {job.scene_seed}")
        if job.kind == "landmark" and vj.mode != "query":
            info["label"] = _label(info, cfg)
            attempt = 1
            while info["label"] == "junk" and not _junk_ok(info, cfg) and attempt < 20:
                # junk must still contain a trace of the landmark, else it would be a negative
                im, info = _render_view(scene, mode, vj.size, np.random.default_rng([vj.seed, 500 + attempt]),
                                        cfg)
                info["label"] = _label(info, cfg)
                attempt += 1
        out.append((vj, im, info))
    if job.kind == "landmark" and not any(i.get("label") in ("easy", "hard") for _, _, i in out):
        vj, _, _ = out[0]  # guarantee a positive: redraw the first view as a mild one
        for attempt in range(1, 60):
            im, info = _render_view(scene, "easy", vj.size, np.random.default_rng([vj.seed, 1000 + attempt]),
                                    cfg)
            info["label"] = _label(info, cfg)
            if info["label"] != "junk":
                out[0] = (vj, im, info)
                break
    records = []
    for vj, im, info in out:
        im.save(os.path.join(jpg_dir, vj.name + ".jpg"), "JPEG", quality=cfg.jpeg_quality)
        info.update(name=vj.name, kind=job.kind, landmark=job.landmark, scene=job.scene_seed,
                    size=list(vj.size), query=vj.mode == "query")
        records.append(info)
    return records


def _n_workers(workers: int | None, n_images: int) -> int:
    if workers is not None:
        return max(1, int(workers))
    if n_images < 150:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _render_all(jobs: list[_SceneJob], cfg: SyntheticConfig, jpg_dir: Path,
                workers: int, render: Any = None) -> list[dict[str, Any]]:
    """Run ``render(job, cfg, jpg_dir)`` (default `_render_job`) for every job, in worker processes."""
    render = render or _render_job
    order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i].views))  # big jobs first balance better
    if workers <= 1:
        results = [render(jobs[i], cfg, str(jpg_dir)) for i in order]
    else:
        # fork: workers need no re-import of the caller's main module; output does not depend on it
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
        try:
            with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
                futures = [ex.submit(render, jobs[i], cfg, str(jpg_dir)) for i in order]
                results = [f.result() for f in futures]
        except (OSError, ImportError, NotImplementedError, BrokenProcessPool):  # no usable process pool
            results = [render(jobs[i], cfg, str(jpg_dir)) for i in order]
    return [r for rs in results for r in rs]


def _build_gnd(cfg: SyntheticConfig, imlist: list[str], qimlist: list[str],
               records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    db_index = {n: i for i, n in enumerate(imlist)}
    by_lm: dict[int, dict[str, list[int]]] = {}
    for r in records:
        if r["kind"] == "landmark" and not r["query"]:
            by_lm.setdefault(r["landmark"],
                             {"easy": [], "hard": [], "junk": []})[r["label"]].append(db_index[r["name"]])
    q_rec = {r["name"]: r for r in records if r["query"]}
    gnd = []
    for qn in qimlist:
        r = q_rec[qn]
        lists = by_lm[r["landmark"]]
        W, H = r["size"]
        x0, y0, x1, y1 = r["bbx"]
        gnd.append({"easy": sorted(lists["easy"]), "hard": sorted(lists["hard"]),
                    "junk": sorted(lists["junk"]),
                    "bbx": [float(max(0, x0)), float(max(0, y0)), float(min(W, x1)), float(min(H, y1))]})
    return gnd


# ================================================================================================
# cache / atomic publication
# ================================================================================================

_TMP_PREFIX = f".tmp-{DATASET}-"
_MARKER = f"{DATASET}.json"


def _record(cfg: SyntheticConfig, seed: int) -> dict[str, Any]:
    """What identifies a generated benchmark (JSON-normalised, so tuples compare as lists)."""
    rec = {"format_version": FORMAT_VERSION, "dataset": DATASET, "seed": int(seed), "config": asdict(cfg)}
    return json.loads(json.dumps(rec))


def _is_complete(root: Path, rec: dict[str, Any], cfg: SyntheticConfig) -> bool:
    try:
        found = json.loads((root / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(found, dict) or any(found.get(k) != v for k, v in rec.items()):
        return False
    jpg = root / "jpg"
    if not (root / f"gnd_{DATASET}.pkl").is_file() or not jpg.is_dir():
        return False
    return sum(1 for n in os.listdir(jpg) if n.endswith(".jpg")) == cfg.n_images


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Exclusive lock on ``root`` for the generation (no-op where ``fcntl`` is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(root / f".{DATASET}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _publish(tmp: Path, root: Path, rec: dict[str, Any]) -> None:
    """Move a finished generation from ``tmp`` into ``root``; the marker is written last."""
    (root / _MARKER).unlink(missing_ok=True)  # from here on ``root`` reads as incomplete
    if (root / "jpg").exists():
        (root / "jpg").rename(tmp / "old-jpg")
    (tmp / "jpg").rename(root / "jpg")
    for name in (f"gnd_{DATASET}.pkl", f"meta_{DATASET}.json"):
        os.replace(tmp / name, root / name)
    marker_tmp = tmp / _MARKER
    marker_tmp.write_text(json.dumps(rec, indent=1))
    os.replace(marker_tmp, root / _MARKER)


def _resolve(size: str | SyntheticConfig) -> SyntheticConfig:
    if isinstance(size, SyntheticConfig):
        return size
    if size not in SIZES:
        raise ValueError(f"unknown synthetic size {size!r}; expected one of {sorted(SIZES)} or a config")
    return SIZES[size]


def synthetic_labels(root: str | Path) -> dict[str, str]:
    """The landmark id (``"lm<k>"``) of every image of a generated benchmark that shows one (not distractors)."""
    records = json.loads((Path(root) / f"meta_{DATASET}.json").read_text())
    return {r["name"]: f"lm{r['landmark']}" for r in records if r["kind"] == "landmark"}


def make_synthetic(root: str | Path, size: str | SyntheticConfig = "default", seed: int = 0, *,
                   workers: int | None = None, verbose: bool = False) -> Path:
    """Write (or reuse) the synthetic benchmark under ``root``; returns ``root/gnd_synthetic.pkl``.

    ``size`` is a key of :data:`SIZES` or a :class:`SyntheticConfig`.  A call whose config,
    seed and format version match ``root/synthetic.json`` reuses the files; otherwise the
    benchmark is rendered into a temporary folder under ``root`` and moved into place, the
    marker last, so an interrupted run never leaves a benchmark that looks complete.
    ``workers`` is the number of rendering processes (default: one per CPU, 1 for small sets);
    the output does not depend on it.
    """
    cfg = _resolve(size)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    gnd_path = root / f"gnd_{DATASET}.pkl"
    rec = _record(cfg, seed)
    if _is_complete(root, rec, cfg):
        return gnd_path
    with _locked(root):
        if _is_complete(root, rec, cfg):  # another process finished it while we waited
            return gnd_path
        if (root / "jpg").is_dir():  # never replace another dataset's images
            foreign = [n for n in os.listdir(root / "jpg") if not n.startswith(_PREFIX)]
            if foreign:
                raise FileExistsError(f"{root / 'jpg'} holds images that are not synthetic "
                                      f"({foreign[0]}, ...); pick another root for the synthetic benchmark")
        for stale in root.glob(_TMP_PREFIX + "*"):  # left by killed runs (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            t0 = time.perf_counter()
            (tmp / "jpg").mkdir(parents=True)
            jobs, imlist, qimlist = _plan(cfg, seed)
            n_workers = _n_workers(workers, cfg.n_images)
            records = _render_all(jobs, cfg, tmp / "jpg", n_workers)
            gnd = _build_gnd(cfg, imlist, qimlist, records)
            with open(tmp / f"gnd_{DATASET}.pkl", "wb") as fh:
                pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, fh, protocol=3)
            records.sort(key=lambda r: r["name"])
            (tmp / f"meta_{DATASET}.json").write_text(json.dumps(records))
            _publish(tmp, root, rec)
            if verbose:
                counts = {k: sum(len(g[k]) for g in gnd) for k in ("easy", "hard", "junk")}
                print(f"synthetic: {len(imlist)} db + {len(qimlist)} query images in {root} "
                      f"({time.perf_counter() - t0:.1f}s, {n_workers} workers); gnd totals {counts}",
                      file=sys.stderr)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return gnd_path


# ================================================================================================
# contact sheet and command line
# ================================================================================================

_LABEL_COLORS = {"query": (220, 30, 30), "easy": (40, 170, 60), "hard": (240, 150, 20),
                 "junk": (150, 150, 150),
                 "distractor": (60, 90, 200)}


def _thumb(path: Path, t: int, label: str, bbx: list[float] | None = None) -> Image.Image:
    im = Image.open(path).convert("RGB")
    if bbx is not None:
        ImageDraw.Draw(im).rectangle(bbx, outline=_LABEL_COLORS["query"], width=3)
    im.thumbnail((t - 8, t - 22))
    cell = Image.new("RGB", (t, t), (250, 250, 250))
    cell.paste(im, ((t - im.width) // 2, 4))
    d = ImageDraw.Draw(cell)
    d.rectangle(((t - im.width) // 2 - 2, 2, (t + im.width) // 2 + 1, 4 + im.height + 1),
                outline=_LABEL_COLORS[label], width=2)
    d.text((6, t - 16), label, fill=_LABEL_COLORS[label])
    return cell


def contact_sheet(root: str | Path, out: str | Path | None = None, n_rows: int = 8, per_label: int = 3,
                  thumb: int = 150) -> Path:
    """A PNG of ``n_rows`` queries (bbx drawn) with up to ``per_label`` easy / hard / junk views each."""
    root = Path(root)
    with open(root / f"gnd_{DATASET}.pkl", "rb") as fh:
        g = pickle.load(fh)
    rows, seen = [], set()
    for qi, rec in enumerate(g["gnd"]):
        key = tuple(rec["easy"] + rec["hard"])
        if key in seen:
            continue
        seen.add(key)
        rows.append(qi)
        if len(rows) == n_rows:
            break
    positives = {j for rec in g["gnd"] for k in ("easy", "hard", "junk") for j in rec[k]}
    distractors = [j for j in range(len(g["imlist"])) if j not in positives][: 1 + 3 * per_label]
    ncol = 1 + 3 * per_label
    sheet = Image.new("RGB", (ncol * thumb, (len(rows) + 1) * thumb), (255, 255, 255))
    jpg = root / "jpg"
    for r, qi in enumerate(rows):
        rec = g["gnd"][qi]
        sheet.paste(_thumb(jpg / f"{g['qimlist'][qi]}.jpg", thumb, "query", rec["bbx"]), (0, r * thumb))
        c = 1
        for lab in ("easy", "hard", "junk"):
            for j in rec[lab][:per_label]:
                sheet.paste(_thumb(jpg / f"{g['imlist'][j]}.jpg", thumb, lab), (c * thumb, r * thumb))
                c += 1
            c = 1 + per_label * (1 + ("easy", "hard", "junk").index(lab))
    for c, j in enumerate(distractors):
        sheet.paste(_thumb(jpg / f"{g['imlist'][j]}.jpg", thumb, "distractor"),
                    (c * thumb, len(rows) * thumb))
    out = Path(out) if out is not None else root / "contact_sheet.png"
    sheet.save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m retrieval.data.synthetic",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="output folder (revisitop layout)")
    ap.add_argument("--size", default="default", choices=sorted(SIZES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--no-sheet", action="store_true", help="do not write contact_sheet.png")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    gnd = make_synthetic(args.root, args.size, args.seed, workers=args.workers, verbose=True)
    print(f"{gnd} ({time.perf_counter() - t0:.1f}s)")
    if not args.no_sheet:
        print(contact_sheet(args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())

