"""Domain errors of densemap, shared by the engine, the server, the CLI and the converter.

The exception tree, drawn once::

    DensemapError                 base: every error densemap raises on purpose
    ├── InvalidImage              bytes that do not decode, wrong dtype/rank/shape, NaN/Inf
    │   └── ImageTooSmall         an image smaller than the window R (no cell at all)
    ├── ImageTooLarge             over the pixel limit, or a request over the memory budget
    ├── InvalidOption             an option out of range (stride, scale, top-k, class index...)
    ├── ModelNotFound             a model name that is not in the repository index
    ├── ModelLoadError            a model file that is missing, corrupt or breaks the contract
    ├── ConversionError           the converter cannot make an exact dense model (names the layer)
    ├── Cancelled                 the caller went away or its deadline passed
    └── RuntimeNotInstalled       no onnxruntime package installed, or two (also an ImportError)

Every message says what was wrong and what to do. The server maps these classes to
gRPC status codes in one table (``densemap.service.server.status``); nothing else decides codes.
"""

from __future__ import annotations


class DensemapError(Exception):
    """Base class for every error densemap raises on purpose."""


class InvalidImage(DensemapError):
    """The image cannot be used: undecodable, wrong layout/dtype, or non-finite values."""


class ImageTooSmall(InvalidImage):
    """The image is smaller than the model's window, so the map would have no cell."""


class ImageTooLarge(DensemapError):
    """The image exceeds the pixel limit, or the request the memory budget: its maps and
    copies, or a pass that does not fit beside them (untiled with tiling off, or even as a
    one-cell tile)."""


class InvalidOption(DensemapError):
    """A scoring option is invalid (unsupported stride, bad scale, class out of range...)."""


class ModelNotFound(DensemapError):
    """The requested model name is not in the repository."""


class ModelLoadError(DensemapError):
    """A model file is missing, unreadable, or its metadata breaks the contract."""


class ConversionError(DensemapError):
    """The converter cannot turn this classifier into an exact dense model."""


class Cancelled(DensemapError):
    """The work was stopped because the caller cancelled or its deadline passed."""


class RuntimeNotInstalled(DensemapError, ImportError):
    """No onnxruntime package is installed, or more than one (they break each other), or an
    incomplete one: the engine cannot run. The message names the pip command that fixes it."""
