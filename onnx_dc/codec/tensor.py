"""The per-tensor pipeline: prune, share weights, encode the container.

:func:`compress_tensor` is what the converter calls for every weight::

    validate -> keep-mask (given, or magnitude / std-rule pruning)
             -> 1-D k-means of the kept weights (float64, k = 2**bits)
             -> codebook in the tensor's dtype, codes (int16, -1 = pruned)
             -> onnx_dc.codec.container.encode_container

The two halves are public too, so later stages (activation-aware masks,
centroids refitted on calibration data, fixed assignments) can replace the
middle: :func:`codebook_in_dtype` turns float64 centroids into the stored
codebook plus nearest-value codes, and :func:`compressed_tensor_from_codes`
encodes any ``(codes, codebook)`` pair.

Codebook rules: the float64 centroids are rounded to the tensor's dtype
(round to nearest, ties to even, as numpy and ml_dtypes casts do), ``-0.0``
becomes ``+0.0``, values that became equal are merged, every kept weight is
then assigned to the nearest codebook value (ties to the smaller), and unused
values are dropped. The codebook is therefore strictly increasing and every
entry is used by at least one weight; it has at most ``2**bits`` entries
(fewer when the kept weights have fewer distinct values).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral

import ml_dtypes
import numpy as np

from onnx_dc.codec._checks import finite_real
from onnx_dc.codec.clustering import INIT_METHODS, assign_to_centroids, kmeans_1d, kmeans_centroids_of_sorted32
from onnx_dc.codec.container import LAYOUTS, encode_container
from onnx_dc.codec.container_stream import encode_symbols
from onnx_dc.codec.float32_ops import BLOCK, NearestValue, magnitude_keep_mask
from onnx_dc.codec.pruning import prune_by_magnitude, prune_by_std
from onnx_dc.errors import InvalidTensorError, SettingsError

__all__ = [
    "SUPPORTED_DTYPES",
    "CompressedTensor",
    "EncodedTensor",
    "TensorSettings",
    "codebook_in_dtype",
    "compress_tensor",
    "compressed_tensor_from_codes",
    "encode_memory_bytes",
    "encode_tensor",
]

SUPPORTED_DTYPES = (
    np.dtype(np.float32),
    np.dtype(np.float16),
    np.dtype(np.float64),
    np.dtype(ml_dtypes.bfloat16),
)
"""Weight dtypes a container can hold."""

_MAX_BITS = 8
_INDEX_BITS_RANGE = (1, 16)


@dataclass(frozen=True)
class TensorSettings:
    """How one tensor is compressed.

    Attributes:
        sparsity: fraction of weights removed by magnitude (exact count, see
            :func:`onnx_dc.codec.pruning.prune_by_magnitude`), in ``[0, 1]``.
        quality: the paper's rule, remove ``|w| < quality * std(w)``; ``>= 0``.
            At most one of ``sparsity`` and ``quality`` may be set; neither
            means no pruning.
        bits: weight bits ``b`` (1..8): at most ``2**b`` shared values.
        index_bits: width of the sparse layout's relative-index field (1..16).
        init: k-means initialisation, one of ``linear`` (default, the paper's
            best), ``density``, ``random``, ``kmeans++``.
        seed: seed of the ``random`` and ``kmeans++`` initialisations.
        layout: container layout: ``auto`` (smaller of the two), ``sparse`` or ``dense``.
        max_iter: maximum Lloyd iterations (each costs ``O(k log n)``).

    Raises:
        SettingsError: on construction, for any value out of range.
    """

    sparsity: float | None = None
    quality: float | None = None
    bits: int = 5
    index_bits: int = 5
    init: str = "linear"
    seed: int = 0
    layout: str = "auto"
    max_iter: int = 300

    def __post_init__(self) -> None:
        if self.sparsity is not None and self.quality is not None:
            raise SettingsError(
                f"set at most one of sparsity and quality, got sparsity={self.sparsity} and quality={self.quality}"
            )
        if self.sparsity is not None:
            sparsity = finite_real(self.sparsity, "sparsity")
            if not 0.0 <= sparsity <= 1.0:
                raise SettingsError(f"sparsity must be in [0, 1], got {sparsity}")
        if self.quality is not None:
            quality = finite_real(self.quality, "quality")
            if quality < 0.0:
                raise SettingsError(f"quality must be >= 0, got {quality}")
        _int_setting("bits", self.bits, 1, _MAX_BITS)
        _int_setting("index_bits", self.index_bits, *_INDEX_BITS_RANGE)
        _int_setting("seed", self.seed, 0, None)
        _int_setting("max_iter", self.max_iter, 1, None)
        if self.init not in INIT_METHODS:
            raise SettingsError(f"unknown init {self.init!r}: expected one of {', '.join(INIT_METHODS)}")
        if self.layout not in LAYOUTS:
            raise SettingsError(f"unknown layout {self.layout!r}: expected one of {', '.join(LAYOUTS)}")


@dataclass
class CompressedTensor:
    """One compressed tensor and what it decodes to.

    Attributes:
        container: the container bytes (docs/FORMAT.md).
        quantized: the tensor the container decodes to, bit for bit: original
            dtype and shape, kept weights replaced by their codebook value,
            pruned weights ``+0.0``.
        mask: bool, the tensor's shape, ``True`` = kept.
        codebook: 1-D, the tensor's dtype, strictly increasing.
        codes: int16, the tensor's shape, codebook index of each kept weight, ``-1`` pruned.
        settings: the settings used.
    """

    container: bytes
    quantized: np.ndarray
    mask: np.ndarray
    codebook: np.ndarray
    codes: np.ndarray
    settings: TensorSettings

    @property
    def n_weights(self) -> int:
        """Number of elements of the tensor."""
        return int(self.mask.size)

    @property
    def n_kept(self) -> int:
        """Number of weights that survived pruning."""
        return int(np.count_nonzero(self.mask))

    @property
    def size_bytes(self) -> int:
        """Size of the container."""
        return len(self.container)

    @property
    def original_size_bytes(self) -> int:
        """Size of the uncompressed tensor's data (elements times item size)."""
        return self.n_weights * self.quantized.dtype.itemsize

    def container_only(self) -> EncodedTensor:
        """The same tensor held as its container only (its arrays decoded again when asked for)."""
        return EncodedTensor(self.container, tuple(self.codes.shape), self.codebook.dtype, self.n_kept, self.codebook,
                             self.settings)

    @property
    def ratio(self) -> float:
        """Compression ratio, original_size_bytes / size_bytes."""
        return self.original_size_bytes / self.size_bytes


def compress_tensor(
    weights: np.ndarray, settings: TensorSettings, *, mask: np.ndarray | None = None
) -> CompressedTensor:
    """Prune, weight-share and encode one tensor.

    Args:
        weights: the tensor, any shape (0 to 8 dims), dtype float32, float16,
            float64 or bfloat16, all values finite.
        settings: the :class:`TensorSettings`.
        mask: optional keep-mask (bool, the tensor's shape). When given it
            replaces the pruning step: ``settings.sparsity`` and
            ``settings.quality`` are not used.

    Returns:
        The :class:`CompressedTensor`; its ``quantized`` equals
        ``decode_container(container)`` bit for bit.

    Raises:
        InvalidTensorError: unsupported dtype, NaN/Inf values, too many dimensions.
        SettingsError: settings of the wrong type, or a mask of the wrong dtype/shape.
    """
    if not isinstance(settings, TensorSettings):
        raise SettingsError(f"settings must be a TensorSettings, got {type(settings).__name__}")
    if _takes_fast_path(weights):
        keep = _check_mask(mask, weights.shape).reshape(-1) if mask is not None else None
        symbols, codebook, keep, _ = _fast_symbols(weights, settings, keep)
        codes = symbols.astype(np.int16)
        codes[codes == codebook.size] = -1
        return compressed_tensor_from_codes(codes.reshape(weights.shape), codebook, settings)
    weights = _check_weights(weights)
    keep = _check_mask(mask, weights.shape) if mask is not None else _pruning_mask(weights, settings, prune_by_magnitude)

    keep_flat = keep.reshape(-1)
    kept = weights.reshape(-1)[keep_flat].astype(np.float64)
    clusters = kmeans_1d(
        kept, 2**settings.bits, init=settings.init, max_iter=settings.max_iter, seed=settings.seed
    )
    codebook, kept_codes = codebook_in_dtype(kept, clusters.centroids, weights.dtype)
    codes = np.full(keep_flat.size, -1, dtype=np.int16)
    codes[keep_flat] = kept_codes
    return compressed_tensor_from_codes(codes.reshape(weights.shape), codebook, settings)


def encode_tensor(weights: np.ndarray, settings: TensorSettings) -> EncodedTensor:
    """:func:`compress_tensor` returning only the container and its counts, in bounded memory.

    The container is byte-identical to ``compress_tensor(weights, settings).container``.
    float32, float16 and bfloat16 tensors (which may be read-only memory maps) are
    processed in blocks: besides the tensor itself this holds a keep-mask (1 byte
    per weight), the sorted kept values (4 bytes per kept weight), one code symbol
    per weight (1 or 2 bytes) and the output, instead of the dozens of bytes per
    weight of the whole-array pipeline. float64 tensors take :func:`compress_tensor`.

    Raises:
        InvalidTensorError, SettingsError: as :func:`compress_tensor`.
    """
    if not isinstance(settings, TensorSettings):
        raise SettingsError(f"settings must be a TensorSettings, got {type(settings).__name__}")
    if not _takes_fast_path(weights):
        return compress_tensor(weights, settings).container_only()
    symbols, codebook, keep, counts = _fast_symbols(weights, settings, None)
    n_kept = int(np.count_nonzero(keep))
    del keep
    container = encode_symbols(
        symbols, weights.shape, codebook, bits=settings.bits, index_bits=settings.index_bits, layout=settings.layout,
        counts=counts,
    )
    return EncodedTensor(container, tuple(weights.shape), weights.dtype, n_kept, codebook, settings)


def encode_memory_bytes(n_weights: int, itemsize: int) -> int:
    """About how much memory :func:`encode_tensor` needs for a tensor (its pages included).

    Per weight: the values (``itemsize``; a float32 copy more for float16 and bfloat16),
    the keep-mask (1), the sorted kept values (at most 4), a symbol (at most 2) and the container (about 1).
    """
    return n_weights * (itemsize + (4 if itemsize != 4 else 0) + 8)


@dataclass
class EncodedTensor:
    """A compressed tensor held as its container only (see :func:`encode_tensor`).

    ``quantized``, ``mask`` and ``codes`` are those of :class:`CompressedTensor`,
    decoded from the container when asked for. ``container`` may be given as a
    function returning the bytes (the converter points it at the model's copy).
    """

    container_source: bytes | Callable[[], bytes]
    shape: tuple[int, ...]
    dtype: np.dtype
    n_kept: int
    codebook: np.ndarray
    settings: TensorSettings

    @property
    def container(self) -> bytes:
        """The container bytes."""
        source = self.container_source
        return source() if callable(source) else source

    @property
    def n_weights(self) -> int:
        """Number of elements of the tensor."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def size_bytes(self) -> int:
        """Size of the container."""
        return len(self.container)

    @property
    def original_size_bytes(self) -> int:
        """Size of the uncompressed tensor's data (elements times item size)."""
        return self.n_weights * np.dtype(self.dtype).itemsize

    @property
    def ratio(self) -> float:
        """Compression ratio, original_size_bytes / size_bytes."""
        return self.original_size_bytes / self.size_bytes

    @property
    def codes(self) -> np.ndarray:
        """int16 codes of the tensor's shape, ``-1`` pruned (decoded from the container)."""
        from onnx_dc.codec.container_reader import decode_container_codes

        return decode_container_codes(self.container)[0].astype(np.int16)

    @property
    def mask(self) -> np.ndarray:
        """Keep-mask (decoded from the container)."""
        return self.codes >= 0

    @property
    def quantized(self) -> np.ndarray:
        """The tensor the container decodes to."""
        from onnx_dc.codec.container_reader import decode_container

        return decode_container(self.container)


def _takes_fast_path(weights: object) -> bool:
    """float32 / float16 / bfloat16 arrays of at least one element go through the blockwise path."""
    if not isinstance(weights, np.ndarray) or weights.size == 0:
        return False
    dtype = weights.dtype
    return dtype.byteorder != ">" and dtype in (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def _fast_symbols(
    weights: np.ndarray, settings: TensorSettings, keep: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(code symbol per element with the zero symbol for pruned ones, codebook, flat keep-mask, symbol counts).

    The same codes and codebook as the whole-array pipeline of :func:`compress_tensor`.
    """
    dtype = weights.dtype
    flat = weights.reshape(-1)
    if dtype != np.float32:
        flat = flat.astype(np.float32)  # float16 and bfloat16 widen exactly
    _check_finite_blocks(flat)
    if keep is None:
        keep = _pruning_mask(flat, settings, magnitude_keep_mask)
    kept_sorted = flat[keep]
    kept_sorted.sort()
    centroids = kmeans_centroids_of_sorted32(
        kept_sorted, 2**settings.bits, init=settings.init, max_iter=settings.max_iter, seed=settings.seed
    )
    del kept_sorted
    candidates = _candidates_in_dtype(centroids, dtype)
    symbol_dtype = np.uint8 if candidates.size < 256 else np.uint16
    if candidates.size == 0:  # everything pruned
        return np.zeros(flat.size, dtype=symbol_dtype), candidates.astype(dtype), keep, np.array([flat.size])
    zero = candidates.size
    symbols = NearestValue(candidates).codes(flat, out=np.empty(flat.size, dtype=symbol_dtype))
    counts = np.zeros(zero + 1, dtype=np.int64)
    pruned = np.empty(min(BLOCK, flat.size), dtype=bool)
    for start in range(0, flat.size, BLOCK):
        part = symbols[start : start + BLOCK]
        np.logical_not(keep[start : start + BLOCK], out=pruned[: part.size])
        np.copyto(part, zero, where=pruned[: part.size])
        counts += np.bincount(part, minlength=zero + 1)
    used = counts[:zero] > 0
    if not used.all():  # a rounded centroid nobody is nearest to: drop it, renumber the symbols
        lookup = np.append(np.cumsum(used) - 1, used.sum()).astype(symbol_dtype)
        for start in range(0, flat.size, BLOCK):
            part = symbols[start : start + BLOCK]
            np.take(lookup, part, out=part)
        counts = np.append(counts[:zero][used], counts[zero])
    return symbols, candidates[used].astype(dtype), keep, counts


def _pruning_mask(weights: np.ndarray, settings: TensorSettings, by_magnitude: Callable) -> np.ndarray:
    """The keep-mask the settings ask for: ``by_magnitude(weights, sparsity)``, the std rule, or keep all."""
    if settings.sparsity is not None:
        return by_magnitude(weights, settings.sparsity)
    if settings.quality is not None:
        return prune_by_std(weights, settings.quality)
    return np.ones(weights.shape, dtype=bool)


def _candidates_in_dtype(centroids: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The sorted distinct float64 values of ``centroids`` rounded to ``dtype`` (see :func:`codebook_in_dtype`)."""
    with np.errstate(over="ignore"):
        rounded = np.asarray(centroids, dtype=np.float64).reshape(-1).astype(dtype).astype(np.float64)
    if not np.all(np.isfinite(rounded)):
        raise InvalidTensorError(f"centroids are not finite in {dtype} (NaN, Inf or beyond its range)")
    return np.unique(rounded + 0.0)  # + 0.0 turns -0.0 into +0.0


def _check_finite_blocks(flat: np.ndarray) -> None:
    n_bad = 0
    for start in range(0, flat.size, BLOCK):
        block = flat[start : start + BLOCK]
        n_bad += block.size - int(np.count_nonzero(np.isfinite(block)))
    if n_bad:
        raise InvalidTensorError(f"weights contain {n_bad} NaN or Inf value(s) out of {flat.size}")


def codebook_in_dtype(
    values: np.ndarray, centroids: np.ndarray, dtype: np.dtype | type
) -> tuple[np.ndarray, np.ndarray]:
    """The stored codebook for float64 ``centroids``, and the code of every value.

    The centroids are rounded to ``dtype``, ``-0.0`` is stored as ``+0.0``,
    equal values are merged, each value is assigned to the nearest codebook
    entry (ties to the smaller) and unused entries are dropped (see the module
    docstring).

    Args:
        values: the kept weights (any real dtype, flattened), finite.
        centroids: 1-D finite centroids, any order (e.g. k-means or refitted).
        dtype: one of :data:`SUPPORTED_DTYPES`.

    Returns:
        ``(codebook, codes)``: the strictly increasing codebook of ``dtype``
        and int16 codes of ``values``' flattened shape indexing it.

    Raises:
        InvalidTensorError: unsupported dtype, or values/centroids not finite, or
            centroids that overflow ``dtype``.
    """
    dtype = _check_dtype(np.dtype(dtype))
    values = np.asarray(values).reshape(-1)
    if values.size == 0:
        return np.empty(0, dtype=dtype), np.empty(0, dtype=np.int16)
    candidates = _candidates_in_dtype(centroids, dtype)
    codes = assign_to_centroids(values, candidates)
    used = np.bincount(codes, minlength=candidates.size) > 0
    if not np.all(used):
        new_index = np.cumsum(used) - 1
        codes = new_index[codes].astype(np.int16)
        candidates = candidates[used]
    return candidates.astype(dtype), codes.astype(np.int16, copy=False)


def compressed_tensor_from_codes(
    codes: np.ndarray, codebook: np.ndarray, settings: TensorSettings
) -> CompressedTensor:
    """Encode ``(codes, codebook)`` into a container and build the :class:`CompressedTensor`.

    Args:
        codes: integer array of the tensor's shape, ``-1`` for pruned elements,
            else an index into ``codebook``.
        codebook: 1-D array of the tensor's dtype (one of :data:`SUPPORTED_DTYPES`),
            finite, at most ``2**settings.bits`` values.
        settings: supplies ``bits``, ``index_bits`` and ``layout`` (recorded too).

    Returns:
        The :class:`CompressedTensor`; ``quantized`` is ``codebook[codes]`` with
        ``+0.0`` where ``codes == -1``, equal to the decoded container bit for bit.

    Raises:
        InvalidTensorError: as :func:`onnx_dc.codec.container.encode_container`.
        SettingsError: as :func:`onnx_dc.codec.container.encode_container`.
    """
    codebook = np.asarray(codebook)
    _check_dtype(codebook.dtype)
    container = encode_container(
        codes, codebook, bits=settings.bits, index_bits=settings.index_bits, layout=settings.layout
    )
    codes = np.asarray(codes).astype(np.int16)  # encode_container validated the range
    mask = codes >= 0
    quantized = np.zeros(codes.shape, dtype=codebook.dtype)  # +0.0 where pruned
    quantized[mask] = codebook[codes[mask]]
    return CompressedTensor(
        container=container, quantized=quantized, mask=mask, codebook=codebook, codes=codes, settings=settings
    )


# ---------------------------------------------------------------------------
# Validation


def _check_dtype(dtype: np.dtype) -> np.dtype:
    if dtype.byteorder == ">":
        dtype = dtype.newbyteorder("=")
    if dtype not in SUPPORTED_DTYPES:
        raise InvalidTensorError(
            f"unsupported tensor dtype {dtype}: expected float32, float16, float64 or bfloat16"
        )
    return dtype


def _check_weights(weights: np.ndarray) -> np.ndarray:
    if isinstance(weights, np.generic):  # a numpy scalar: a 0-d tensor
        weights = np.asarray(weights)
    if not isinstance(weights, np.ndarray):
        raise InvalidTensorError(f"weights must be a numpy array, got {type(weights).__name__}")
    dtype = _check_dtype(weights.dtype)
    weights = weights.astype(dtype, copy=False)  # native byte order
    finite = np.isfinite(weights)
    if not np.all(finite):
        n_bad = int(finite.size - np.count_nonzero(finite))
        raise InvalidTensorError(f"weights contain {n_bad} NaN or Inf value(s) out of {weights.size}")
    return weights


def _check_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise SettingsError(f"mask must be a bool array, got dtype {mask.dtype}")
    if mask.shape != shape:
        raise SettingsError(f"mask shape {mask.shape} does not match the tensor's shape {shape}")
    return mask


def _int_setting(name: str, value: object, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise SettingsError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise SettingsError(f"{name} must be {bound}, got {value}")
