"""Packaging that pyproject.toml cannot express: one import name over the repository's folders.

The wheel installs one top-level package, ``densemap``, and nothing else. The repository keeps
its layout (``service/``, ``convert/``, ``models/`` at the top, as the developers' guide draws
it); ``package_dir`` maps them under that name:

    densemap/   -> densemap                          (public API, ``python -m densemap``)
    service/    -> densemap.service[.*]
    convert/    -> densemap.convert[.*]
    models/     -> densemap.service.bundled_models   (the ``digits`` model's served files only)

``models/`` (the checkout's default repository) also holds the recipes that made its models
(torch, scikit-learn); only the served files ship, so a wheel install scores and serves
``digits`` without torch. ``pip install -e .`` maps the same names onto the checkout.
"""

import warnings

from setuptools import find_packages, setup

BUNDLED = "densemap.service.bundled_models"
# digits/ holds data only (its recipes stay out of the wheel): not a package, on purpose.
warnings.filterwarnings(
    "ignore", message=r"Package 'densemap\.service\.bundled_models\.digits' is absent"
)


def mapped(folder: str) -> list[str]:
    """``folder``'s packages, named under ``densemap``."""
    return [f"densemap.{name}" for name in find_packages(include=[folder, f"{folder}.*"])]


setup(
    packages=["densemap", *mapped("service"), *mapped("convert"), BUNDLED],
    package_dir={
        "densemap": "densemap",
        "densemap.service": "service",
        "densemap.convert": "convert",
        BUNDLED: "models",
    },
    package_data={
        "densemap": ["py.typed"],
        BUNDLED: [
            "digits/model*.onnx",
            "digits/labels.txt",
            "digits/densemap.json",
            "digits/MODEL_CARD.md",
        ],
    },
)
