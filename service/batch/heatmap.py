"""Heat-map pictures: a score map drawn over its image, with a legend band below it.

The picture is the image's size plus, for images at least 64 px wide, a dark legend band
under it, so the legend never hides the image: pixel (y, x) of the picture is pixel (y, x)
of the image for y < its height.

It is drawn over the original colour image. Each cell paints the stride x stride square
around its window centre (in the resized image the map was computed on): the pixels whose
nearest window centre is that cell's and within half a stride of it. Pixels farther out
(the border band between the edge windows' centres and the image's edges, and the last
``(W - R) mod S``) stay unpainted: edge cells are never stretched out to the border. Modes:

- top class: the colour of the cell's best class (a fixed 20-colour palette, by class index
  as the detection boxes are), opacity
  from 0.25 (the map's least confident painted cell) to 0.65 (its most confident), so a
  map whose best probabilities are all low (many classes, random weights) still shows; a
  legend lists the classes shown (the 20 with most cells, in class order) and the
  confidence range; cells whose best class is labelled ``background`` (or
  ``__background__``, ``bg``) stay unpainted. A map saved with ``--save argmax`` draws
  this way too, its best score giving the opacity;
- one class: that class's probability through a perceptual colour ramp (dark blue ->
  green -> yellow) stretched over the map's own range [min, max] (over [0, 1] when the map
  is flat or ``normalise=False``), with the probabilities at 0, 1/4, ... of the ramp in the
  legend.

Detections (when given) are drawn as boxes in their class's colour with "label score".
Logit maps are turned into probabilities (softmax over the class axis) for drawing only.
Uses only numpy and Pillow; the first map (first ``--scales`` entry) is drawn.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from densemap.service.engine.result import ScaleMap

# 20 distinct colours (RGB), cycled for class indices >= 20.
CLASS_PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
        (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
        (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
        (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
    ],
    dtype=np.uint8,
)  # fmt: skip
# Anchors of the ramp for one class, from 0.0 to 1.0 (approximately viridis).
_RAMP_ANCHORS = np.array(
    [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)],
    dtype=np.float64,
)
TOP_CLASS_MAX_ALPHA = 0.65
TOP_CLASS_MIN_ALPHA = 0.25
BOX_WIDTH = 2
BACKGROUND_LABELS = frozenset({"background", "__background__", "bg"})  # left unpainted
CLASS_ALPHA = 0.55


def ramp_table() -> np.ndarray:
    """[256, 3] uint8 colour ramp, linear between the anchors."""
    x = np.linspace(0.0, 1.0, 256)
    knots = np.linspace(0.0, 1.0, len(_RAMP_ANCHORS))
    channels = [np.interp(x, knots, _RAMP_ANCHORS[:, c]) for c in range(3)]
    return np.round(np.stack(channels, axis=1)).astype(np.uint8)


RAMP = ramp_table()
_Entry = tuple[object, str]  # (RGB swatch or None for plain text, text)


def pixel_cells(size: int, *, cells: int, stride: int, window: int, origin: int, resize: float):
    """For each pixel along one axis, the index of its cell, or -1 when no cell's centre is
    within half a stride (the border band and the uncovered tail)."""
    centre = (np.arange(size, dtype=np.float64) + 0.5) * resize  # in resized-image pixels
    index = np.floor((centre - origin - window / 2.0) / stride + 0.5).astype(np.int64)
    return np.where((index >= 0) & (index < cells), index, -1)


def _stretch(values: np.ndarray, *, normalise: bool) -> tuple[np.ndarray, float, float]:
    """``values`` mapped to [0, 1] over their own range (or [0, 1] itself), and that range."""
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if not normalise or hi - lo < 1e-6:
        lo, hi = 0.0, 1.0
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0), lo, hi


def probabilities_of(scores: np.ndarray, *, probabilities: bool) -> np.ndarray:
    """[C, n_h, n_w] float32 probabilities (softmax over classes for logit maps)."""
    values = scores.astype(np.float32)
    if probabilities:
        return values
    values = values - values.max(axis=0, keepdims=True)
    np.exp(values, out=values)
    return values / values.sum(axis=0, keepdims=True)


def _as_rgb(image: np.ndarray) -> Image.Image:
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    return Image.fromarray(pixels).convert("RGB")


LEGEND_LINE = 14  # pixels per row of the legend band
LEGEND_MIN_WIDTH = 64  # narrower images get no legend (it would not fit)
_BAND_RGB = (32, 32, 32)


def _legend_rows(draw: ImageDraw.ImageDraw, entries: list[_Entry], width: int) -> list[list]:
    """Entries flowed left to right into rows of at most ``width`` pixels: (x, entry)."""
    rows: list[list] = [[]]
    x = 4
    for colour, text in entries:
        span = (14 if colour is not None else 0) + int(draw.textlength(text)) + 10
        if rows[-1] and x + span > width:
            rows.append([])
            x = 4
        rows[-1].append((x, colour, text))
        x += span
    return rows


def add_legend_band(picture: Image.Image, entries: list[_Entry]) -> Image.Image:
    """The picture with a legend band below it: the image itself stays whole and unhidden.

    Pixel (y, x) of the result is pixel (y, x) of ``picture`` for y < picture.height.
    """
    if picture.width < LEGEND_MIN_WIDTH or not entries:
        return picture
    rows = _legend_rows(ImageDraw.Draw(picture), entries, picture.width)
    band = LEGEND_LINE * len(rows) + 4
    framed = Image.new("RGB", (picture.width, picture.height + band), _BAND_RGB)
    framed.paste(picture, (0, 0))
    draw = ImageDraw.Draw(framed)
    for r, row in enumerate(rows):
        y = picture.height + 2 + r * LEGEND_LINE
        for x, colour, text in row:
            if colour is not None:
                draw.rectangle((x, y + 2, x + 9, y + 11), fill=tuple(int(c) for c in colour))
                x += 14
            draw.text((x, y), text, fill=(255, 255, 255))
    return framed


def render_heatmap(
    image: np.ndarray,
    scale_map: ScaleMap,
    *,
    labels: tuple[str, ...] = (),
    class_index: int | None = None,
    probabilities: bool = True,
    detections=None,
    normalise: bool = True,
    argmax_scores: np.ndarray | None = None,
) -> Image.Image:
    """The image (H x W, grey or RGB) with the map (and boxes) drawn over it, as RGB.

    The top-class picture also draws from a map saved with ``--save argmax``: its
    ``argmax`` (class per cell) and ``argmax_scores`` (that class's score: the opacity;
    without them every painted cell is equally opaque). One class needs the score map."""
    base = _as_rgb(image)
    geo = scale_map.geometry
    score_name = "P"  # what the opacity legend's range is of
    if scale_map.scores is not None:
        probs = probabilities_of(scale_map.scores, probabilities=probabilities)
        channel_classes = scale_map.classes or tuple(range(probs.shape[0]))
        top = probs.argmax(axis=0) if class_index is None else None
        top_class = None if top is None else np.asarray(channel_classes)[top]
        confidence = None if top is None else probs.max(axis=0)
    elif scale_map.argmax is not None and class_index is None:
        top_class = np.asarray(scale_map.argmax)
        confidence = None if argmax_scores is None else np.asarray(argmax_scores, np.float32)
        if confidence is not None and not probabilities:  # logits: opacity over their range
            normalise, score_name = True, "logit"
    else:
        raise ValueError(
            "the heat-map needs the score map itself"
            + (
                ""
                if scale_map.argmax is None
                else " to draw one class (argmax draws the top class)"
            )
        )
    n_h, n_w = scale_map.shape
    rows = pixel_cells(
        base.height, cells=n_h, stride=geo.stride[0], window=geo.window[0],
        origin=geo.origin[0], resize=geo.resize[0],
    )  # fmt: skip
    cols = pixel_cells(
        base.width, cells=n_w, stride=geo.stride[1], window=geo.window[1],
        origin=geo.origin[1], resize=geo.resize[1],
    )  # fmt: skip
    cell_rgba = np.zeros((n_h + 1, n_w + 1, 4), dtype=np.uint8)  # last row/col: uncovered

    def name(i: int) -> str:
        return labels[i] if i < len(labels) else str(i)

    if class_index is None:
        cell_rgba[:n_h, :n_w, :3] = CLASS_PALETTE[top_class % len(CLASS_PALETTE)]
        shown_cells = np.ones((n_h, n_w), dtype=bool)
        for c in np.unique(top_class):
            if name(int(c)).strip().lower() in BACKGROUND_LABELS:
                shown_cells[top_class == c] = False  # the image shows through
        if confidence is None:
            level, lo, hi = np.ones(int(shown_cells.sum())), 0.0, 1.0
        else:
            level, lo, hi = _stretch(confidence[shown_cells], normalise=normalise)
        alpha = TOP_CLASS_MIN_ALPHA + (TOP_CLASS_MAX_ALPHA - TOP_CLASS_MIN_ALPHA) * level
        cell_rgba[:n_h, :n_w, 3][shown_cells] = np.round(alpha * 255)
        shown, counts = np.unique(top_class, return_counts=True)
        order = [
            int(c)
            for c in shown[np.argsort(-counts, kind="stable")]
            if name(int(c)).strip().lower() not in BACKGROUND_LABELS
        ][: len(CLASS_PALETTE)]
        order.sort()  # legend in class order
        legend = [(None, "top class:")] if order else []
        legend += [(CLASS_PALETTE[c % len(CLASS_PALETTE)], name(c)) for c in order]
        if order and (lo, hi) != (0.0, 1.0):  # opacity stretched over the map's own range
            legend.append((None, f"opacity: {score_name} {lo:.3g}..{hi:.3g}"))
    else:
        channel = channel_classes.index(class_index)
        level, lo, hi = _stretch(probs[channel], normalise=normalise)
        cell_rgba[:n_h, :n_w, :3] = RAMP[np.round(level * 255).astype(np.intp)]
        cell_rgba[:n_h, :n_w, 3] = round(CLASS_ALPHA * 255)
        steps = (0.0, 0.25, 0.5, 0.75, 1.0)
        legend = [(None, f"P({name(class_index)}):")]
        legend += [(RAMP[round(p * 255)], f"{lo + p * (hi - lo):.3g}") for p in steps]
    overlay = cell_rgba[rows[:, None], cols[None, :]]  # -1 picks the transparent last row/col
    picture = Image.alpha_composite(base.convert("RGBA"), Image.fromarray(overlay, "RGBA"))
    picture = picture.convert("RGB")
    if detections:
        draw_boxes(picture, detections)
    return add_legend_band(picture, legend)


def draw_boxes(picture: Image.Image, detections) -> None:
    """Each detection's box (x1, y1 exclusive) in its class colour, "label score" above it
    (below it near the top edge), on a dark patch for contrast."""
    draw = ImageDraw.Draw(picture)
    for d in reversed(list(detections)):  # the best box drawn last, on top
        colour = tuple(int(c) for c in CLASS_PALETTE[d.class_index % len(CLASS_PALETTE)])
        x0, y0, x1, y1 = (int(round(v)) for v in d.box)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=BOX_WIDTH)
        text = f"{d.label or d.class_index} {d.score:.2f}"
        width = int(draw.textlength(text)) + 4
        if y0 >= 12:
            top = y0 - 12
        else:  # no room above: below the box, else inside it
            top = y1 if y1 + 12 <= picture.height else y0 + BOX_WIDTH
        draw.rectangle((x0, top, x0 + width, top + 11), fill=_BAND_RGB)
        draw.text((x0 + 2, top), text, fill=colour)
