"""Options and configs check themselves once (issue 23, point 3): ScoreOptions,
DetectionOptions, EngineConfig and the batch request refuse bad values when they are built,
in the same words whichever front end built them; the engine checks only what needs the
model; tf32 is one precision; old spellings of renamed flags still work, with a note."""

from __future__ import annotations

import numpy as np
import pytest

from densemap.service._proto.densemap.v1 import densemap_pb2 as pb
from densemap.service.batch.run import BatchRequest, RayConfig
from densemap.service.batch.storage import Storage
from densemap.service.cli import build_parser
from densemap.service.engine.field_checks import MAX_SCALES
from densemap.service.engine.options import (
    DetectionDefaults,
    DetectionOptions,
    EngineConfig,
    ScoreOptions,
)
from densemap.service.errors import InvalidOption
from densemap.service.serve_cli import build_config
from densemap.service.server.codec import options_from_proto
from densemap.service.server.kserve_parameters import options_from_parameters
from densemap.service.server.kserve_proto import InferParameter


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"scales": ()}, "between 1 and 16 scales"),
        ({"scales": (1.0,) * (MAX_SCALES + 1)}, "between 1 and 16 scales"),
        ({"scales": (1.0, float("nan"))}, "finite and > 0"),
        ({"scales": (0.0,)}, "finite and > 0"),
        ({"scales": "1,2"}, "sequence of numbers"),
        ({"scales": (True,)}, "sequence of numbers"),
        ({"output_stride": 0}, "output_stride must be >= 1"),
        ({"output_stride": 2.0}, "output_stride must be an int"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"image_top_k": True}, "image_top_k must be an int"),
        ({"classes": ()}, "classes is empty"),
        ({"classes": (1, 1)}, "classes holds duplicates"),
        ({"classes": (-1,)}, "classes entries must be >= 0"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"probabilities": 1}, "probabilities must be True or False"),
        ({"precision": "bf16"}, "no bfloat16 convolution kernel"),
        ({"precision": "fp64"}, "precision must be one of"),
        ({"heads": "boxes"}, "heads must be a sequence of head names"),
        ({"heads": ("boxes", "boxes")}, "heads holds duplicates"),
        ({"detections": True}, "detections must be a DetectionOptions"),
    ],
)
def test_score_options_refuse_bad_values_when_built(fields, words):
    with pytest.raises(InvalidOption, match=words):
        ScoreOptions(**fields)


def test_score_options_store_canonical_values():
    options = ScoreOptions(
        output_stride=np.int64(4),
        scales=[1, np.float32(1.5)],
        dtype="fp16",
        precision="float16",
        classes=[np.int32(3), 1],
        heads=["boxes"],
        argmax=np.bool_(True),
    )
    assert options.output_stride == 4 and type(options.output_stride) is int
    assert options.scales == (1.0, 1.5) and all(type(s) is float for s in options.scales)
    assert (options.dtype, options.precision) == ("float16", "fp16")
    assert options.classes == (3, 1) and options.heads == ("boxes",)
    assert options.argmax is True


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"threshold": 1.5}, r"detections.threshold must be in \[0, 1\]"),
        ({"iou": float("nan")}, r"detections.iou must be in \[0, 1\]"),
        ({"max_count": 0}, "detections.max_count must be in 1..10000"),
        ({"classes": (2, 2)}, "detections.classes holds duplicates"),
        ({"across_classes": "yes"}, "detections.across_classes must be True or False"),
        ({"box_offsets": (0, 0, 0)}, "detections.box_offsets must be 4 numbers"),
        ({"box_offsets": (0.6, 0, -0.6, 0)}, "box of positive size"),
        ({"box_offsets": (11, 0, 12, 0)}, r"detections.box_offsets must be in \[-10, 10\]"),
    ],
)
def test_detection_options_refuse_bad_values_when_built(fields, words):
    with pytest.raises(InvalidOption, match=words):
        DetectionOptions(**fields)


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"device": "tpu"}, "EngineConfig.device must be one of"),
        ({"max_pixels": 0}, "EngineConfig.max_pixels must be >= 1"),
        ({"memory_budget": 0}, "EngineConfig.memory_budget must be >= 1"),
        ({"intra_op_threads": -1}, "EngineConfig.intra_op_threads must be >= 0"),
        ({"precision": "bf16"}, "no bfloat16"),
        ({"report_precisions": "fp16"}, "report_precisions must be a sequence"),
        ({"warmup_shapes": ((0, 9),)}, "EngineConfig.warmup_shapes must be >= 1"),
        ({"warmup_shapes": ((8, 8),) * 17}, "at most 16"),
        ({"cuda_conv_search": "FAST"}, "EngineConfig.cuda_conv_search must be one of"),
        ({"box_offsets": (0, 0, -2, 0)}, "box of positive size"),
        ({"fc_head_unfold": "gpu"}, "EngineConfig.fc_head_unfold must be one of"),
        ({"runtime": "tvm"}, "EngineConfig.runtime must be one of"),
        ({"tiling": "no"}, "EngineConfig.tiling must be True or False"),
        ({"detections": {"iou": 0.3}}, "EngineConfig.detections must be a DetectionDefaults"),
    ],
)
def test_engine_config_refuses_bad_values_when_built(fields, words):
    with pytest.raises(InvalidOption, match=words):
        EngineConfig(**fields)


def test_detection_options_leave_unset_fields_to_the_model_and_check_given_ones():
    """None (the default) means the model's setting (DetectionDefaults); a given value is
    checked and stored canonically, as the model's own settings are."""
    unset = DetectionOptions()
    assert (unset.threshold, unset.iou, unset.max_count, unset.across_classes) == (None,) * 4
    given = DetectionOptions(iou=np.float32(0.25), max_count=np.int64(7), across_classes=False)
    assert (given.iou, given.max_count, given.across_classes) == (0.25, 7, False)
    assert type(given.max_count) is int and type(given.iou) is float and given.threshold is None
    model = DetectionDefaults(threshold=1, max_count=np.int32(3))
    assert (model.threshold, model.max_count) == (1.0, 3) and type(model.max_count) is int
    with pytest.raises(InvalidOption, match=r"detections.iou must be in \[0, 1\], got 1.5"):
        DetectionDefaults(iou=1.5)
    with pytest.raises(InvalidOption, match="detections.across_classes must be given, got None"):
        DetectionDefaults(across_classes=None)


def test_engine_config_has_no_tf32_switch_besides_its_precision():
    assert EngineConfig(precision="tf32").precision == "tf32"
    assert EngineConfig(precision="float32").precision == "fp32"
    with pytest.raises(TypeError):
        EngineConfig(tf32=True)


def test_every_front_end_gets_the_same_words_for_the_same_bad_scale():
    """densemap.v1, KServe and Python refuse a zero scale with ScoreOptions' message."""
    with pytest.raises(InvalidOption) as python:
        ScoreOptions(scales=(1.0, 0.0))
    with pytest.raises(InvalidOption) as densemap_v1:
        options_from_proto(pb.ScoreOptions(scales=[1.0, 0.0]))
    parameters = {"scales": InferParameter(string_param="1,0")}
    with pytest.raises(InvalidOption) as kserve:
        options_from_parameters(parameters)
    assert str(python.value) == str(densemap_v1.value) == str(kserve.value)
    with pytest.raises(InvalidOption, match="top_k must be >= 0"):
        options_from_parameters({"top_k": InferParameter(int64_param=-1)})


def _batch(**fields) -> BatchRequest:
    return BatchRequest(paths=("x",), out_dir="out", **fields)


def test_the_batch_request_refuses_contradictions_before_loading_a_model():
    with pytest.raises(InvalidOption, match="--dtype fp16 and --map-dtype fp32 contradict"):
        _batch(options=ScoreOptions(dtype="float16"), storage=Storage(map_dtype="fp32"))
    _batch(options=ScoreOptions(dtype="float16"))  # stored as float16 either way
    with pytest.raises(InvalidOption, match="add --top-k K"):
        _batch(storage=Storage(save="top-k"))
    with pytest.raises(InvalidOption, match="--workers must be >= 1"):
        _batch(workers=0)
    with pytest.raises(InvalidOption, match="--save 'all'"):
        Storage(save="all")
    with pytest.raises(InvalidOption, match="Ray actors"):
        RayConfig(actors=0)


def test_score_cli_passes_values_through_for_the_options_to_check(tmp_path):
    from densemap.service.score_cli import build_request

    def request(*flags):
        args = build_parser().parse_args(["score", str(tmp_path), "--out", "o", *flags])
        return build_request(args)

    with pytest.raises(InvalidOption, match=r"detections.threshold must be in \[0, 1\]"):
        request("--detections", "--threshold", "2")
    with pytest.raises(InvalidOption, match="top_k must be >= 0"):
        request("--top-k", "-1")
    with pytest.raises(InvalidOption, match="--workers must be >= 1"):
        request("--workers", "0")  # 0 was silently the default before
    with pytest.raises(InvalidOption, match="EngineConfig.max_pixels must be >= 1"):
        request("--max-pixels", "0")


def test_serve_takes_the_old_spellings_with_a_note(monkeypatch, capsys):
    for name in (
        "WORKERS",
        "SCORING_THREADS",
        "TF32",
        "PRECISION",
        "HEAD_UNFOLD",
        "FC_HEAD_UNFOLD",
    ):
        monkeypatch.delenv(f"DENSEMAP_{name}", raising=False)
    args = build_parser().parse_args(
        ["serve", "--workers", "9", "--tf32", "--head-unfold", "never"]
    )
    config = build_config(args)
    assert config.scoring_threads == 9 and config.engine.precision == "tf32"
    assert config.engine.fc_head_unfold == "never"
    notes = capsys.readouterr().err
    assert "--workers is deprecated: use --scoring-threads" in notes
    assert "--tf32 is deprecated: use --precision tf32" in notes
    assert "--head-unfold is deprecated: use --fc-head-unfold" in notes
    monkeypatch.setenv("DENSEMAP_WORKERS", "7")
    monkeypatch.setenv("DENSEMAP_TF32", "1")
    monkeypatch.setenv("DENSEMAP_HEAD_UNFOLD", "always")
    config = build_config(build_parser().parse_args(["serve"]))
    assert config.scoring_threads == 7 and config.engine.precision == "tf32"
    assert config.engine.fc_head_unfold == "always"
    notes = capsys.readouterr().err
    assert "DENSEMAP_WORKERS is deprecated: use DENSEMAP_SCORING_THREADS" in notes
    assert "DENSEMAP_HEAD_UNFOLD is deprecated: use DENSEMAP_FC_HEAD_UNFOLD" in notes
    monkeypatch.setenv("DENSEMAP_TF32", "0")  # off: the default precision stands
    assert build_config(build_parser().parse_args(["serve"])).engine.precision == "fp32"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    usage = capsys.readouterr().out  # the old spellings work but are not advertised
    assert "--scoring-threads" in usage and "--fc-head-unfold" in usage
    assert not any(old in usage for old in ("--workers", "--tf32", "--head-unfold"))


def test_the_client_refuses_bad_options_before_sending():
    from densemap.service.client import DensemapClient, _score_options

    parsed = _score_options({"scales": [1, 1.5], "classes": [0, 2], "heads": ["boxes"]})
    assert (parsed.scales, parsed.classes, parsed.heads) == ((1.0, 1.5), (0, 2), ("boxes",))
    assert _score_options({"detections": True}).detections == DetectionOptions()
    image = np.zeros((8, 8, 3), np.uint8)
    with DensemapClient("127.0.0.1:1", timeout=5) as client:  # nothing listens there
        with pytest.raises(InvalidOption, match="give between 1 and 16 scales"):
            client.score(image, model="any", scales=[])
