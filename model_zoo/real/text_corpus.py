"""Real English text for the text models, split once into calibration and evaluation parts.

Two sources:

* **Debian's package descriptions** (preferred): the ``main/i18n/Translation-en``
  index of the Debian release the machine uses (bookworm: 63 956 descriptions,
  32.7 MB). apt downloads it with ``apt-get update -o Acquire::Languages=en``
  (``scripts/setup.sh`` does; Debian's Docker images switch translations off). It is
  read from ``/var/lib/apt/lists`` through ``apt-helper cat-file`` (which undoes apt's
  on-disk compression), its SHA-256 is checked against the release's ``InRelease``
  file (which apt verified with the archive's signing key), and a copy is kept in the
  cache (``$ONNX_DC_CACHE_DIR/text``), because a later plain ``apt-get update`` deletes
  the list again.
* **Python's own reference documentation** (``pydoc_data.topics``, PSF-2.0, part of
  every CPython): the fallback when no Debian list was ever fetched, with a
  ``RuntimeWarning``. ``$ONNX_DC_TEXT_SOURCE`` (``debian`` or ``pydoc``) forces one.

Both give *pairs* (a query and the document it belongs to: a package's one-line
synopsis and the first sentence of its long description; for pydoc a sentence and
the one after it) and *paragraphs* of prose. Every text unit goes to the ``calib`` or
``eval`` split by a hash of its own (normalised) text, so a text that occurs twice
(descriptions shared by related packages) always lands on the same side and the two
splits never share a sentence or a paragraph.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from onnx_dc.errors import CalibrationError, ModelError
from model_zoo.real.fetch import cache_dir, sha256_of_file

SOURCE_ENV = "ONNX_DC_TEXT_SOURCE"
APT_LISTS_DIR = Path("/var/lib/apt/lists")
APT_HELPER = "/usr/lib/apt/apt-helper"
SPLITS = ("calib", "eval")
EVAL_PERCENT = 20  # share of text units in the evaluation split

_TRANSLATION_KEY = "main/i18n/Translation-en"
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]][.!?])\s+(?=[A-Z(\"'])")
_BOILERPLATE = re.compile(
    r"transitional|dummy package|debug(ging)? symbols|metapackage|meta-package|"
    r"(documentation|development files|header files|data files) for|"
    r"this package (contains|provides|includes) (the )?(documentation|development|header|debug)",
    re.IGNORECASE,
)


@dataclass
class TextCorpus:
    """Pairs and paragraphs of one source, already split.

    Attributes:
        name: short name of the source (``debian-<suite>`` or ``pydoc``).
        identity: what exactly was read (file and SHA-256, or the Python version).
        pairs: per split, ``(query, document)`` tuples in a fixed (hash) order.
        paragraphs: per split, prose paragraphs in a fixed (hash) order.
    """

    name: str
    identity: str
    pairs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    paragraphs: dict[str, list[str]] = field(default_factory=dict)


def split_of(text: str) -> str:
    """``"eval"`` for about EVAL_PERCENT % of texts, ``"calib"`` otherwise, by a hash of the normalised text."""
    digest = hashlib.sha256(_normalise(text).encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:4], "big") % 100 < EVAL_PERCENT else "calib"


def first_sentence(paragraph: str, min_words: int = 8, max_words: int = 60) -> str | None:
    """The paragraph's first sentence when it has ``min_words``..``max_words`` words and ends a sentence."""
    sentence = _SENTENCE_END.split(paragraph, 1)[0].strip()
    words = len(sentence.split())
    if min_words <= words <= max_words and sentence[-1:] in ".!?":
        return sentence
    return None


@lru_cache(maxsize=None)
def load_corpus(source: str | None = None) -> TextCorpus:
    """The text corpus: Debian's descriptions if apt ever fetched them, else pydoc's topics.

    ``source`` (or ``$ONNX_DC_TEXT_SOURCE``) ``"debian"`` or ``"pydoc"`` forces one;
    forcing ``debian`` where the list is missing is a :class:`ModelError`.
    """
    chosen = source or os.environ.get(SOURCE_ENV) or "auto"
    if chosen not in ("auto", "debian", "pydoc"):
        raise ModelError(f"unknown text source {chosen!r} (${SOURCE_ENV}); use 'debian' or 'pydoc'")
    if chosen in ("auto", "debian"):
        try:
            path, provenance = fetch_debian_descriptions()
        except ModelError as error:
            if chosen == "debian":
                raise
            warnings.warn(f"{error}; using Python's pydoc_data.topics as the text source", RuntimeWarning, stacklevel=2)
        else:
            return _debian_corpus(path.read_text(encoding="utf-8"), provenance)
    return _pydoc_corpus()


# --------------------------------------------------------------------------- Debian's descriptions


def fetch_debian_descriptions() -> tuple[Path, dict]:
    """A verified copy of the Translation-en index in the cache, with its provenance.

    The cached copy is used when present (its SHA-256 is re-checked against its
    provenance record); otherwise apt's list is read, checked against its
    ``InRelease`` and copied. Raises :class:`ModelError` when neither exists or a
    check fails.
    """
    directory = cache_dir() / "text"
    for record in sorted(directory.glob("debian-*-Translation-en.json")):
        provenance = json.loads(record.read_text())
        cached = record.with_suffix(".txt")
        if cached.is_file() and sha256_of_file(cached) == provenance["sha256"]:
            return cached, provenance
        warnings.warn(f"cached {cached} failed its checksum; reading apt's list again", RuntimeWarning, stacklevel=2)
    list_path, inrelease = find_translation_list()
    data = read_apt_list(list_path)
    actual = hashlib.sha256(data).hexdigest()
    expected = inrelease_sha256(inrelease, _TRANSLATION_KEY)
    if actual != expected:
        raise ModelError(f"{list_path} has sha256 {actual}, but {inrelease.name} lists {expected}")
    suite = _suite_of(list_path)
    provenance = {
        "source": f"Debian {suite} {_TRANSLATION_KEY}",
        "suite": suite,
        "apt_list": list_path.name,
        "inrelease": inrelease.name,
        "inrelease_date": _inrelease_field(inrelease, "Date"),
        "sha256": actual,
        "bytes": len(data),
    }
    cached = directory / f"debian-{suite}-Translation-en.txt"
    _atomic_write_bytes(cached, data)
    _atomic_write_bytes(cached.with_suffix(".json"), json.dumps(provenance, indent=1).encode())
    return cached, provenance


def find_translation_list(lists_dir: Path | None = None) -> tuple[Path, Path]:
    """apt's English Translation index of the main suite and the suite's InRelease file.

    Of several suites (``bookworm``, ``bookworm-updates``, ``bookworm-security``) the
    release itself is taken (the others hold only the few packages updated since).
    ``lists_dir`` defaults to :data:`APT_LISTS_DIR`.
    """
    lists_dir = APT_LISTS_DIR if lists_dir is None else lists_dir
    candidates = []
    for path in sorted(lists_dir.glob("*_dists_*_main_i18n_Translation-en*")):
        prefix = path.name.split("_main_i18n_")[0]
        inrelease = lists_dir / f"{prefix}_InRelease"
        if path.is_file() and inrelease.is_file():
            candidates.append((("-" in _suite_of(path)), path.name, path, inrelease))
    if not candidates:
        raise ModelError(
            f"no Debian Translation-en list in {lists_dir} (run `apt-get update -o Acquire::Languages=en`, "
            "as scripts/setup.sh does)"
        )
    _, _, path, inrelease = min(candidates)
    return path, inrelease


def read_apt_list(path: Path) -> bytes:
    """The uncompressed content of an apt list file (apt keeps them lz4/gz/xz-compressed in Docker images)."""
    if path.suffix not in (".lz4", ".gz", ".xz", ".zst", ".bz2"):
        return path.read_bytes()
    helper = APT_HELPER if Path(APT_HELPER).is_file() else shutil.which("apt-helper")
    if helper is None:
        raise ModelError(f"cannot read {path}: apt-helper (from Debian's apt package) is missing")
    completed = subprocess.run([helper, "cat-file", str(path)], capture_output=True, check=False)
    if completed.returncode != 0:
        message = completed.stderr.decode(errors="replace").strip().splitlines()
        raise ModelError(f"apt-helper cat-file {path} failed: {message[0] if message else completed.returncode}")
    return completed.stdout


def inrelease_sha256(inrelease: Path, key: str) -> str:
    """The SHA-256 an ``InRelease`` file lists for ``key`` (e.g. ``main/i18n/Translation-en``)."""
    in_section = False
    for line in inrelease.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.startswith(" "):
            in_section = line.startswith("SHA256:")
            continue
        parts = line.split()
        if in_section and len(parts) == 3 and parts[2] == key:
            return parts[0]
    raise ModelError(f"{inrelease} lists no SHA256 for {key}")


def parse_translation(text: str) -> list[tuple[str, list[str]]]:
    """``(synopsis, prose paragraphs)`` of every description in a Translation-en index.

    Paragraphs holding preformatted lines (two leading spaces) or list items are left
    out: they are tables, command lines and bullet lists rather than prose.
    """
    descriptions = []
    for block in text.split("\n\n"):
        lines = block.split("\n")
        start = next((i for i, line in enumerate(lines) if line.startswith("Description-en: ")), None)
        if start is None:
            continue
        synopsis = lines[start][len("Description-en: "):].strip()
        paragraphs: list[list[str]] = [[]]
        for line in lines[start + 1:]:
            if not line.startswith(" "):
                break
            if line.strip() == ".":
                paragraphs.append([])
            else:
                paragraphs[-1].append(line[1:])
        prose = [
            " ".join(part.strip() for part in paragraph)
            for paragraph in paragraphs
            if paragraph and not any(part.startswith((" ", "* ", "- ", "+ ", "o ")) for part in paragraph)
        ]
        descriptions.append((synopsis, prose))
    return descriptions


def _debian_corpus(text: str, provenance: dict) -> TextCorpus:
    descriptions = parse_translation(text)
    synopsis_count = Counter(_normalise(synopsis) for synopsis, _ in descriptions)
    firsts = [(synopsis, first_sentence(prose[0]) if prose else None) for synopsis, prose in descriptions]
    sentence_count = Counter(_normalise(sentence) for _, sentence in firsts if sentence)
    pairs = [
        (synopsis, sentence)
        for synopsis, sentence in firsts
        if sentence
        and len(synopsis.split()) >= 3
        and synopsis_count[_normalise(synopsis)] == 1
        and sentence_count[_normalise(sentence)] == 1
        and not _BOILERPLATE.search(f"{synopsis} {sentence}")
    ]
    paragraphs = [p for _, prose in descriptions for p in prose if len(p.split()) >= 12]
    corpus = TextCorpus(
        name=f"debian-{provenance['suite']}",
        identity=f"{provenance['source']} (sha256 {provenance['sha256'][:16]}..., {provenance['bytes']:,} bytes, "
        f"{len(descriptions):,} descriptions)",
    )
    _fill_splits(corpus, pairs, paragraphs)
    return corpus


# --------------------------------------------------------------------------- pydoc's topics


def _pydoc_corpus() -> TextCorpus:
    import platform

    import pydoc_data.topics

    paragraphs = []
    for key in sorted(pydoc_data.topics.topics):
        for block in re.split(r"\n\s*\n", pydoc_data.topics.topics[key]):
            lines = block.split("\n")
            if any(line.startswith(" ") for line in lines) or set(block.strip()) <= set("*=-"):
                continue  # code samples, grammar rules and title underlines
            paragraph = " ".join(line.strip() for line in lines).strip()
            if len(paragraph.split()) >= 12:
                paragraphs.append(paragraph)
    pairs = []
    for paragraph in paragraphs:
        sentences = [s.strip() for s in _SENTENCE_END.split(paragraph)]
        if len(sentences) >= 2 and all(6 <= len(s.split()) <= 60 for s in sentences[:2]):
            pairs.append((sentences[0], sentences[1]))
    corpus = TextCorpus(
        name="pydoc",
        identity=f"Python {platform.python_version()} pydoc_data.topics ({len(pydoc_data.topics.topics)} topics)",
    )
    _fill_splits(corpus, _unique_pairs(pairs), paragraphs)
    return corpus


# --------------------------------------------------------------------------- helpers


def _fill_splits(corpus: TextCorpus, pairs: list[tuple[str, str]], paragraphs: list[str]) -> None:
    """Deduplicate, split by each unit's own text hash and order by that hash (no source order)."""
    corpus.pairs = {split: [] for split in SPLITS}
    corpus.paragraphs = {split: [] for split in SPLITS}
    seen: set[str] = set()
    for query, document in sorted(pairs, key=lambda pair: _order_key(pair[1])):
        key = _normalise(document)
        if key in seen:
            continue
        seen.add(key)
        # Both sides of a pair go where the document goes; a query equal to another
        # split's text is dropped so the splits share no sentence at all.
        corpus.pairs[split_of(document)].append((query, document))
    seen = set()
    for paragraph in sorted(paragraphs, key=_order_key):
        key = _normalise(paragraph)
        if key not in seen:
            seen.add(key)
            corpus.paragraphs[split_of(paragraph)].append(paragraph)
    calib_queries = {_normalise(query) for query, _ in corpus.pairs["calib"]}
    calib_texts = calib_queries | {_normalise(document) for _, document in corpus.pairs["calib"]}
    corpus.pairs["eval"] = [
        (query, document) for query, document in corpus.pairs["eval"] if _normalise(query) not in calib_texts
    ]
    for split in SPLITS:
        if not corpus.pairs[split] or not corpus.paragraphs[split]:
            raise CalibrationError(f"text source {corpus.name} gave an empty {split} split")


def _unique_pairs(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    counts = Counter(_normalise(text) for pair in pairs for text in pair)
    return [pair for pair in pairs if all(counts[_normalise(text)] == 1 for text in pair)]


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _order_key(text: str) -> str:
    return hashlib.sha256(("order:" + _normalise(text)).encode("utf-8")).hexdigest()


def _suite_of(list_path: Path) -> str:
    return list_path.name.split("_dists_", 1)[1].split("_main_i18n_")[0]


def _inrelease_field(inrelease: Path, name: str) -> str:
    for line in inrelease.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(f"{name}: "):
            return line.split(": ", 1)[1]
    return ""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
