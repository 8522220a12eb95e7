"""Train, convert and document the bundled ``digits`` model (seeded, CPU, a few minutes).

    python -m models.digits.train                 # writes into models/digits/
    python -m models.digits.train --out /tmp/d    # anywhere else

Steps: split ``load_digits`` (fixed seed, before augmentation); train densemap's
``lenet5`` architecture (unpadded, window 28x28, stride 4, 11 classes) on freshly
synthesised windows every epoch; save the weights (``classifier.pt``); convert with
densemap's converter to ``model.onnx`` plus à-trous variants at strides 2 and 1 and
check it with ``densemap.convert.verify`` against the trained classifier (crop by crop); write
``labels.txt`` and the sample pages; measure the shipped ONNX through the engine
(:mod:`models.digits.evaluate`) and write ``MODEL_CARD.md`` from those numbers.

Needs the ``train`` extra (torch, scikit-learn); serving needs neither.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from densemap.convert import archs, convert_torch, verify
from densemap.service.contract import Preprocessing
from models.digits.data import LABELS, NUM_CLASSES, STRIDE, WINDOW, Split, load_split
from models.digits.windows import sample_windows

HERE = Path(__file__).resolve().parent
WEIGHTS_FILE = "classifier.pt"
MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
ATROUS_STRIDES = (2, 1)
ARCH = "lenet5"
SOURCE = "models/digits: densemap lenet5 trained on scikit-learn load_digits (+ background)"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (with the data split's fixed seed)."""

    seed: int = 0
    epochs: int = 10
    windows_per_epoch: int = 24_000
    batch_size: int = 64
    learning_rate: float = 3e-3  # peak of the one-cycle schedule (AdamW)
    weight_decay: float = 1e-4
    threads: int = 1  # 1 is faster than 2 on shared, oversubscribed cores
    train_glyphs: int | None = None  # use only the first N training glyphs (smoke runs)


def build_classifier() -> nn.Module:
    """Fresh densemap ``lenet5`` for 28x28 grey windows and 11 classes."""
    return archs.build(ARCH, num_classes=NUM_CLASSES, input_size=WINDOW, in_channels=1)


def measure_preprocessing(split: Split, *, seed: int) -> Preprocessing:
    """Grey ``L`` input, scale 1/255, mean/std of the training windows (3 decimals)."""
    images, _ = sample_windows(
        split.train_glyphs, split.train_labels, count=4096, rng=np.random.default_rng(seed)
    )
    values = images.astype(np.float64) / 255.0
    return Preprocessing(
        layout="NCHW",
        color="L",
        scale=1.0 / 255.0,
        mean=(round(float(values.mean()), 3),),
        std=(round(float(values.std()), 3),),
    )


def to_tensor(images_uint8: np.ndarray, preprocessing: Preprocessing) -> torch.Tensor:
    """uint8 [N, H, W] -> float32 [N, 1, H, W] exactly as the engine preprocesses pixels."""
    scaled = torch.from_numpy(images_uint8).float().unsqueeze(1) * np.float32(preprocessing.scale)
    return (scaled - np.float32(preprocessing.mean[0])) / np.float32(preprocessing.std[0])


def train_classifier(
    split: Split, *, config: TrainConfig, log=print
) -> tuple[nn.Module, Preprocessing]:
    """Train a fresh classifier; returns it in eval mode with its preprocessing."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    glyphs, labels = split.train_glyphs, split.train_labels
    if config.train_glyphs is not None:
        glyphs, labels = glyphs[: config.train_glyphs], labels[: config.train_glyphs]
    preprocessing = measure_preprocessing(split, seed=config.seed + 1)
    model = build_classifier()
    steps_per_epoch = config.windows_per_epoch // config.batch_size
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.epochs * steps_per_epoch
    )
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.epochs):
        started = time.perf_counter()
        images, targets = sample_windows(glyphs, labels, count=config.windows_per_epoch, rng=rng)
        inputs, targets_t = to_tensor(images, preprocessing), torch.from_numpy(targets)
        order = torch.randperm(len(targets_t), generator=generator)
        model.train()
        total_loss, correct = 0.0, 0
        for step in range(steps_per_epoch):
            batch = order[step * config.batch_size : (step + 1) * config.batch_size]
            logits = model(inputs[batch])
            loss = nn.functional.cross_entropy(logits, targets_t[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
            correct += int((logits.argmax(1) == targets_t[batch]).sum())
        seen = steps_per_epoch * config.batch_size
        log(
            f"epoch {epoch + 1}/{config.epochs}: loss {total_loss / seen:.4f}, "
            f"train accuracy {correct / seen:.2%} ({time.perf_counter() - started:.1f} s)"
        )
    return model.eval(), preprocessing


def save_weights(model: nn.Module, path: Path) -> None:
    """The state_dict, written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)


def load_classifier(path: Path) -> nn.Module:
    """The trained classifier from ``classifier.pt`` (eval mode)."""
    model = build_classifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def export_model(
    model: nn.Module, preprocessing: Preprocessing, out_dir: Path, *, strides=ATROUS_STRIDES
):
    """Convert with densemap's converter; writes model.onnx (+ variants) and labels.txt."""
    result = convert_torch(
        model,
        out_dir / MODEL_FILE,
        input_size=WINDOW,
        in_channels=1,
        labels=LABELS,
        preprocessing=preprocessing,
        strides=strides,
        source=SOURCE,
    )
    labels = out_dir / LABELS_FILE
    tmp = labels.with_name(labels.name + ".tmp")
    tmp.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    os.replace(tmp, labels)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.digits.train", description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=HERE, help="output folder (default: %(default)s)"
    )
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--windows", type=int, default=TrainConfig.windows_per_epoch)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    parser.add_argument(
        "--skip-evaluation", action="store_true", help="no sample pages, evaluation or card"
    )
    args = parser.parse_args(argv)
    config = TrainConfig(
        seed=args.seed, epochs=args.epochs, windows_per_epoch=args.windows, threads=args.threads
    )
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    split = load_split()
    print(f"data: {len(split.train_glyphs)} training and {len(split.test_glyphs)} held-out digits")
    model, preprocessing = train_classifier(split, config=config)
    minutes = (time.perf_counter() - started) / 60
    save_weights(model, args.out / WEIGHTS_FILE)
    result = export_model(model, preprocessing, args.out)
    print(f"wrote {result.path} and {len(result.variant_paths)} à-trous variant(s)")
    check = verify(model, result.path)
    print(check.table())
    if not check.passed:
        return 1
    if args.skip_evaluation:
        return 0
    from models.digits.card import write_model_card
    from models.digits.evaluate import evaluate, print_report
    from models.digits.pages import sample_pages, write_pages

    pages = write_pages(sample_pages(split.test_glyphs, split.test_labels), args.out / "pages")
    print(f"wrote {len(pages)} sample pages under {args.out / 'pages'}")
    report = evaluate(args.out / MODEL_FILE)
    print_report(report)
    card = write_model_card(report, config=config, preprocessing=preprocessing,
                            minutes=minutes, out_dir=args.out)  # fmt: skip
    print(f"wrote {card}; stride {STRIDE}, window {WINDOW}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
