"""Hostile source strings and file names: the source parser answers a typed source or our own
SourceSyntaxError; names chosen by a server (HF file names, Civitai file names, Content-Disposition)
never place a file outside the destination folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from modelbus.services.download.errors import SourceSyntaxError, UnsafePathError
from modelbus.services.download.names import choose_filename, safe_relative_path, sanitize_filename
from modelbus.services.download.sources import CivitaiSource, HFSource, URLSource, parse_source

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# pieces that source strings are made of, so that random ones reach the deeper branches
PIECES = ["http://", "https://", "ftp://", "civitai:", "@", ":", "/", "//", "..", ".", "?", "#", "=", "&",
          "huggingface.co", "civitai.com", "[", "]", "::1", "127.0.0.1", "%2e%2e", "%00", "\\", "models",
          "api/download/models", "modelVersionId", "owner", "repo", "1", "12345", "9" * 5000, " ", "\n",
          "\x00", "١٢٣", "ａｂｃ", "user:pw@", ":99999", ":-1", "xn--"]
source_text = st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from(PIECES) | st.text(max_size=6), max_size=12).map("".join),
)


@FUZZ
@given(text=source_text, revision=st.none() | st.text(max_size=8), variant=st.none() | st.text(max_size=8))
@example(text="http://[::1/x", revision=None, variant=None)
@example(text="https://civitai.com/models/1?modelVersionId=" + "9" * 5000, revision=None, variant=None)
@example(text="civitai:" + "9" * 5000, revision=None, variant=None)
@example(text="owner/repo:a/../../etc", revision=None, variant=None)
def test_parse_source_answers_a_source_or_our_error(text: str, revision: str | None, variant: str | None) -> None:
    try:
        source = parse_source(text, revision=revision, variant=variant)
    except SourceSyntaxError as exc:
        assert str(exc)
        return
    assert isinstance(source, (URLSource, HFSource, CivitaiSource))
    if isinstance(source, HFSource) and source.subfolder:
        assert ".." not in source.subfolder.split("/")
        assert not source.subfolder.startswith("/")
    if isinstance(source, HFSource):
        assert "/" not in source.folder_name and source.folder_name not in ("", ".", "..")


def _inside(dest: Path, name: str | os.PathLike[str]) -> bool:
    target = (dest / name).resolve()
    return target.parent == dest.resolve() or dest.resolve() in target.parents


TRAVERSALS = ["../../etc/passwd", "..\\..\\windows\\system32", "/etc/cron.d/x", "C:\\x.ckpt", "..", ".",
              "a/../../b", "%2e%2e/x", "\x00evil", "....//x", "./../x", "x/./../../y", "\\\\server\\share"]
names = st.one_of(st.text(max_size=60), st.sampled_from(TRAVERSALS),
                  st.lists(st.sampled_from(["..", ".", "/", "\\", "a", "b.safetensors", "\x00", " "]),
                           max_size=10).map("".join))


@FUZZ
@given(name=names)
@example(name=". . .")
@example(name=". .0")
def test_sanitized_names_are_one_component_inside_the_folder(name: str, tmp_path: Path) -> None:
    clean = sanitize_filename(name)
    assert clean and "/" not in clean and "\\" not in clean and "\x00" not in clean
    assert clean not in (".", "..") and not clean.startswith(".")
    assert _inside(tmp_path, clean)


@FUZZ
@given(path=names)
def test_part_paths_are_refused_or_stay_inside(path: str, tmp_path: Path) -> None:
    try:
        rel = safe_relative_path(path)
    except UnsafePathError as exc:
        assert str(exc)
        return
    assert ".." not in rel.parts and not rel.is_absolute()
    assert _inside(tmp_path, rel)


@FUZZ
@given(name=names, star=st.booleans())
@example(name=". . .", star=False)
def test_content_disposition_names_stay_inside(name: str, star: bool, tmp_path: Path) -> None:
    from urllib.parse import quote

    header = (f"attachment; filename*=UTF-8''{quote(name)}" if star
              else 'attachment; filename="' + name.replace('"', "") + '"')
    clean = choose_filename(header, "http://h/fallback.bin")
    assert "/" not in clean and "\\" not in clean and clean not in (".", "..")
    assert _inside(tmp_path, clean)


@pytest.mark.parametrize("bad", ["", "   ", "not a source", "ftp://h/x", "file:///etc/passwd", "owner/repo:../x",
                                 "owner/repo:a/../../b", "civitai:", "civitai:x", "javascript:alert(1)"])
def test_known_bad_sources_are_named(bad: str) -> None:
    with pytest.raises(SourceSyntaxError):
        parse_source(bad)
