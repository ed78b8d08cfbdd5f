"""The outlines of the shape kinds, shared by scene objects, textures and creatures."""

from __future__ import annotations

import math


def shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float = 0.0) -> list[tuple[float, float]]:
    """Outline points of a shape centred on (cx, cy) with radius r, in pixels."""
    if kind == "circle":
        n = 64
        pts = [(math.cos(2 * math.pi * i / n), math.sin(2 * math.pi * i / n)) for i in range(n)]
    elif kind == "square":
        s = 0.8  # a square of the same visual weight as a circle of radius 1
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif kind == "triangle":
        pts = [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in (-90, 30, 150)]
        pts = [(x, y + 0.15) for x, y in pts]  # centre the visual mass
    elif kind == "star":
        pts = []
        for i in range(10):
            rad = 1.0 if i % 2 == 0 else 0.45
            a = math.radians(-90 + 36 * i)
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif kind == "heart":
        pts = []
        for i in range(64):
            t = 2 * math.pi * i / 64
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x / 17.0, (y + 2.0) / 17.0))
    else:
        raise ValueError(f"unknown shape {kind!r}")
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]
