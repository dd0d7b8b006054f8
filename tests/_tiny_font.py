"""A TrueType font built with fontTools for the emoji tests: one polygon (or nothing) per code point,
so the tests never need the real emoji packages."""

from __future__ import annotations

from pathlib import Path


def outline_font(
    path: Path, outlines: dict[int, list[tuple[int, int]]], family: str = "TorchsageTiny"
) -> Path:
    """Writes a font to ``path`` drawing each code point of ``outlines`` as that closed polygon (in
    font units of a 1000-unit em; an empty list draws nothing) and returns ``path``."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    names = [".notdef", *(f"u{point:x}" for point in outlines)]
    polygons = {".notdef": [], **{f"u{p:x}": outline for p, outline in outlines.items()}}
    drawn = {}
    for name in names:
        pen = TTGlyphPen(None)
        if polygons[name]:
            pen.moveTo(polygons[name][0])
            for point in polygons[name][1:]:
                pen.lineTo(point)
            pen.closePath()
        drawn[name] = pen.glyph()
    fb = FontBuilder(1000, isTTF=True)
    fb.setupGlyphOrder(names)
    fb.setupCharacterMap({p: f"u{p:x}" for p in outlines})
    fb.setupGlyf(drawn)
    glyf = fb.font["glyf"]
    fb.setupHorizontalMetrics({n: (800, getattr(glyf[n], "xMin", 0)) for n in names})
    fb.setupHorizontalHeader(ascent=800, descent=-200)
    fb.setupNameTable({"familyName": family, "styleName": "Regular"})
    fb.setupOS2(sTypoAscender=800, sTypoDescender=-200, usWinAscent=800, usWinDescent=200)
    fb.setupPost()
    fb.save(str(path))
    return path
