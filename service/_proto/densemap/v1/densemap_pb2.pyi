from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    INT32: _ClassVar[DType]

class Output(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_UNSPECIFIED: _ClassVar[Output]
    PROBABILITIES: _ClassVar[Output]
    LOGITS: _ClassVar[Output]
DTYPE_UNSPECIFIED: DType
UINT8: DType
FLOAT32: DType
FLOAT16: DType
INT32: DType
OUTPUT_UNSPECIFIED: Output
PROBABILITIES: Output
LOGITS: Output

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "array")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    ARRAY_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    array: Tensor
    def __init__(self, encoded: _Optional[bytes] = ..., array: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ScoreOptions(_message.Message):
    __slots__ = ("output_stride", "scales", "output", "dtype", "top_k", "classes", "argmax", "omit_map", "image_top_k", "precision", "detections", "heads", "omit_heads")
    OUTPUT_STRIDE_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    ARGMAX_FIELD_NUMBER: _ClassVar[int]
    OMIT_MAP_FIELD_NUMBER: _ClassVar[int]
    IMAGE_TOP_K_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    OMIT_HEADS_FIELD_NUMBER: _ClassVar[int]
    output_stride: int
    scales: _containers.RepeatedScalarFieldContainer[float]
    output: Output
    dtype: DType
    top_k: int
    classes: _containers.RepeatedScalarFieldContainer[int]
    argmax: bool
    omit_map: bool
    image_top_k: int
    precision: str
    detections: DetectionOptions
    heads: _containers.RepeatedScalarFieldContainer[str]
    omit_heads: bool
    def __init__(self, output_stride: _Optional[int] = ..., scales: _Optional[_Iterable[float]] = ..., output: _Optional[_Union[Output, str]] = ..., dtype: _Optional[_Union[DType, str]] = ..., top_k: _Optional[int] = ..., classes: _Optional[_Iterable[int]] = ..., argmax: _Optional[bool] = ..., omit_map: _Optional[bool] = ..., image_top_k: _Optional[int] = ..., precision: _Optional[str] = ..., detections: _Optional[_Union[DetectionOptions, _Mapping]] = ..., heads: _Optional[_Iterable[str]] = ..., omit_heads: _Optional[bool] = ...) -> None: ...

class DetectionOptions(_message.Message):
    __slots__ = ("classes", "threshold", "iou", "max_count", "across_classes", "box_offsets")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    IOU_FIELD_NUMBER: _ClassVar[int]
    MAX_COUNT_FIELD_NUMBER: _ClassVar[int]
    ACROSS_CLASSES_FIELD_NUMBER: _ClassVar[int]
    BOX_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedScalarFieldContainer[int]
    threshold: float
    iou: float
    max_count: int
    across_classes: bool
    box_offsets: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, classes: _Optional[_Iterable[int]] = ..., threshold: _Optional[float] = ..., iou: _Optional[float] = ..., max_count: _Optional[int] = ..., across_classes: _Optional[bool] = ..., box_offsets: _Optional[_Iterable[float]] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    x0: float
    y0: float
    x1: float
    y1: float
    def __init__(self, x0: _Optional[float] = ..., y0: _Optional[float] = ..., x1: _Optional[float] = ..., y1: _Optional[float] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("class_index", "label", "score", "box", "scale", "scale_index", "cell")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SCALE_INDEX_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    label: str
    score: float
    box: Box
    scale: float
    scale_index: int
    cell: Pair
    def __init__(self, class_index: _Optional[int] = ..., label: _Optional[str] = ..., score: _Optional[float] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., scale: _Optional[float] = ..., scale_index: _Optional[int] = ..., cell: _Optional[_Union[Pair, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("model", "image", "options", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: Image
    options: ScoreOptions
    request_id: str
    def __init__(self, model: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., options: _Optional[_Union[ScoreOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class Pair(_message.Message):
    __slots__ = ("h", "w")
    H_FIELD_NUMBER: _ClassVar[int]
    W_FIELD_NUMBER: _ClassVar[int]
    h: int
    w: int
    def __init__(self, h: _Optional[int] = ..., w: _Optional[int] = ...) -> None: ...

class MapGeometry(_message.Message):
    __slots__ = ("stride", "window", "origin", "receptive_field", "receptive_field_offset", "scale", "resize_h", "resize_w")
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    RECEPTIVE_FIELD_FIELD_NUMBER: _ClassVar[int]
    RECEPTIVE_FIELD_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    RESIZE_H_FIELD_NUMBER: _ClassVar[int]
    RESIZE_W_FIELD_NUMBER: _ClassVar[int]
    stride: Pair
    window: Pair
    origin: Pair
    receptive_field: Pair
    receptive_field_offset: Pair
    scale: float
    resize_h: float
    resize_w: float
    def __init__(self, stride: _Optional[_Union[Pair, _Mapping]] = ..., window: _Optional[_Union[Pair, _Mapping]] = ..., origin: _Optional[_Union[Pair, _Mapping]] = ..., receptive_field: _Optional[_Union[Pair, _Mapping]] = ..., receptive_field_offset: _Optional[_Union[Pair, _Mapping]] = ..., scale: _Optional[float] = ..., resize_h: _Optional[float] = ..., resize_w: _Optional[float] = ...) -> None: ...

class ScaleMap(_message.Message):
    __slots__ = ("geometry", "scores", "classes", "top_k_indices", "top_k_scores", "argmax", "cells", "heads")
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_INDICES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_SCORES_FIELD_NUMBER: _ClassVar[int]
    ARGMAX_FIELD_NUMBER: _ClassVar[int]
    CELLS_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    geometry: MapGeometry
    scores: Tensor
    classes: _containers.RepeatedScalarFieldContainer[int]
    top_k_indices: Tensor
    top_k_scores: Tensor
    argmax: Tensor
    cells: Pair
    heads: _containers.RepeatedCompositeFieldContainer[HeadMap]
    def __init__(self, geometry: _Optional[_Union[MapGeometry, _Mapping]] = ..., scores: _Optional[_Union[Tensor, _Mapping]] = ..., classes: _Optional[_Iterable[int]] = ..., top_k_indices: _Optional[_Union[Tensor, _Mapping]] = ..., top_k_scores: _Optional[_Union[Tensor, _Mapping]] = ..., argmax: _Optional[_Union[Tensor, _Mapping]] = ..., cells: _Optional[_Union[Pair, _Mapping]] = ..., heads: _Optional[_Iterable[_Union[HeadMap, _Mapping]]] = ...) -> None: ...

class HeadMap(_message.Message):
    __slots__ = ("name", "kind", "labels", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    values: Tensor
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Head(_message.Message):
    __slots__ = ("name", "kind", "labels", "channels")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    channels: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., channels: _Optional[int] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("index", "label", "score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    score: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("decode_ms", "queue_ms", "infer_ms", "encode_ms", "total_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFER_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    queue_ms: float
    infer_ms: float
    encode_ms: float
    total_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., infer_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "code_name", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    CODE_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    code_name: str
    message: str
    def __init__(self, code: _Optional[int] = ..., code_name: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("model", "request_id", "maps", "image_scores", "image_top_k", "image_size", "timing", "error", "detections")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SCORES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_TOP_K_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    request_id: str
    maps: _containers.RepeatedCompositeFieldContainer[ScaleMap]
    image_scores: _containers.RepeatedScalarFieldContainer[float]
    image_top_k: _containers.RepeatedCompositeFieldContainer[ClassScore]
    image_size: Pair
    timing: Timing
    error: Error
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    def __init__(self, model: _Optional[str] = ..., request_id: _Optional[str] = ..., maps: _Optional[_Iterable[_Union[ScaleMap, _Mapping]]] = ..., image_scores: _Optional[_Iterable[float]] = ..., image_top_k: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., image_size: _Optional[_Union[Pair, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelLoadFailure(_message.Message):
    __slots__ = ("name", "message")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    message: str
    def __init__(self, name: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "failures")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    failures: _containers.RepeatedCompositeFieldContainer[ModelLoadFailure]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., failures: _Optional[_Iterable[_Union[ModelLoadFailure, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Preprocessing(_message.Message):
    __slots__ = ("layout", "color", "scale", "mean", "std", "channels")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    COLOR_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    layout: str
    color: str
    scale: float
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    channels: int
    def __init__(self, layout: _Optional[str] = ..., color: _Optional[str] = ..., scale: _Optional[float] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., channels: _Optional[int] = ...) -> None: ...

class ModelGeometry(_message.Message):
    __slots__ = ("window", "stride", "origin", "receptive_field", "receptive_field_offset", "effective_window", "padded")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    RECEPTIVE_FIELD_FIELD_NUMBER: _ClassVar[int]
    RECEPTIVE_FIELD_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_WINDOW_FIELD_NUMBER: _ClassVar[int]
    PADDED_FIELD_NUMBER: _ClassVar[int]
    window: Pair
    stride: Pair
    origin: Pair
    receptive_field: Pair
    receptive_field_offset: Pair
    effective_window: Pair
    padded: bool
    def __init__(self, window: _Optional[_Union[Pair, _Mapping]] = ..., stride: _Optional[_Union[Pair, _Mapping]] = ..., origin: _Optional[_Union[Pair, _Mapping]] = ..., receptive_field: _Optional[_Union[Pair, _Mapping]] = ..., receptive_field_offset: _Optional[_Union[Pair, _Mapping]] = ..., effective_window: _Optional[_Union[Pair, _Mapping]] = ..., padded: _Optional[bool] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "num_classes", "labels", "geometry", "supported_strides", "preprocessing", "output_kind", "providers", "source", "contract_version", "default_precision", "precisions", "precision_report", "heads")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_STRIDES_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CONTRACT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PRECISION_FIELD_NUMBER: _ClassVar[int]
    PRECISIONS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_REPORT_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_classes: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    geometry: ModelGeometry
    supported_strides: _containers.RepeatedScalarFieldContainer[int]
    preprocessing: Preprocessing
    output_kind: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    source: str
    contract_version: int
    default_precision: str
    precisions: _containers.RepeatedScalarFieldContainer[str]
    precision_report: _containers.RepeatedCompositeFieldContainer[PrecisionReport]
    heads: _containers.RepeatedCompositeFieldContainer[Head]
    def __init__(self, name: _Optional[str] = ..., num_classes: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., geometry: _Optional[_Union[ModelGeometry, _Mapping]] = ..., supported_strides: _Optional[_Iterable[int]] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ..., output_kind: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., source: _Optional[str] = ..., contract_version: _Optional[int] = ..., default_precision: _Optional[str] = ..., precisions: _Optional[_Iterable[str]] = ..., precision_report: _Optional[_Iterable[_Union[PrecisionReport, _Mapping]]] = ..., heads: _Optional[_Iterable[_Union[Head, _Mapping]]] = ...) -> None: ...

class PrecisionReport(_message.Message):
    __slots__ = ("precision", "max_probability_deviation", "max_logit_deviation", "argmax_agreement", "cells", "image")
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    MAX_PROBABILITY_DEVIATION_FIELD_NUMBER: _ClassVar[int]
    MAX_LOGIT_DEVIATION_FIELD_NUMBER: _ClassVar[int]
    ARGMAX_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    CELLS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    precision: str
    max_probability_deviation: float
    max_logit_deviation: float
    argmax_agreement: float
    cells: int
    image: str
    def __init__(self, precision: _Optional[str] = ..., max_probability_deviation: _Optional[float] = ..., max_logit_deviation: _Optional[float] = ..., argmax_agreement: _Optional[float] = ..., cells: _Optional[int] = ..., image: _Optional[str] = ...) -> None: ...
