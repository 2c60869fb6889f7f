"""Tests of model_zoo.real.text_corpus: Debian's descriptions through apt's lists, the pydoc fallback, the split."""

from __future__ import annotations

import hashlib
import json
import warnings

import pytest

from onnx_dc.errors import ModelError
from model_zoo.real import text_corpus

TRANSLATION = """Package: alpha
Description-md5: 11111111111111111111111111111111
Description-en: fast frobnicator for the command line
 Alpha frobnicates files in place and is much faster than the tools it replaces.
 It reads any input.
 .
 Second paragraph of prose about alpha, long enough to count as a paragraph of text.
 .
   $ alpha --frobnicate file
 .
  * a bullet item

Package: beta
Description-md5: 22222222222222222222222222222222
Description-en: short
 Too short.
"""


def _inrelease(sha256: str, size: int) -> str:
    return (
        "Origin: Debian\nSuite: stable\nCodename: bookworm\nDate: Sat, 10 May 2025 08:00:00 UTC\n"
        f"MD5Sum:\n 00000000000000000000000000000000 {size} main/i18n/Translation-en\n"
        f"SHA256:\n {'f' * 64} 12 main/i18n/Translation-en.xz\n {sha256} {size} main/i18n/Translation-en\n"
    )


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    """An apt lists directory holding an uncompressed Translation-en and its InRelease; an empty cache."""
    lists = tmp_path / "lists"
    lists.mkdir()
    data = TRANSLATION.encode()
    prefix = "deb.debian.org_debian_dists_bookworm"
    (lists / f"{prefix}_main_i18n_Translation-en").write_bytes(data)
    (lists / f"{prefix}_InRelease").write_text(_inrelease(hashlib.sha256(data).hexdigest(), len(data)))
    # An updates suite, which must not be chosen over the release.
    (lists / f"{prefix}-updates_main_i18n_Translation-en").write_bytes(b"Package: x\n")
    (lists / f"{prefix}-updates_InRelease").write_text(_inrelease("0" * 64, 11))
    monkeypatch.setattr(text_corpus, "APT_LISTS_DIR", lists)
    monkeypatch.setenv("ONNX_DC_CACHE_DIR", str(tmp_path / "cache"))
    return lists


def test_parse_translation_keeps_prose_paragraphs_only():
    descriptions = text_corpus.parse_translation(TRANSLATION)
    assert [synopsis for synopsis, _ in descriptions] == ["fast frobnicator for the command line", "short"]
    prose = descriptions[0][1]
    assert prose[0].startswith("Alpha frobnicates files in place") and prose[0].endswith("It reads any input.")
    assert len(prose) == 2  # the command line and the bullet list are not prose


def test_first_sentence_rules():
    paragraph = "Alpha frobnicates files in place and is much faster than the tools. It reads any input."
    assert text_corpus.first_sentence(paragraph) == "Alpha frobnicates files in place and is much faster than the tools."
    assert text_corpus.first_sentence("Too short. Really.") is None
    assert text_corpus.first_sentence("a sentence without a full stop that goes on for quite a few words") is None


def test_split_is_a_stable_hash_of_the_normalised_text():
    assert text_corpus.split_of("Some Text  here") == text_corpus.split_of("some text here")
    splits = [text_corpus.split_of(f"sentence number {i}") for i in range(2000)]
    share = splits.count("eval") / len(splits)
    assert 0.15 < share < 0.25  # EVAL_PERCENT = 20


def test_inrelease_sha256_reads_the_sha256_section(tmp_path):
    path = tmp_path / "InRelease"
    path.write_text(_inrelease("a" * 64, 99))
    assert text_corpus.inrelease_sha256(path, "main/i18n/Translation-en") == "a" * 64
    with pytest.raises(ModelError, match="lists no SHA256 for main/i18n/Translation-de"):
        text_corpus.inrelease_sha256(path, "main/i18n/Translation-de")


def test_the_release_suite_is_chosen_and_cached(fake_apt, tmp_path):
    path, inrelease = text_corpus.find_translation_list(fake_apt)
    assert path.name == "deb.debian.org_debian_dists_bookworm_main_i18n_Translation-en"
    assert inrelease.name.endswith("bookworm_InRelease")
    cached, provenance = text_corpus.fetch_debian_descriptions()
    assert cached.read_text() == TRANSLATION
    assert provenance["suite"] == "bookworm" and provenance["sha256"] == hashlib.sha256(TRANSLATION.encode()).hexdigest()
    # apt's list is gone (a plain `apt-get update` deletes it): the cached copy serves.
    path.unlink()
    again, _ = text_corpus.fetch_debian_descriptions()
    assert again == cached


def test_a_list_that_differs_from_its_inrelease_is_refused(fake_apt):
    path, _ = text_corpus.find_translation_list(fake_apt)
    path.write_bytes(TRANSLATION.encode() + b"tampered\n")
    with pytest.raises(ModelError, match="but .*InRelease lists") as error:
        text_corpus.fetch_debian_descriptions()
    assert "\n" not in str(error.value)


def test_a_damaged_cached_copy_is_read_again_from_apt(fake_apt):
    cached, _ = text_corpus.fetch_debian_descriptions()
    cached.write_text("damaged")
    with pytest.warns(RuntimeWarning, match="failed its checksum"):
        again, _ = text_corpus.fetch_debian_descriptions()
    assert again.read_text() == TRANSLATION


def test_without_any_list_the_error_names_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.setattr(text_corpus, "APT_LISTS_DIR", tmp_path)
    monkeypatch.setenv("ONNX_DC_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ModelError, match=r"apt-get update -o Acquire::Languages=en"):
        text_corpus.fetch_debian_descriptions()


def test_pydoc_is_the_fallback_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(text_corpus, "APT_LISTS_DIR", tmp_path)
    monkeypatch.setenv("ONNX_DC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(text_corpus.SOURCE_ENV, raising=False)
    text_corpus.load_corpus.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="pydoc_data.topics"):
            corpus = text_corpus.load_corpus()
        assert corpus.name == "pydoc"
        with pytest.raises(ModelError, match="no Debian Translation-en"):
            text_corpus.load_corpus("debian")
    finally:
        text_corpus.load_corpus.cache_clear()
    with pytest.raises(ModelError, match="unknown text source 'wiki'"):
        text_corpus.load_corpus("wiki")


@pytest.mark.parametrize("source", ["pydoc", None])
def test_calibration_and_evaluation_text_are_disjoint(source):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        corpus = text_corpus.load_corpus(source)

    def texts(split):
        sentences = {" ".join(t.lower().split()) for pair in corpus.pairs[split] for t in pair}
        return sentences, {" ".join(p.lower().split()) for p in corpus.paragraphs[split]}

    calib_sentences, calib_paragraphs = texts("calib")
    eval_sentences, eval_paragraphs = texts("eval")
    assert len(corpus.pairs["eval"]) >= 50 and len(corpus.paragraphs["eval"]) >= 100
    assert not calib_sentences & eval_sentences
    assert not calib_paragraphs & eval_paragraphs
    assert all(text_corpus.split_of(document) == "eval" for _, document in corpus.pairs["eval"])
    json.dumps(corpus.identity)  # printable provenance
