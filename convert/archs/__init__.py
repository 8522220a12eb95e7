"""Reference classifier architectures, with torchvision's exact ``state_dict`` layout.

A small registry in the style of torchvision's ``models/_api.py``::

    from densemap.convert import archs
    archs.list_archs()                       # ['alexnet', 'lenet5', 'resnet18', ...]
    model = archs.build("vgg16", num_classes=1000)
    spec = archs.get_spec("vgg16")           # spec.input_size, spec.preprocessing

The modules have torchvision's attribute names and shapes (``features.N.*``,
``classifier.N.*``, ``conv1``, ``layer1.0.bn1``, ``fc``), so torchvision's published ``.pth``
files load into them without torchvision (see :func:`densemap.convert.from_torch.weights.load_weights`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from densemap.service.contract import Preprocessing
from densemap.service.errors import ConversionError

IMAGENET = Preprocessing(
    layout="NCHW",
    color="RGB",
    scale=1.0 / 255.0,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)
GREY_0_1 = Preprocessing(layout="NCHW", color="L", scale=1.0 / 255.0, mean=(0.0,), std=(1.0,))


@dataclass(frozen=True)
class ArchSpec:
    """A registered architecture: how to build it and what its inputs look like.

    ``sized_head``: the first Linear's size depends on the input size (no adaptive pool in
    front of it), so :func:`build` passes ``input_size`` to the builder.
    """

    name: str
    builder: Callable[..., nn.Module]
    input_size: tuple[int, int]
    preprocessing: Preprocessing
    num_classes: int = 1000
    sized_head: bool = False
    description: str = ""

    @property
    def in_channels(self) -> int:
        return self.preprocessing.channels


_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    """Add ``spec`` to the registry; names are unique."""
    if spec.name in _REGISTRY:
        raise ValueError(f"architecture {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_archs() -> list[str]:
    """The registered architecture names, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ArchSpec:
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise ConversionError(
            f"unknown architecture {name!r}: choose one of {', '.join(list_archs())}"
        ) from None


def build(
    name: str,
    *,
    num_classes: int | None = None,
    input_size: tuple[int, int] | int | None = None,
    **kwargs,
) -> nn.Module:
    """Build architecture ``name`` with fresh weights.

    ``num_classes`` defaults to the architecture's (1000 for ImageNet nets, 10 for LeNet-5).
    ``input_size`` matters only for architectures whose head size depends on it
    (``spec.sized_head``, e.g. LeNet-5); it is ignored for the others, whose adaptive pool
    fixes the head's input. Extra keyword arguments go to the builder.
    """
    spec = get_spec(name)
    classes = spec.num_classes if num_classes is None else num_classes
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
        raise ConversionError(f"num_classes must be a positive integer, got {num_classes!r}")
    if spec.sized_head and input_size is not None:
        kwargs["input_size"] = input_size
    try:
        return spec.builder(num_classes=classes, **kwargs)
    except TypeError as exc:
        raise ConversionError(f"cannot build {name!r} with {kwargs}: {exc}") from None


def _register_all() -> None:
    from densemap.convert.archs import alexnet_vgg, lenet, resnet

    register(
        ArchSpec(
            "lenet5", lenet.lenet5, (32, 32), GREY_0_1, num_classes=10, sized_head=True,
            description="LeNet-5: 6@5x5, pool, 16@5x5, pool, 120, 84, classes (unpadded)",
        )
    )  # fmt: skip
    register(ArchSpec("alexnet", alexnet_vgg.alexnet, (224, 224), IMAGENET, description="AlexNet (torchvision)"))  # fmt: skip
    for name in sorted(alexnet_vgg.VGG_CONFIGS):
        for batch_norm in (False, True):
            arch = name + ("_bn" if batch_norm else "")
            builder = alexnet_vgg.vgg_builder(name, batch_norm=batch_norm)
            register(ArchSpec(arch, builder, (224, 224), IMAGENET, description=f"{arch} (torchvision)"))  # fmt: skip
    for name, builder in resnet.BUILDERS.items():
        register(ArchSpec(name, builder, (224, 224), IMAGENET, description=f"{name} (torchvision)"))  # fmt: skip


_register_all()
