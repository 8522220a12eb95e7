"""Large inputs under the default 256 MiB message limits: 12 MB and 100 MB requests."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton

from densemap.service.client import DensemapClient
from densemap.service.engine import ScoreOptions
from densemap.service.server.config import DEFAULT_MAX_MESSAGE_BYTES, ServerConfig
from tests.support.server_harness import TINY, rgb_image


def test_defaults_are_256_mib():
    assert ServerConfig().max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES == 256 * 1024 * 1024


@pytest.fixture(scope="module")
def client(server):
    _, target = server
    with DensemapClient(target, timeout=120) as densemap_client:
        yield densemap_client


@pytest.mark.slow
def test_12_mb_uint8_image_over_both_apis(server, client, engines):
    image = rgb_image(2000, 2000, seed=41)
    assert image.nbytes == 12_000_000
    expected = engines[TINY].score(image)
    got = client.score(image, model=TINY)
    np.testing.assert_array_equal(got.maps[0].scores, expected.maps[0].scores)  # 5x498x497
    with triton.InferenceServerClient(server[1]) as tc:
        tensor = triton.InferInput("image", list(image.shape), "UINT8")
        tensor.set_data_from_numpy(image)
        result = tc.infer(TINY, [tensor], client_timeout=120)
    np.testing.assert_array_equal(result.as_numpy("scores"), expected.maps[0].scores)


@pytest.mark.slow
def test_100_mb_float_image(client, engines):
    rng = np.random.default_rng(42)
    image_chw = rng.standard_normal((3, 2900, 2900), dtype=np.float32)
    assert image_chw.nbytes > 100_000_000
    got = client.score(image_chw, model=TINY, top_k=1)
    expected = engines[TINY].score(image_chw, ScoreOptions(top_k=1))
    np.testing.assert_array_equal(got.maps[0].scores, expected.maps[0].scores)
    np.testing.assert_array_equal(got.maps[0].top_k_indices, expected.maps[0].top_k_indices)
