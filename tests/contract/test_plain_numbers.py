"""Options that arrive as text accept plain ASCII decimals only (no "1_0", no "١", no "nan")."""

from __future__ import annotations

import pytest
import tritonclient.grpc.service_pb2 as kserve_pb

from densemap.service.errors import InvalidOption
from densemap.service.plain_numbers import parse_decimal, parse_integer
from densemap.service.score_cli import parse_scales
from densemap.service.server.kserve_parameters import options_from_parameters


@pytest.mark.parametrize("text,value", [("1", 1.0), (" 1.5", 1.5), ("-.5", -0.5), ("2e-1", 0.2)])
def test_plain_decimals_are_read(text, value):
    assert parse_decimal(text) == value


@pytest.mark.parametrize("text", ["1_0", "١", "nan", "inf", "0x10", "1.5.2", "", "½", "1 0"])
def test_python_float_quirks_are_refused(text):
    with pytest.raises(ValueError):
        parse_decimal(text)


@pytest.mark.parametrize("text", ["1_0", "٣", "+", "1.0", "0b1"])
def test_integers_are_plain_digits(text):
    with pytest.raises(ValueError):
        parse_integer(text)
    assert parse_integer(" -12 ") == -12


def kserve(**strings):
    request = kserve_pb.ModelInferRequest()
    for name, value in strings.items():
        request.parameters[name].string_param = value
    return request.parameters


def test_kserve_scales_and_classes_refuse_quirks():
    assert options_from_parameters(kserve(scales="1,1.5")).scales == (1.0, 1.5)
    for quirk in ("1_0", "١", "nan"):
        with pytest.raises(InvalidOption, match="parameter 'scales'"):
            options_from_parameters(kserve(scales=quirk))
    assert options_from_parameters(kserve(classes="3,7")).classes == (3, 7)
    with pytest.raises(InvalidOption, match="parameter 'classes'"):
        options_from_parameters(kserve(classes="٣"))


def test_cli_scales_refuse_quirks():
    assert parse_scales("1, 1.5") == (1.0, 1.5)
    with pytest.raises(InvalidOption, match="--scales"):
        parse_scales("1_0")
