"""Plain PyTorch definitions of the transformer models the zoo exports to ONNX.

Only :mod:`model_zoo.real.exporters` imports this module, and only when an ONNX file
has to be (re)built: importing it imports torch. onnx-dc itself never does. Each
``build_*`` function takes the weights as float32 numpy arrays (see
:mod:`model_zoo.real.weights_io`) in the original checkpoint's naming and returns a
module in eval mode whose forward pass is what the ONNX graph computes.

* :class:`BertSentenceEncoder`: BERT (post-LayerNorm, GELU) as in all-MiniLM-L6-v2,
  plus the sentence-transformers head: mean over the unmasked tokens, L2-normalised.
* :class:`LlamaCausalLM`: Llama (RMSNorm, rotary positions, grouped-query attention,
  SiLU-gated MLP) with the LM head tied to the token embedding, as SmolLM2; full
  causal attention, no key/value cache.
* :class:`WhisperEncoder` / :class:`WhisperDecoder`: Whisper's audio encoder (two
  convolutions, fixed sinusoidal positions, pre-LayerNorm blocks) and text decoder
  (learned positions, causal self-attention, cross-attention, tied output projection).

Tied output projections are ``x @ E.T``; the TorchScript exporter folds ``E.T`` into a
second, transposed initializer, which :func:`model_zoo.real.exporters.tie_transposed_copies`
removes again after export (the graph then reads the embedding itself through a
``Gemm`` with ``transB=1``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Weights = dict[str, np.ndarray]


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))


def _load(module: nn.Module, weights: dict[str, np.ndarray]) -> nn.Module:
    """Load ``weights`` (named as the module's own state dict) strictly and switch to eval mode."""
    module.load_state_dict({name: _tensor(value) for name, value in weights.items()}, strict=True)
    return module.eval()


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention over ``[batch, heads, length, head_dim]`` tensors, with an additive bias."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if bias is not None:
        scores = scores + bias
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.reshape(batch, length, heads, width // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


def _causal_bias(length: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(length, device=like.device)
    blocked = positions[None, :] > positions[:, None]
    return torch.where(blocked, torch.tensor(float("-inf")), torch.tensor(0.0))[None, None]


def _tied_projection(x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """Logits ``x @ embedding.T`` of an output projection tied to the token embedding."""
    return F.linear(x, embedding)


# --------------------------------------------------------------------------- BERT sentence encoder


class _BertLayer(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.attention_output = nn.Linear(width, width)
        self.attention_norm = nn.LayerNorm(width, eps=eps)
        self.intermediate = nn.Linear(width, hidden)
        self.output = nn.Linear(hidden, width)
        self.output_norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(layer(x), self.heads) for layer in (self.query, self.key, self.value))
        x = self.attention_norm(x + self.attention_output(_merge_heads(_attention(q, k, v, bias))))
        return self.output_norm(x + self.output(F.gelu(self.intermediate(x))))


class BertSentenceEncoder(nn.Module):
    """``(input_ids, attention_mask) -> (last_hidden_state, sentence_embedding)``; token type 0 throughout."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        width, eps = config["hidden_size"], config["layer_norm_eps"]
        self.word_embeddings = nn.Embedding(config["vocab_size"], width)
        self.position_embeddings = nn.Embedding(config["max_position_embeddings"], width)
        self.token_type_embeddings = nn.Embedding(config["type_vocab_size"], width)
        self.embedding_norm = nn.LayerNorm(width, eps=eps)
        self.layers = nn.ModuleList(
            _BertLayer(width, config["num_attention_heads"], config["intermediate_size"], eps)
            for _ in range(config["num_hidden_layers"])
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        x = self.embedding_norm(x)
        mask = attention_mask.to(x.dtype)
        bias = ((1.0 - mask) * torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        weights = mask[:, :, None]
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return x, F.normalize(pooled, p=2.0, dim=1)


def build_bert_sentence_encoder(weights: Weights, config: dict) -> BertSentenceEncoder:
    """A :class:`BertSentenceEncoder` from a Hugging Face ``BertModel`` checkpoint (pooler unused)."""
    renamed = {
        "word_embeddings.weight": weights["embeddings.word_embeddings.weight"],
        "position_embeddings.weight": weights["embeddings.position_embeddings.weight"],
        "token_type_embeddings.weight": weights["embeddings.token_type_embeddings.weight"],
        "embedding_norm.weight": weights["embeddings.LayerNorm.weight"],
        "embedding_norm.bias": weights["embeddings.LayerNorm.bias"],
    }
    parts = {
        "attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
        "attention.output.dense": "attention_output", "attention.output.LayerNorm": "attention_norm",
        "intermediate.dense": "intermediate", "output.dense": "output", "output.LayerNorm": "output_norm",
    }
    for name, value in weights.items():
        if name.startswith("encoder.layer."):
            index, rest = name[len("encoder.layer."):].split(".", 1)
            part, kind = rest.rsplit(".", 1)
            renamed[f"layers.{index}.{parts[part]}.{kind}"] = value
    return _load(BertSentenceEncoder(config), renamed)


# --------------------------------------------------------------------------- Llama causal LM


class _RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _LlamaBlock(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.attention_norm = _RMSNorm(width, eps)
        self.q_proj = nn.Linear(width, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, width, bias=False)
        self.mlp_norm = _RMSNorm(width, eps)
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        """Each of the ``kv_heads`` heads repeated for its group of query heads (``[b, kv, s, d] -> [b, heads, s, d]``)."""
        batch, kv_heads, length, head_dim = x.shape
        repeat = self.heads // self.kv_heads
        return x[:, :, None].expand(batch, kv_heads, repeat, length, head_dim).reshape(batch, kv_heads * repeat, length, head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.attention_norm(x)
        q = _split_heads(self.q_proj(h), self.heads)
        k = _split_heads(self.k_proj(h), self.kv_heads)
        v = _split_heads(self.v_proj(h), self.kv_heads)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        x = x + self.o_proj(_merge_heads(_attention(q, k, v, bias)))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class LlamaCausalLM(nn.Module):
    """``input_ids -> logits`` over the vocabulary at every position (full causal attention)."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        width, heads = config["width"], config["heads"]
        self.embed_tokens = nn.Embedding(config["vocab"], width)
        self.layers = nn.ModuleList(
            _LlamaBlock(width, heads, config["kv_heads"], config["hidden"], config["eps"]) for _ in range(config["layers"])
        )
        self.norm = _RMSNorm(width, config["eps"])
        head_dim = width // heads
        inverse = 1.0 / (config["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inverse_frequencies", inverse, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=x.device, dtype=torch.float32)
        angles = positions[:, None] * self.inverse_frequencies[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos()[None, None], angles.sin()[None, None]
        bias = _causal_bias(input_ids.shape[1], x)
        for layer in self.layers:
            x = layer(x, cos, sin, bias)
        return _tied_projection(self.norm(x), self.embed_tokens.weight)


def undo_gguf_rope_permutation(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's row order of Q/K projections (interleaved rotary pairs -> the two halves of each head)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def build_llama_from_gguf(tensors: Weights, metadata: dict) -> LlamaCausalLM:
    """A :class:`LlamaCausalLM` from dequantized GGUF tensors (llama.cpp names) and the file's metadata."""
    config = llama_config(metadata)
    weights = {"embed_tokens.weight": tensors["token_embd.weight"], "norm.weight": tensors["output_norm.weight"]}
    names = {
        "attn_norm": "attention_norm", "ffn_norm": "mlp_norm", "attn_q": "q_proj", "attn_k": "k_proj",
        "attn_v": "v_proj", "attn_output": "o_proj", "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
    }
    for index in range(config["layers"]):
        for gguf_name, ours in names.items():
            value = tensors[f"blk.{index}.{gguf_name}.weight"]
            if gguf_name == "attn_q":
                value = undo_gguf_rope_permutation(value, config["heads"])
            elif gguf_name == "attn_k":
                value = undo_gguf_rope_permutation(value, config["kv_heads"])
            weights[f"layers.{index}.{ours}.weight"] = value
    if "output.weight" in tensors:
        raise ValueError("this GGUF has a separate output matrix; only tied LM heads are supported")
    return _load(LlamaCausalLM(config), weights)


def llama_config(metadata: dict) -> dict:
    """The architecture numbers of a GGUF ``llama`` model."""
    return {
        "layers": metadata["llama.block_count"], "width": metadata["llama.embedding_length"],
        "hidden": metadata["llama.feed_forward_length"], "heads": metadata["llama.attention.head_count"],
        "kv_heads": metadata["llama.attention.head_count_kv"], "rope_theta": metadata["llama.rope.freq_base"],
        "eps": metadata["llama.attention.layer_norm_rms_epsilon"], "vocab": metadata["llama.vocab_size"],
    }


# --------------------------------------------------------------------------- Whisper


class _WhisperAttention(nn.Module):
    """Pre-LayerNorm attention with a residual; fused q/k/v (self) or q + fused k/v (cross)."""

    def __init__(self, width: int, heads: int, cross: bool) -> None:
        super().__init__()
        self.heads, self.cross = heads, cross
        self.norm = nn.LayerNorm(width)
        if cross:
            self.query = nn.Linear(width, width)
            self.key_value = nn.Linear(width, 2 * width)
        else:
            self.query_key_value = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(x)
        if self.cross:
            q = self.query(h)
            k, v = self.key_value(memory).chunk(2, dim=-1)
        else:
            q, k, v = self.query_key_value(h).chunk(3, dim=-1)
        heads = [_split_heads(t, self.heads) for t in (q, k, v)]
        return x + self.out(_merge_heads(_attention(*heads, bias)))


class _WhisperMLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class WhisperEncoder(nn.Module):
    """``mel [batch, 80, 3000] -> encoder_states [batch, 1500, width]``."""

    def __init__(self, width: int, heads: int, layers: int, mels: int = 80, frames: int = 1500) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(mels, width, 3, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.register_buffer("positional_table", torch.zeros(frames, width))
        self.attention = nn.ModuleList(_WhisperAttention(width, heads, cross=False) for _ in range(layers))
        self.mlp = nn.ModuleList(_WhisperMLP(width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)
        x = x + self.positional_table
        for attention, mlp in zip(self.attention, self.mlp):
            x = mlp(attention(x))
        return self.norm(x)


class WhisperDecoder(nn.Module):
    """``(tokens [batch, length], encoder_states) -> logits [batch, length, vocab]`` (no cache)."""

    def __init__(self, vocab: int, width: int, heads: int, layers: int, context: int = 448) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.zeros(context, width))
        self.self_attention = nn.ModuleList(_WhisperAttention(width, heads, cross=False) for _ in range(layers))
        self.cross_attention = nn.ModuleList(_WhisperAttention(width, heads, cross=True) for _ in range(layers))
        self.mlp = nn.ModuleList(_WhisperMLP(width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor, encoder_states: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        x = self.embedding(tokens) + self.positions[:length]
        bias = _causal_bias(length, x)
        for self_attention, cross_attention, mlp in zip(self.self_attention, self.cross_attention, self.mlp):
            x = mlp(cross_attention(self_attention(x, bias=bias), memory=encoder_states))
        return _tied_projection(self.norm(x), self.embedding.weight)


def _ct2_block(variables: Weights, prefix: str, ours: str, kind: str) -> dict[str, np.ndarray]:
    """One CTranslate2 attention or FFN block (``prefix`` like ``encoder/layer_0/ffn``) in our names."""
    out = {f"{ours}.norm.weight": variables[f"{prefix}/layer_norm/gamma"], f"{ours}.norm.bias": variables[f"{prefix}/layer_norm/beta"]}
    linears = {"self": ("query_key_value", "out"), "cross": ("query", "key_value", "out"), "ffn": ("fc1", "fc2")}[kind]
    for index, name in enumerate(linears):
        out[f"{ours}.{name}.weight"] = variables[f"{prefix}/linear_{index}/weight"]
        out[f"{ours}.{name}.bias"] = variables[f"{prefix}/linear_{index}/bias"]
    return out


def build_whisper(variables: Weights) -> tuple[WhisperEncoder, WhisperDecoder]:
    """Whisper's encoder and decoder from a CTranslate2 Whisper ``model.bin`` (fp16 values widened to float32)."""
    width = int(variables["encoder/conv1/weight"].shape[0])
    heads = int(variables["encoder/num_heads"])
    layers = sum(1 for name in variables if name.startswith("encoder/layer_") and name.endswith("ffn/linear_0/weight"))
    encoder_weights = {
        "conv1.weight": variables["encoder/conv1/weight"], "conv1.bias": variables["encoder/conv1/bias"],
        "conv2.weight": variables["encoder/conv2/weight"], "conv2.bias": variables["encoder/conv2/bias"],
        "positional_table": variables["encoder/position_encodings/encodings"],
        "norm.weight": variables["encoder/layer_norm/gamma"], "norm.bias": variables["encoder/layer_norm/beta"],
    }
    decoder_weights = {
        "embedding.weight": variables["decoder/embeddings/weight"],
        "positions": variables["decoder/position_encodings/encodings"],
        "norm.weight": variables["decoder/layer_norm/gamma"], "norm.bias": variables["decoder/layer_norm/beta"],
    }
    for i in range(layers):
        encoder_weights |= _ct2_block(variables, f"encoder/layer_{i}/self_attention", f"attention.{i}", "self")
        encoder_weights |= _ct2_block(variables, f"encoder/layer_{i}/ffn", f"mlp.{i}", "ffn")
        decoder_weights |= _ct2_block(variables, f"decoder/layer_{i}/self_attention", f"self_attention.{i}", "self")
        decoder_weights |= _ct2_block(variables, f"decoder/layer_{i}/attention", f"cross_attention.{i}", "cross")
        decoder_weights |= _ct2_block(variables, f"decoder/layer_{i}/ffn", f"mlp.{i}", "ffn")
    frames, mels = variables["encoder/position_encodings/encodings"].shape[0], variables["encoder/conv1/weight"].shape[1]
    encoder = _load(WhisperEncoder(width, heads, layers, mels=mels, frames=frames), encoder_weights)
    vocab, context = variables["decoder/embeddings/weight"].shape[0], variables["decoder/position_encodings/encodings"].shape[0]
    decoder = _load(WhisperDecoder(vocab, width, heads, layers, context=context), decoder_weights)
    return encoder, decoder
