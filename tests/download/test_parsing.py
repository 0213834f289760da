"""Source strings, file names and tokens: pure functions with tricky inputs."""

from __future__ import annotations

import pytest

from modelbus.services.config import AppConfig
from modelbus.services.download import CivitaiSource, HFSource, SourceSyntaxError, URLSource, parse_source
from modelbus.services.download.names import choose_filename, safe_relative_path, sanitize_filename
from modelbus.services.download.security import Credential, credential_for


@pytest.mark.parametrize("text,expected", [
    ("https://example.com/m.safetensors", URLSource("https://example.com/m.safetensors")),
    ("acme/tiny-sd", HFSource("acme/tiny-sd")),
    ("acme/tiny-sd:vae", HFSource("acme/tiny-sd", "vae")),
    ("stabilityai/sdxl:text_encoder_2", HFSource("stabilityai/sdxl", "text_encoder_2")),
    ("https://huggingface.co/acme/tiny-sd", HFSource("acme/tiny-sd")),
    ("civitai:123", CivitaiSource(123)),
    ("civitai:123@456", CivitaiSource(123, 456)),
    ("https://civitai.com/models/123?modelVersionId=456", CivitaiSource(123, 456)),
    ("https://civitai.com/models/123/some-slug", CivitaiSource(123)),
    ("https://civitai.com/api/download/models/456", CivitaiSource(None, 456)),
])
def test_parse_source(text: str, expected: object) -> None:
    assert parse_source(text) == expected


def test_parse_source_options() -> None:
    assert parse_source("a/b", revision="dev", variant="fp16") == HFSource("a/b", None, "dev", "fp16")
    assert parse_source("civitai:1", base_model="SDXL") == CivitaiSource(1, None, "SDXL")
    assert parse_source("http://127.0.0.1:9/models/5", civitai_api="http://127.0.0.1:9") == CivitaiSource(5)


@pytest.mark.parametrize("bad", ["", "  ", "just words", "civitai:", "civitai:abc", "ftp://x/y", "a/b:../etc",
                                 "/abs/path.safetensors", "http:///nohost"])
def test_bad_sources(bad: str) -> None:
    with pytest.raises(SourceSyntaxError):
        parse_source(bad)


@pytest.mark.parametrize("raw,expected", [
    ("../../etc/passwd", "passwd"),
    ("..\\..\\win.ini", "win.ini"),
    ("a:b*c?.safetensors", "a_b_c_.safetensors"),
    ("...", "download"),
    (".hidden", "hidden"),
    ("CON.txt", "_CON.txt"),
    ("x" * 300 + ".safetensors", "x" * 188 + ".safetensors"),
])
def test_sanitize_filename(raw: str, expected: str) -> None:
    assert sanitize_filename(raw) == expected


def test_content_disposition_wins_and_rfc5987_is_decoded() -> None:
    assert choose_filename("attachment; filename*=UTF-8''caf%C3%A9%20v2.safetensors", "http://h/x") == "café v2.safetensors"
    assert choose_filename('attachment; filename="../a.ckpt"', "http://h/x") == "a.ckpt"
    assert choose_filename(None, "http://h/dir/m%20x.bin?sig=1") == "m x.bin"
    assert choose_filename(None, "http://h/") == "download"


def test_safe_relative_path() -> None:
    assert safe_relative_path("unet//./a.bin").as_posix() == "unet/a.bin"


def test_tokens_belong_to_their_host(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = AppConfig.load(root=tmp_path, hf_endpoint="https://hf.example", hf_token="hf_x",
                         civitai_api="https://civitai.com", civitai_token="cv_y",
                         remote_api_tokens={r"^https://models\.corp/": "corp_z"})
    assert credential_for("https://hf.example/a/b/resolve/main/x", cfg).token == "hf_x"  # type: ignore[union-attr]
    assert credential_for("https://civitai.com/api/download/models/1", cfg).token == "cv_y"  # type: ignore[union-attr]
    assert credential_for("https://models.corp/x.bin", cfg).token == "corp_z"  # type: ignore[union-attr]
    assert credential_for("https://other.example/x", cfg) is None
    cred = Credential.for_url("s3cr3t-token", "https://a.example/x")
    assert cred.applies_to("https://a.example:443/y") and not cred.applies_to("https://a.example:8443/y")
    assert not cred.applies_to("https://b.example/x") and "s3cr3t" not in repr(cred)
