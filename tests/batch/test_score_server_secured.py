"""``densemap score --server`` against servers with a bearer token and TLS.

The maps written through a secured server are the in-process maps byte for byte; each way of
getting the connection wrong (no token, wrong token, plaintext to TLS, TLS to plaintext, an
untrusted certificate) is one error naming the flag to change, never a traceback.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from densemap.service.cli import main
from densemap.service.server.app import create_server
from densemap.service.server.config import ServerConfig
from tests.support.score_fixtures import MODEL, build_plain_folder

HOST = "127.0.0.1"
TOKEN = "s3cret-token"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"]
        + ["-addext", f"subjectAltName=IP:{HOST},DNS:densemap"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def _start(repo: Path, **overrides) -> tuple:
    config = ServerConfig(models_dir=repo, host=HOST, port=0, metrics_port=0, **overrides)
    server, port = create_server(config)
    assert server.wait_ready(30), "the server did not load its models within 30 s"
    return server, f"{HOST}:{port}"


@pytest.fixture(scope="module")
def tls_server(repo, certificate):
    cert, key = certificate
    server, target = _start(repo, tls_cert=cert, tls_key=key, auth_token=TOKEN)
    yield target
    server.stop()


@pytest.fixture(scope="module")
def plain_server(repo):
    server, target = _start(repo, auth_token=TOKEN)
    yield target
    server.stop()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("in")
    build_plain_folder(root, 3, size=(40, 52), seed=7)
    return root


@pytest.fixture(scope="module")
def local_maps(repo, folder, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("local")
    assert main(["score", str(folder), "--out", str(out), "--models", str(repo),
                 "--model", MODEL]) == 0  # fmt: skip
    return _maps(out)


def _maps(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.npz"))}


def _score(folder: Path, out: Path, *flags: str) -> int:
    return main(["score", str(folder), "--out", str(out), "--model", MODEL, *flags])


def test_token_and_tls_write_the_in_process_maps(
    tls_server, certificate, folder, local_maps, tmp_path, capsys, monkeypatch
):
    ca = str(certificate[0])
    monkeypatch.delenv("DENSEMAP_AUTH_TOKEN", raising=False)
    out = tmp_path / "flag"
    assert _score(folder, out, "--server", tls_server, "--ca-cert", ca, "--token", TOKEN) == 0
    assert _maps(out) == local_maps and len(local_maps) == 3
    monkeypatch.setenv("DENSEMAP_AUTH_TOKEN", TOKEN)  # the server's own variable works too
    out = tmp_path / "env"
    assert _score(folder, out, "--server", tls_server, "--tls", "--ca-cert", ca) == 0
    assert _maps(out) == local_maps
    assert "Traceback" not in capsys.readouterr().err


def test_plain_server_with_token_from_the_environment(
    plain_server, folder, local_maps, tmp_path, monkeypatch
):
    monkeypatch.setenv("DENSEMAP_AUTH_TOKEN", TOKEN)
    assert _score(folder, tmp_path / "o", "--server", plain_server) == 0
    assert _maps(tmp_path / "o") == local_maps


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        ((), ["requires a bearer token", "--token TOKEN", "DENSEMAP_AUTH_TOKEN"]),
        (("--token", "wrong"), ["token is wrong", "--token TOKEN"]),
    ],
)
def test_missing_or_wrong_token_names_the_flag(
    plain_server, folder, tmp_path, capsys, monkeypatch, flags, says
):
    monkeypatch.delenv("DENSEMAP_AUTH_TOKEN", raising=False)
    assert _score(folder, tmp_path / "o", "--server", plain_server, *flags) == 2
    err = capsys.readouterr().err
    assert all(word in err for word in says) and "Traceback" not in err, err
    assert not (tmp_path / "o").exists() or not _maps(tmp_path / "o")


def test_plaintext_client_of_a_tls_server_asks_tls_required(
    tls_server, folder, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("DENSEMAP_AUTH_TOKEN", TOKEN)
    assert _score(folder, tmp_path / "o", "--server", tls_server) == 2
    err = capsys.readouterr().err
    assert "TLS required?" in err and "--tls" in err and "Traceback" not in err, err
    assert "start one with 'densemap serve'" not in err


def test_untrusted_certificate_asks_for_the_ca(tls_server, folder, tmp_path, capsys):
    assert _score(folder, tmp_path / "o", "--server", tls_server, "--tls") == 2
    err = capsys.readouterr().err
    assert "does not trust" in err and "--ca-cert" in err and "Traceback" not in err, err


def test_tls_client_of_a_plaintext_server_says_so(plain_server, folder, tmp_path, capsys):
    assert _score(folder, tmp_path / "o", "--server", plain_server, "--tls") == 2
    err = capsys.readouterr().err
    assert "does not speak TLS" in err and "Leave out --tls" in err, err


def test_unreadable_ca_file_and_misplaced_flags(plain_server, folder, tmp_path, capsys):
    missing = tmp_path / "missing.pem"
    assert _score(folder, tmp_path / "o", "--server", plain_server, "--ca-cert", str(missing)) == 2
    assert "cannot read --ca-cert" in capsys.readouterr().err
    assert _score(folder, tmp_path / "o", "--token", TOKEN, "--tls") == 2
    assert "--token, --tls apply to --server" in capsys.readouterr().err
    assert _score(folder, tmp_path / "o", "--server", plain_server, "--token", " ") == 2
    assert "--token is empty" in capsys.readouterr().err
    for token in ("a\nb", "caf\u00e9", "two words"):  # a header cannot carry them
        assert _score(folder, tmp_path / "o", "--server", plain_server, "--token", token) == 2
        err = capsys.readouterr().err
        assert "--token holds characters" in err and "Traceback" not in err, err


def test_densemap_health_probes_a_tls_server_by_its_certificate_name(
    tls_server, certificate, capsys
):
    """The exec probe of deploy/k8s/overlays/tls: dials an address, checks the name."""
    ca = f"--ca-cert={certificate[0]}"
    probe = ["health", "--server", tls_server, ca, "--server-name=densemap"]
    assert main([*probe, "--service=readiness"]) == 0
    assert "'readiness': SERVING" in capsys.readouterr().out
    assert main([*probe, "--service=liveness"]) == 0
    assert main([*probe, "--service=no-such-model"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().out
    assert main(["health", "--server", tls_server, "--timeout", "3"]) == 1  # plaintext: no
    assert main(["health", "--server", tls_server, ca, "--server-name=other", "--timeout=3"]) == 1
    capsys.readouterr()


def test_stock_tritonclient_with_tls_and_token(tls_server, certificate):
    """What docs/server.md shows for tritonclient: ssl, root_certificates (a path), headers."""
    import numpy as np
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    image = np.zeros((40, 52, 3), np.uint8)
    headers = {"authorization": f"Bearer {TOKEN}"}
    with triton.InferenceServerClient(
        tls_server, ssl=True, root_certificates=str(certificate[0])
    ) as client:
        assert client.is_server_ready(headers=headers)
        tensor = triton.InferInput("image", list(image.shape), "UINT8")
        tensor.set_data_from_numpy(image)
        scores = client.infer(MODEL, [tensor], headers=headers).as_numpy("scores")
        assert scores.shape[0] == 5
        with pytest.raises(InferenceServerException) as caught:
            client.is_server_ready()
        assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
