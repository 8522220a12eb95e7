"""The metadata contract: round trips, validation, version refusal."""

import json

import pytest

from densemap.service.contract import (
    CONTRACT_VERSION,
    METADATA_KEY,
    Geometry,
    Head,
    ModelMetadata,
    Preprocessing,
    Variant,
)
from densemap.service.errors import ModelLoadError


def make_metadata() -> ModelMetadata:
    return ModelMetadata(
        geometry=Geometry(
            window=(20, 28),
            stride=(4, 8),
            receptive_field=(36, 44),
            receptive_field_offset=(-8, -8),
        ),
        preprocessing=Preprocessing(color="L", scale=1 / 255, mean=(0.5,), std=(0.25,)),
        labels=("a", "b"),
        output_kind="probabilities",
        variants=(Variant(stride=(2, 4), file="model.s2.onnx"),),
        source="unit-test",
        converter_version="0.1.0",
    )


def test_round_trip_through_props():
    meta = make_metadata()
    props = meta.to_props()
    assert list(props) == [METADATA_KEY]
    back = ModelMetadata.from_props(props)
    assert back == meta
    assert back.geometry.effective_window == (20, 28)  # defaults to the window
    assert back.supported_strides == ((4, 8), (2, 4))


def test_cells_and_boxes_follow_the_formula():
    geo = Geometry(window=(20, 28), stride=(4, 8), receptive_field=(20, 28))
    # n = (W - R) // S + 1 per axis; trailing pixels are covered by no window.
    assert geo.cells(20 + 3 * 4 + 3, 28 + 5 * 8 + 7) == (4, 6)
    assert geo.cells(19, 28) == (0, 1)
    assert geo.window_at(2, 3) == (8, 24, 28, 52)


def test_square_ints_become_pairs():
    geo = Geometry(window=224, stride=32, receptive_field=404, receptive_field_offset=-90)
    assert geo.window == (224, 224) and geo.receptive_field_offset == (-90, -90)


def test_newer_version_is_refused_with_upgrade_hint():
    doc = json.loads(make_metadata().to_json())
    doc["version"] = CONTRACT_VERSION + 1
    with pytest.raises(ModelLoadError, match="upgrade densemap"):
        ModelMetadata.from_json(json.dumps(doc))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("geometry"), "malformed"),
        (lambda d: d["geometry"].update(stride=0), ">= 1"),
        (lambda d: d["geometry"].update(window="big"), "window"),
        (lambda d: d["preprocessing"].update(std=[0.0]), "non-zero"),
        (lambda d: d["preprocessing"].update(mean=[0.1, 0.2]), "need 1 values"),
        (lambda d: d["preprocessing"].update(color="CMYK"), "color"),
        (lambda d: d["heads"][0].update(kind="log"), "kind must be one of"),
        (lambda d: d["heads"][0].update(kind="regression"), "primary head must classify"),
        (lambda d: d["heads"].append(dict(d["heads"][0])), "unique"),
        (lambda d: d.update(heads=[]), "no heads"),
        (lambda d: d.pop("heads"), "malformed"),
        (lambda d: d["heads"][0].update(name=""), "non-empty output name"),
        (lambda d: d["variants"][0].update(file="../evil.onnx"), "bare file name"),
        (lambda d: d.pop("version"), "version"),
    ],
)
def test_malformed_metadata_is_a_clear_load_error(mutate, message):
    doc = json.loads(make_metadata().to_json())
    mutate(doc)
    with pytest.raises(ModelLoadError, match=message):
        ModelMetadata.from_json(json.dumps(doc))


def test_missing_key_says_to_convert_first():
    with pytest.raises(ModelLoadError, match="densemap convert"):
        ModelMetadata.from_props({"other": "x"})
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        ModelMetadata.from_props({METADATA_KEY: "{nope"})


def test_several_heads_round_trip_primary_first():
    boxes = Head("boxes", "regression", ("dy0", "dx0", "dy1", "dx1"))
    meta = ModelMetadata(
        **{**make_metadata().__dict__, "output_name": "classes", "extra_heads": (boxes,)}
    )
    doc = json.loads(meta.to_json())
    assert doc["version"] == CONTRACT_VERSION == 2
    assert [h["name"] for h in doc["heads"]] == ["classes", "boxes"]
    assert "output_kind" not in doc and "labels" not in doc  # said once, under heads
    back = ModelMetadata.from_json(meta.to_json())
    assert back == meta
    assert back.heads == (Head("classes", "probabilities", ("a", "b")), meta.extra_heads[0])
    assert back.head("boxes").kind == "regression" and not back.head("boxes").classifies
    with pytest.raises(ModelLoadError, match=r"no head 'x'.*\['classes', 'boxes'\]"):
        back.head("x")


def test_version_1_documents_still_read():
    doc = {
        "version": 1,
        "geometry": {"window": 28, "stride": 4, "receptive_field": 28},
        "labels": ["zero", "one"],
        "output_kind": "sigmoid",
        "output_name": "probs",
    }
    meta = ModelMetadata.from_json(json.dumps(doc))
    assert meta.version == 1
    assert meta.heads == (Head("probs", "sigmoid", ("zero", "one")),)
    assert meta.extra_heads == ()


def test_random_weights_is_written_read_back_and_defaults_to_false():
    meta = ModelMetadata(**{**make_metadata().__dict__, "random_weights": True})
    doc = json.loads(meta.to_json())
    assert doc["random_weights"] is True and doc["version"] == 2
    assert ModelMetadata.from_json(meta.to_json()).random_weights is True
    assert json.loads(make_metadata().to_json())["random_weights"] is False
    del doc["random_weights"]  # a version-2 file from an older converter
    assert ModelMetadata.from_json(json.dumps(doc)).random_weights is False
    doc["random_weights"] = "yes"
    with pytest.raises(ModelLoadError, match="'random_weights' must be true or false, got 'yes'"):
        ModelMetadata.from_json(json.dumps(doc))
