"""Tests of model_zoo.real.audio: the recordings, their split, noise and Whisper's log-mel features."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_dc.errors import CalibrationError, ModelError
from model_zoo.real import audio


def test_recordings_load_at_16_khz_and_splits_share_none():
    durations = {name: len(audio.load_recording(name)) / audio.SAMPLE_RATE for name in audio._RECORDINGS}
    assert durations["two_cities.wav"] == pytest.approx(44.37, abs=0.01)  # 48 kHz in the wheel, resampled
    assert durations["endgame_nagg_nell.wav"] == pytest.approx(28.28, abs=0.01)  # 24 kHz in the wheel
    for split in audio.SPEECH:
        assert all(clip.dtype == np.float32 and np.abs(clip).max() <= 1.0 for clip in audio.speech(split))
    assert not set(audio.SPEECH["calib"]) & set(audio.SPEECH["eval"])
    assert not set(audio.SOUNDS["calib"]) & set(audio.SOUNDS["eval"])
    with pytest.raises(CalibrationError, match="unknown split"):
        audio.speech("test")
    with pytest.raises(ModelError, match="unknown recording"):
        audio.recording_file("song.wav")


def test_speech_windows_come_from_the_split():
    rng = np.random.default_rng(0)
    window = audio.speech_window("eval", 3.0, rng)
    assert len(window) == 3 * audio.SAMPLE_RATE
    source = audio.load_recording("two_cities.wav")
    start = int(np.flatnonzero(np.isclose(source, window[0]))[0])
    assert any(np.array_equal(source[s:s + len(window)], window) for s in range(start, len(source) - len(window) + 1)
               if source[s] == window[0])


@pytest.mark.parametrize("colour", ["white", "pink", "brown"])
def test_coloured_noise_has_unit_rms_and_its_slope(colour):
    noise = audio.coloured_noise(1 << 14, np.random.default_rng(1), colour)
    assert np.sqrt(np.mean(noise ** 2)) == pytest.approx(1.0, rel=1e-5)
    power = np.abs(np.fft.rfft(noise)) ** 2
    low, high = power[10:100].mean(), power[4000:8000].mean()
    assert {"white": 0.3 < low / high < 3, "pink": low / high > 10, "brown": low / high > 1000}[colour]


def test_mel_filters_follow_the_slaney_scale():
    filters = audio.mel_filters()
    assert filters.shape == (80, 201) and filters.min() >= 0.0
    peaks = filters.argmax(axis=1)
    assert np.all(np.diff(peaks) >= 0)  # bands in increasing frequency
    widths = (filters > 0).sum(axis=1)
    assert widths[:10].max() <= 3 and widths[-1] > 10  # linear below 1 kHz, logarithmic above
    hz_per_bin = audio.SAMPLE_RATE / audio.N_FFT
    areas = filters.sum(axis=1) * hz_per_bin
    np.testing.assert_allclose(areas[20:], 1.0, rtol=0.1)  # each triangle scaled to unit area (Slaney norm)


def test_log_mel_matches_whispers_shape_and_scale():
    features = audio.log_mel(audio.load_recording("beckett.wav"))
    assert features.shape == (80, 3000) and features.dtype == np.float32
    assert features.max() - features.min() <= 2.0 + 1e-6  # clamped to 8 decades, divided by 4
    silent = audio.log_mel(np.zeros(16000, np.float32))
    assert np.all(silent == silent[0, 0])
    tone = audio.log_mel(np.sin(2 * np.pi * 440 * np.arange(16000) / 16000).astype(np.float32))
    band = int(tone[:, 10:90].mean(axis=1).argmax())
    centre = audio.mel_filters().argmax(axis=1)[band] * audio.SAMPLE_RATE / audio.N_FFT
    assert abs(centre - 440) < 60
    assert tone[:, 150:].max() == tone.min()  # the padded 29 s are silent: the floor
