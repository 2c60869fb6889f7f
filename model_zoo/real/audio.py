"""Real speech and other sounds for the audio models, and Whisper's log-mel features.

The recordings ship in the ``moonshine-voice`` 0.1.5 wheel (MIT; its wheels exist
only for ``manylinux_2_34_x86_64``), fetched and checksummed like the models. Four
are read speech (Dickens' *A Tale of Two Cities*, Beckett's *Endgame* and two
shorter clips), two are short interface sounds (no speech). They are assigned to
the calibration or the evaluation split once, here, so the splits never share a
recording.

:func:`log_mel` computes Whisper's input features (80 mel bands, 25 ms Hann windows
every 10 ms, 30 s of audio, log10 clamped to 8 decades below the maximum, scaled as
Whisper does) in numpy; :func:`mel_filters` is the Slaney-style mel filterbank (as
librosa computes it by default) written out from its definition.
"""

from __future__ import annotations

import io
import wave
from functools import lru_cache

import numpy as np

from onnx_dc.errors import CalibrationError, ModelError
from model_zoo.real.fetch import WheelFile, fetch_wheel_file

SAMPLE_RATE = 16000
WHISPER_SAMPLES = 30 * SAMPLE_RATE  # Whisper's fixed 30 s window
N_FFT = 400
HOP = 160
N_MELS = 80

_MOONSHINE = ("moonshine-voice", "0.1.5")
_PLATFORM = "manylinux_2_34_x86_64"
# name -> (sha256, size_bytes) of moonshine_voice/assets/<name>
_RECORDINGS: dict[str, tuple[str, int]] = {
    "two_cities.wav": ("f3348494d77cb74a02862f5e685ed09faf3e75832c5cc5c80703282c2cd8b52e", 4260326),
    "endgame_nagg_nell.wav": ("78f44dc6d3da32ecab0c37f391700f0569f4612b8e0be2ecbaf33e1d3d566474", 1357352),
    "beckett.wav": ("e5a26b3d29e5b0bc8dbd72c11d16a3808a4ec0ac45b21f12a27d2a2fe5c5ae61", 318978),
    "clone-test.wav": ("ff0313f1b99468ac425304ba7f8deada003efbada014863a475cb8bda87a6191", 131560),
    "error.wav": ("4eea6f6ca9dd0aa80b42aeddb8fcb729ff1ac7d47a972f204ca26569beeb5c3f", 96150),
    "success.wav": ("63daf79c8c55c8601775d456aac9f949ab1930155454ab14286818e9d956db4b", 96698),
}
# Speech per split: evaluation gets the longest reading (44 s), calibration the other three (42 s).
SPEECH: dict[str, tuple[str, ...]] = {
    "calib": ("endgame_nagg_nell.wav", "beckett.wav", "clone-test.wav"),
    "eval": ("two_cities.wav",),
}
# Non-speech sounds per split (one each).
SOUNDS: dict[str, tuple[str, ...]] = {"calib": ("success.wav",), "eval": ("error.wav",)}


def recording_file(name: str) -> WheelFile:
    """The :class:`WheelFile` of one recording in the moonshine-voice wheel."""
    try:
        sha256, size_bytes = _RECORDINGS[name]
    except KeyError:
        raise ModelError(f"unknown recording {name!r}; known: {', '.join(sorted(_RECORDINGS))}") from None
    return WheelFile(*_MOONSHINE, f"moonshine_voice/assets/{name}", sha256, size_bytes, platform=_PLATFORM)


@lru_cache(maxsize=None)
def load_recording(name: str) -> np.ndarray:
    """One recording as mono float32 samples in [-1, 1] at 16 kHz (read-only)."""
    data = fetch_wheel_file(recording_file(name)).read_bytes()
    with wave.open(io.BytesIO(data)) as reader:
        rate, channels, width = reader.getframerate(), reader.getnchannels(), reader.getsampwidth()
        frames = reader.readframes(reader.getnframes())
    if width != 2:
        raise ModelError(f"{name}: {8 * width}-bit samples; only 16-bit PCM is read")
    samples = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    samples = samples.reshape(-1, channels).mean(axis=1)
    samples = np.clip(resample(samples, rate, SAMPLE_RATE), -1.0, 1.0)  # the filter may overshoot full scale
    samples.setflags(write=False)
    return samples


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling (SciPy) from ``rate`` to ``target`` Hz."""
    if rate == target:
        return samples.astype(np.float32)
    from math import gcd

    from scipy.signal import resample_poly

    divisor = gcd(rate, target)
    return resample_poly(samples, target // divisor, rate // divisor).astype(np.float32)


def speech(split: str) -> list[np.ndarray]:
    """The speech recordings of ``split`` (16 kHz)."""
    _check_split(split)
    return [load_recording(name) for name in SPEECH[split]]


def sounds(split: str) -> list[np.ndarray]:
    """The non-speech sounds of ``split`` (16 kHz)."""
    _check_split(split)
    return [load_recording(name) for name in SOUNDS[split]]


def speech_window(split: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A random ``seconds``-long excerpt of the split's speech (recordings weighted by length)."""
    clips = speech(split)
    lengths = np.array([len(clip) for clip in clips], dtype=np.float64)
    clip = clips[rng.choice(len(clips), p=lengths / lengths.sum())]
    size = min(len(clip), int(round(seconds * SAMPLE_RATE)))
    start = int(rng.integers(0, len(clip) - size + 1))
    return np.array(clip[start:start + size], dtype=np.float32)


def coloured_noise(size: int, rng: np.random.Generator, colour: str) -> np.ndarray:
    """Unit-RMS white, pink (1/f power) or brown (1/f^2) noise."""
    white = rng.standard_normal(size)
    if colour == "white":
        noise = white
    else:
        spectrum = np.fft.rfft(white)
        frequencies = np.maximum(np.fft.rfftfreq(size), 1.0 / size)
        spectrum /= np.sqrt(frequencies) if colour == "pink" else frequencies
        noise = np.fft.irfft(spectrum, n=size)
    return (noise / max(float(np.sqrt(np.mean(noise ** 2))), 1e-12)).astype(np.float32)


@lru_cache(maxsize=None)
def mel_filters(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """Triangular mel filters ``[n_mels, n_fft // 2 + 1]`` on the Slaney mel scale, area-normalised.

    The Slaney scale is linear below 1 kHz (3 mel per 200 Hz) and logarithmic above
    (27 mel per factor 6.4); band edges are equally spaced in mel from 0 Hz to Nyquist,
    and each triangle is scaled by ``2 / (its width in Hz)``.
    """
    def to_mel(hz):
        hz = np.asarray(hz, dtype=np.float64)
        return np.where(hz < 1000.0, 3.0 * hz / 200.0, 15.0 + 27.0 * np.log(np.maximum(hz, 1e-9) / 1000.0) / np.log(6.4))

    def to_hz(mel):
        mel = np.asarray(mel, dtype=np.float64)
        return np.where(mel < 15.0, 200.0 * mel / 3.0, 1000.0 * np.exp((mel - 15.0) * np.log(6.4) / 27.0))

    edges = to_hz(np.linspace(to_mel(0.0), to_mel(sample_rate / 2.0), n_mels + 2))
    bins = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    rising = (bins[None, :] - edges[:-2, None]) / np.diff(edges)[:-1, None]
    falling = (edges[2:, None] - bins[None, :]) / np.diff(edges)[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


def log_mel(audio: np.ndarray) -> np.ndarray:
    """Whisper's features ``[80, 3000]`` (float32) of up to 30 s of 16 kHz audio (zero-padded to 30 s)."""
    padded = np.zeros(WHISPER_SAMPLES, dtype=np.float64)
    clip = np.asarray(audio, dtype=np.float64)[:WHISPER_SAMPLES]
    padded[: len(clip)] = clip
    # Centred frames (reflect padding of n_fft / 2 at both ends), periodic Hann window.
    framed_source = np.pad(padded, N_FFT // 2, mode="reflect")
    count = 1 + (len(framed_source) - N_FFT) // HOP
    frames = np.lib.stride_tricks.sliding_window_view(framed_source, N_FFT)[::HOP][:count]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2  # [frames, 201]
    mel = mel_filters().astype(np.float64) @ power[:-1].T  # Whisper drops the last frame -> 3000
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def _check_split(split: str) -> None:
    if split not in SPEECH:
        raise CalibrationError(f"unknown split {split!r}; use 'calib' or 'eval'")
