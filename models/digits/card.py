"""MODEL_CARD.md of the digits model, written from measured numbers (never typed in)."""

from __future__ import annotations

import os
from pathlib import Path

from densemap.service.contract import Preprocessing
from models.digits.data import DIGIT_SIZES, MIN_SPACING, STRIDE, TEST_FRACTION, WINDOW
from models.digits.evaluate import (
    EVAL_PAGE_DIGITS,
    EVAL_PAGE_SHAPE,
    EVAL_PAGES,
    MATCH_RADIUS,
    MIXED_WINDOWS,
    THRESHOLDS,
    Report,
)

CARD_FILE = "MODEL_CARD.md"


def _files_table(out_dir: Path) -> tuple[list[str], int]:
    rows, total = [], 0
    for path in sorted(out_dir.glob("model*.onnx")):
        size = path.stat().st_size
        total += size
        rows.append(f"| `{path.name}` | {size / 1024:.0f} KiB |")
    return rows, total


def reading_rows(report: Report) -> list[str]:
    """The page-reading table rows (also used by the tests to check the card)."""
    rows = []
    for r in report.readings:
        s = r.score
        kind = "native" if r.stride == STRIDE else "à trous"
        rows.append(
            f"| {r.stride} ({kind}) | {s.read}/{s.digits} = {s.reading_accuracy:.2%} | "
            f"{s.blank_false}/{s.blank_cells} = {s.blank_false_positive_rate:.2%} | "
            f"{s.off_false}/{s.off_cells} = {s.off_centre_false_positive_rate:.2%} | "
            f"{r.precision:.2%} | {r.recall:.2%} |"
        )
    return rows


BOX_SECTION = [
    "### Boxes (the engine's detections)",
    "`densemap score --detections` (the model's `densemap.json` `detections`: threshold "
    "0.5, NMS IoU 0.3 across classes): each cell naming a digit with probability >= 0.5 is a box, the central "
    "20x20 px of its window (`densemap.json`: `box_offsets` 1/7 of the window on each side); "
    "greedy NMS at IoU 0.3 over all classes keeps the best. A box is right when its label is "
    "the digit's and its IoU with the digit's box (side and place from the page generator) "
    "is >= 0.5. Target at stride 2: precision and recall >= 97%.",
    "",
    "| stride | box precision | box recall |",
    "|---|---|---|",
]


def box_rows(report: Report) -> list[str]:
    """The box table rows (also used by the tests to check the card)."""
    return [
        f"| {b.stride} | {b.matched}/{b.detections} = {b.precision:.2%} | "
        f"{b.matched}/{b.digits} = {b.recall:.2%} |"
        for b in report.boxes
    ]


def heldout_line(report: Report) -> str:
    return (
        f"**Held-out accuracy: {report.heldout_accuracy:.2%}** "
        f"({report.heldout_correct}/{report.heldout} held-out digits)"
    )


def render(
    report: Report, *, config, preprocessing: Preprocessing, minutes: float, out_dir: Path
) -> str:
    files, total = _files_table(out_dir)
    height, width = EVAL_PAGE_SHAPE
    lines = [
        "# Model card: `digits`",
        "",
        "Handwritten digit finder shipped with densemap: a LeNet-5 window classifier "
        f"({WINDOW}x{WINDOW} px, 11 classes: `0`-`9` and `background`) converted to an exact "
        "fully-convolutional ONNX model, so one pass over a page gives a class for every "
        f"{WINDOW}x{WINDOW} window at stride {STRIDE} (or 2 and 1 with the à-trous variants).",
        "",
        "## Data",
        "- scikit-learn `load_digits`: 1,797 real handwritten digits, 8x8, 17 grey levels "
        "(the UCI optdigits test set, written by 13 people). Ships inside scikit-learn: no "
        "download.",
        f"- Split by sample before any augmentation: stratified, seed 0, "
        f"{1 - TEST_FRACTION:.0%} train / {TEST_FRACTION:.0%} held out (1,347 / 450). "
        "Held-out digits never reach training; every number below uses them only.",
        "- **Page convention: dark ink on light paper**, 8-bit grey. A glyph value v "
        "becomes ink v/16; a pixel is paper x (1 - contrast x ink) + noise, with paper "
        "190-255, contrast 0.6-1.0, Gaussian noise sigma 0-12.",
        f"- Glyphs upscaled (bilinear) to {DIGIT_SIZES[0]}-{DIGIT_SIZES[-1]} px in the "
        f"{WINDOW}x{WINDOW} window. A window is a digit when a glyph centre lies within "
        f"{STRIDE // 2} px (half a stride) of the window centre on both axes; `background` "
        f"when no glyph centre is within {STRIDE} px (blank paper, noise, digits cut by the "
        f"border or shifted by a stride or more). Neighbouring digits (centres >= "
        f"{MIN_SPACING} px apart) may show at the border of both kinds. 35% background.",
        "",
        "## Architecture and geometry",
        "- densemap `lenet5` (`densemap.convert.archs`): conv 6@5x5, ReLU, max-pool 2, conv 16@5x5, "
        "ReLU, max-pool 2, FC 256-120-84-11 (ReLU). No padding anywhere, so the dense map "
        "equals crop-by-crop evaluation exactly. The converter turns the FC head into a "
        "4x4 conv and two 1x1 convs; 44,511 parameters.",
        f"- Window R = {WINDOW}, native stride S = {STRIDE}; cell (i, j) looks at rows "
        f"[{STRIDE}i, {STRIDE}i + {WINDOW}) and columns [{STRIDE}j, {STRIDE}j + {WINDOW}); "
        f"a page of W px has (W - {WINDOW}) // {STRIDE} + 1 cells per axis.",
        f"- Preprocessing (in the ONNX metadata): grey `L`, scale 1/255, mean "
        f"{preprocessing.mean[0]}, std {preprocessing.std[0]} (of the training windows).",
        "- Output: logits (the engine applies the softmax); labels in `labels.txt`.",
        "",
        "| file | size |",
        "|---|---|",
        *files,
        f"| total | {total / 1024:.0f} KiB |",
        "",
        "## Training",
        f"- AdamW, one-cycle learning rate (peak {config.learning_rate}), weight decay "
        f"{config.weight_decay}, batch {config.batch_size}, {config.epochs} epochs of "
        f"{config.windows_per_epoch:,} freshly synthesised windows, seed {config.seed}, "
        f"{config.threads} CPU thread(s): {minutes:.1f} min on this machine.",
        "- Weights: `classifier.pt` (state_dict of `densemap.convert.archs.build('lenet5', "
        f"num_classes=11, input_size={WINDOW})`).",
        "",
        "## Measured quality (shipped ONNX, through `densemap.service.engine`, fixed seeds)",
        f"- {heldout_line(report)}: each held-out digit once, centred within half a "
        "stride, random size, paper, contrast, noise and neighbours. Target >= "
        f"{THRESHOLDS['heldout_accuracy']:.0%}.",
        f"- Mixed held-out windows ({MIXED_WINDOWS:,}, drawn like the training windows): "
        f"{report.windows_accuracy:.2%}; background windows kept as background: "
        f"{report.background_correct}/{report.background_windows}.",
        f"- Page reading on {EVAL_PAGES} synthetic pages of {height}x{width} px with up to "
        f"{EVAL_PAGE_DIGITS} held-out digits each. *Read*: the cell centred nearest a "
        f"digit's centre names its class (target >= {THRESHOLDS['reading_accuracy']:.0%}). "
        "*Blank FP*: cells whose window touches no digit box but do not say background "
        f"(target <= {THRESHOLDS['blank_fp_rate']:.0%}). *Off-centre FP*: cells whose window "
        f"touches a digit but whose centre is {STRIDE} px or more from every digit centre, "
        f"yet name a digit (localisation; target <= {THRESHOLDS['off_centre_fp_rate']:.0%}). "
        "*Precision/recall*: detections "
        "(8-connected groups of cells naming one digit, at their most confident cell, "
        f"probability >= 0.5) matched to a digit of that class within {MATCH_RADIUS:g} px.",
        "",
        "| stride | read | blank FP | off-centre FP | detection precision | detection recall |",
        "|---|---|---|---|---|---|",
        *reading_rows(report),
        "",
        *BOX_SECTION,
        *box_rows(report),
        "",
        "## Reproduce",
        "```",
        "python -m models.digits.train      # retrain, convert, pages, evaluate, this card",
        "python -m models.digits.evaluate   # recompute the numbers above from the ONNX",
        "pytest tests/digits/               # the same numbers against the targets",
        "```",
        "Retraining needs the `train` extra (torch, scikit-learn); serving needs neither.",
        "",
        "## Limitations",
        "- Trained on synthetic pages of one writer population (optdigits), digits of "
        f"{DIGIT_SIZES[0]}-{DIGIT_SIZES[-1]} px, dark on light. Other sizes need the "
        "engine's `scales`; light ink on dark paper must be inverted first.",
        "- The split is by sample: the same 13 writers appear in training and held-out "
        "digits (the data carries no writer id), so accuracy on new writers may be lower.",
        "- Cells between half a stride and a stride from a digit centre were never "
        "trained on: they may name the digit too (groups of 2-4 cells at strides 2 and 1).",
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    report: Report, *, config, preprocessing: Preprocessing, minutes: float, out_dir: Path
) -> Path:
    path = out_dir / CARD_FILE
    text = render(
        report, config=config, preprocessing=preprocessing, minutes=minutes, out_dir=out_dir
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
