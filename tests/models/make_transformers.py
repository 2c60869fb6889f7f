"""Generate the small transformer test models under tests/models/ (run once; the tests only read the files).

    python tests/models/make_transformers.py            # writes every model beside this script

Two tiny architectures in plain torch (random weights, seeded), each exported
two ways, plus the BERT encoder through onnxruntime's transformer optimizer:

* ``bert_ts.onnx`` / ``bert_dynamo.onnx``: a 2-layer BERT-style encoder
  (word + position + token-type embedding Gathers, LayerNorm, self-attention
  with Q/K/V/O Linear layers and an additive padding mask, exact-GELU FFN),
  inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64,
  ``[batch, sequence]``), output ``hidden`` ``[batch, sequence, 16]``;
* ``gpt_ts.onnx`` / ``gpt_dynamo.onnx``: a 2-layer GPT-style decoder
  (pre-LayerNorm, fused QKV Linear split in three, causal mask, tanh-GELU FFN)
  whose LM head is tied to the token embedding (``logits = h @ wte.weight.T``),
  input ``input_ids``, output ``logits`` ``[batch, sequence, 96]``;
* ``gpt_ts_nofold.onnx``: the GPT exported with ``do_constant_folding=False``,
  so every Linear weight and the tied LM head reach their MatMul through a
  ``Transpose`` node (the head's shares ``wte.weight`` with the Gather);
* ``bert_ort_opt1.onnx`` / ``bert_ort_opt2.onnx``: ``bert_ts.onnx`` through
  ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert")`` at
  opt_level 1 and 2 (com.microsoft Attention, SkipLayerNormalization,
  EmbedLayerNormalization, BiasGelu/FastGelu where the optimizer fuses them).

``_ts`` files come from ``torch.onnx.export(dynamo=False)`` (TorchScript,
opset 17), ``_dynamo`` files from ``dynamo=True`` (opset 18); batch and
sequence are dynamic in all. Needs torch (the ``train`` extra) and, for
``dynamo=True``, onnxscript.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
HIDDEN, HEADS, FFN, LAYERS = 16, 2, 64, 2  # 16 x 16 = 256 elements: the smallest matrices compressed by default
BERT_VOCAB, GPT_VOCAB, MAX_POSITIONS = 100, 96, 16


class BertLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.output = nn.Linear(HIDDEN, HIDDEN)
        self.attention_norm = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.intermediate = nn.Linear(HIDDEN, FFN)
        self.ffn_output = nn.Linear(FFN, HIDDEN)
        self.output_norm = nn.LayerNorm(HIDDEN, eps=1e-12)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, HEADS, HIDDEN // HEADS).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(self.query(x)), self.heads(self.key(x)), self.heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HIDDEN // HEADS) + mask
        context = torch.matmul(torch.softmax(scores, dim=-1), v).permute(0, 2, 1, 3).contiguous()
        context = context.view(x.shape[0], x.shape[1], HIDDEN)
        x = self.attention_norm(self.output(context) + x)
        return self.output_norm(self.ffn_output(nn.functional.gelu(self.intermediate(x))) + x)


class Bert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(BERT_VOCAB, HIDDEN)
        self.position_embeddings = nn.Embedding(MAX_POSITIONS, HIDDEN)
        self.token_type_embeddings = nn.Embedding(2, HIDDEN)
        self.embedding_norm = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer() for _ in range(LAYERS))
        self.register_buffer("position_ids", torch.arange(MAX_POSITIONS).unsqueeze(0), persistent=False)

    def forward(self, input_ids, attention_mask, token_type_ids):
        positions = self.position_ids[:, : input_ids.shape[1]]
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings(token_type_ids)
        x = self.embedding_norm(x)
        mask = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * -10000.0
        for layer in self.layers:
            x = layer(x, mask)
        return x


class GptBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(HIDDEN)
        self.c_attn = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.c_proj = nn.Linear(HIDDEN, HIDDEN)
        self.ln_2 = nn.LayerNorm(HIDDEN)
        self.c_fc = nn.Linear(HIDDEN, FFN)
        self.mlp_proj = nn.Linear(FFN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(HIDDEN, dim=2)
        q, k, v = (t.view(batch, length, HEADS, HIDDEN // HEADS).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(HIDDEN // HEADS))
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        y = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).contiguous().view(batch, length, HIDDEN)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(nn.functional.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class Gpt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(GPT_VOCAB, HIDDEN)
        self.wpe = nn.Embedding(MAX_POSITIONS, HIDDEN)
        self.blocks = nn.ModuleList(GptBlock() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(HIDDEN)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.t()  # LM head tied to the token embedding


def _seeded(model: nn.Module, seed: int) -> nn.Module:
    """Random but fixed weights: normal(0, 0.2) matrices, LayerNorm scales near 1, small biases."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("norm.weight") or name.split(".")[-2].startswith("ln"):
                parameter.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("bias"):
                parameter.copy_(0.1 * noise)
            else:
                parameter.copy_(0.2 * noise)
    return model.eval()


def sample_inputs(kind: str, batch: int = 2, length: int = 7, seed: int = 0) -> dict:
    """Inputs for a model of ``kind`` (``bert`` or ``gpt``) as int64 torch tensors, padding in the second row."""
    generator = torch.Generator().manual_seed(seed)
    vocab = BERT_VOCAB if kind == "bert" else GPT_VOCAB
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    if kind == "gpt":
        return {"input_ids": ids}
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[1:, length - 2 :] = 0
    types = torch.zeros(batch, length, dtype=torch.int64)
    types[:, length // 2 :] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def export(model: nn.Module, kind: str, path: Path, *, dynamo: bool, fold: bool = True) -> None:
    inputs = sample_inputs(kind)
    names = list(inputs)
    output = "hidden" if kind == "bert" else "logits"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch, sequence = torch.export.Dim("batch", max=64), torch.export.Dim("sequence", max=MAX_POSITIONS)
            program = torch.onnx.export(
                model, tuple(inputs.values()), dynamo=True, opset_version=18, input_names=names, output_names=[output],
                dynamic_shapes={name: {0: batch, 1: sequence} for name in names}, external_data=False,
            )
            program.save(str(path), external_data=False)
        else:
            axes = {name: {0: "batch", 1: "sequence"} for name in names + [output]}
            torch.onnx.export(
                model, tuple(inputs.values()), str(path), dynamo=False, opset_version=17, input_names=names,
                output_names=[output], dynamic_axes=axes, do_constant_folding=fold,
            )


def optimize(source: Path, target: Path, opt_level: int) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(
        str(source), model_type="bert", num_heads=HEADS, hidden_size=HIDDEN, opt_level=opt_level, use_gpu=False
    )
    optimized.save_model_to_file(str(target))


def main(argv: list[str]) -> int:
    torch.manual_seed(0)
    bert, gpt = _seeded(Bert(), 1), _seeded(Gpt(), 2)
    for model, kind in ((bert, "bert"), (gpt, "gpt")):
        export(model, kind, HERE / f"{kind}_ts.onnx", dynamo=False)
        export(model, kind, HERE / f"{kind}_dynamo.onnx", dynamo=True)
    export(gpt, "gpt", HERE / "gpt_ts_nofold.onnx", dynamo=False, fold=False)
    for level in (1, 2):
        optimize(HERE / "bert_ts.onnx", HERE / f"bert_ort_opt{level}.onnx", level)
    for path in sorted(HERE.glob("*.onnx")):
        print(f"{path.name}: {path.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
