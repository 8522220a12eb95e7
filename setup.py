"""Packaging that pyproject.toml cannot express: the bundled ``digits`` model inside the wheel.

``models/`` (the checkout's default repository) also holds the recipes that made its models
(torch, scikit-learn); only the served files ship, as ``service/bundled_models/``, so a wheel
install scores and serves ``digits`` without torch. Everything else is in pyproject.toml.
"""

import warnings

from setuptools import find_packages, setup

BUNDLED = "service.bundled_models"
# digits/ holds data only (its recipes stay out of the wheel): not a package, on purpose.
warnings.filterwarnings("ignore", message=r"Package 'service\.bundled_models\.digits' is absent")

setup(
    packages=[*find_packages(include=["service", "service.*", "convert", "convert.*"]), BUNDLED],
    package_dir={BUNDLED: "models"},
    package_data={
        "service": ["py.typed"],
        BUNDLED: [
            "digits/model*.onnx",
            "digits/labels.txt",
            "digits/densemap.json",
            "digits/MODEL_CARD.md",
        ],
    },
)
