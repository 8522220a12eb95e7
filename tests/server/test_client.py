"""DensemapClient behaviour beyond round trips: errors, streams, limits, readiness."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from densemap.service.client import DensemapClient, RemoteError
from densemap.service.errors import DensemapError, InvalidImage, InvalidOption
from tests.support.server_harness import TINY, free_port, rgb_image


def test_unknown_option_and_bad_image_fail_before_any_call(client):
    with pytest.raises(InvalidOption, match="stride"):
        client.score(rgb_image(), model=TINY, stride=2)
    with pytest.raises(InvalidImage):
        client.score([1, 2, 3], model=TINY)
    with pytest.raises(InvalidImage, match="uint8 or float32"):
        client.score(np.zeros((20, 20), dtype=np.int64), model=TINY)


def test_remote_errors_carry_the_status_code(client):
    with pytest.raises(RemoteError) as caught:
        client.score(rgb_image(), model="nope")
    assert isinstance(caught.value, DensemapError)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert str(caught.value).startswith("NOT_FOUND: ")
    with pytest.raises(RemoteError) as caught:
        client.get_model("nope")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_stream_raises_on_a_failed_item_unless_asked_to_return_it(client):
    images = [rgb_image(), rgb_image(4, 4), rgb_image()]
    results = client.score_stream(images, model=TINY)
    assert next(results).maps
    with pytest.raises(RemoteError) as caught:
        next(results)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_stream_reports_a_client_side_bad_image_in_the_caller(client):
    with pytest.raises(InvalidImage):
        list(client.score_stream([rgb_image(), 42], model=TINY))


def test_include_map_false_returns_only_what_was_asked(client):
    result = client.score(rgb_image(), model=TINY, include_map=False, argmax=True)
    (scale_map,) = result.maps
    assert scale_map.scores is None and scale_map.argmax.dtype == np.int32
    assert scale_map.shape == (8, 9)  # (40-12)//4+1, (50-16)//4+1
    assert result.image_top_k and result.labels[result.image_top_k[0][0]].startswith("class")


def test_image_scores_only_still_carry_the_cell_counts(client):
    result = client.score(rgb_image(), model=TINY, include_map=False, output_stride=2)
    (scale_map,) = result.maps
    assert scale_map.scores is None and scale_map.argmax is None
    assert scale_map.shape == (15, 18)  # (40-12)//2+1, (50-16)//2+1
    assert result.image_scores.shape == (5,)


def test_large_response_needs_the_raised_receive_limit(server):
    _, target = server
    image = rgb_image(700, 700)  # output stride 1: 5 x 689 x 685 float32 = 9.4 MB > 4 MiB
    with DensemapClient(target, max_message_bytes=4 * 1024 * 1024, timeout=60) as small:
        with pytest.raises(RemoteError) as caught:
            small.score(image, model=TINY, output_stride=1)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with DensemapClient(target, timeout=60) as default:
        assert default.score(image, model=TINY, output_stride=1).maps[0].shape == (689, 685)


def test_ready_is_false_for_an_unreachable_server(client):
    assert client.ready() and client.ready(TINY)
    assert not client.ready("no-such-model")
    with DensemapClient(f"127.0.0.1:{free_port()}") as nowhere:
        assert not nowhere.ready(timeout=0.5)
