"""Shared pieces of the end-to-end examples and the training-step bench: Llama-style models built from a config
(nothing is downloaded) and a generated dataset of synthetic "languages" that a LoRA adapter can learn.

The dataset: task k has its own alphabet (a random quarter of the vocabulary) and its own successor rule, a random
cycle through that alphabet. Each sequence starts at a random letter; every next token is the rule's successor of
the previous one with probability `1 - noise`, else a uniformly random letter of the alphabet. So a model first
learns which tokens the task uses (the loss drops from ln V towards ln(V/4)), then the rule (down towards the
entropy floor `TaskLanguage.entropy`). Everything is drawn from seeded generators, so the data is the same on every
machine.

    cfg = llama_config("tiny")
    model = build_base(cfg, seed=0, device="cpu", dtype=torch.float32)
    task = TaskLanguage(k=0, vocab=cfg.vocab_size); x = task.sample(batch=4, seq=32, seed=1)   # [4, 32] int64
"""
from __future__ import annotations

import math

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # command-line names
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (hidden, layers, heads, intermediate, vocab). "1b" is the issue's ~1B-parameter Llama (TinyLlama-like
# widths, no GQA); "tiny" runs in seconds on a CPU, also through the Triton interpreter.
SIZES = {
    "tiny": (32, 2, 4, 64, 64),
    "small": (256, 4, 4, 704, 512),
    "1b": (2048, 16, 16, 5632, 32000),
}


def llama_config(size: str = "tiny", max_positions: int = 4096, **overrides):
    """A transformers LlamaConfig of one of `SIZES` (SDPA attention); keyword overrides win."""
    from transformers import LlamaConfig

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    hidden, layers, heads, inter, vocab = SIZES[size]
    kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
              intermediate_size=inter, vocab_size=vocab, max_position_embeddings=max_positions,
              tie_word_embeddings=False,
              # std 1/sqrt(hidden) at small widths: with transformers' 0.02, the frozen lm_head of a 32-wide model
              # cannot produce logits large enough for a low loss (the final RMSNorm bounds the hidden state)
              initializer_range=max(0.02, hidden ** -0.5))
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_base(config, seed: int, device, dtype: torch.dtype):
    """LlamaForCausalLM(config) with weights drawn from `seed` directly on `device`, cast to `dtype`, frozen.

    The same (config, seed, device type, dtype) gives the same weights, which is how the serving example rebuilds
    the base model the adapters were trained on without saving it.
    """
    from transformers import LlamaForCausalLM

    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


class TaskLanguage:
    """Synthetic task k over a vocabulary of `vocab` tokens (see the module docstring).

    alphabet: int64 [vocab // 4] (at least 2 letters); successor: int64 [vocab], successor[t] the rule's next
    token for a letter t (-1 for tokens outside the alphabet).
    """

    def __init__(self, k: int, vocab: int, noise: float = 0.1):
        if vocab < 8:
            raise ValueError(f"vocab must be >= 8, got {vocab}")
        g = torch.Generator().manual_seed(1000 + k)
        n = max(2, vocab // 4)
        self.k, self.vocab, self.noise = k, vocab, noise
        self.alphabet = torch.randperm(vocab, generator=g)[:n]
        order = self.alphabet[torch.randperm(n, generator=g)]  # the cycle: order[i] -> order[i + 1]
        self.successor = torch.full((vocab,), -1, dtype=torch.int64)
        self.successor[order] = order.roll(-1)

    @property
    def entropy(self) -> float:
        """The per-token loss floor (nats) of a perfect model of this language."""
        n = len(self.alphabet)
        p_rule = 1 - self.noise + self.noise / n
        p_other = self.noise / n
        return -(p_rule * math.log(p_rule) + (n - 1) * p_other * math.log(p_other))

    def sample(self, batch: int, seq: int, seed: int) -> torch.Tensor:
        """int64 [batch, seq] token sequences, the same for the same seed."""
        g = torch.Generator().manual_seed(seed * 7919 + self.k)
        n = len(self.alphabet)
        out = torch.empty(batch, seq, dtype=torch.int64)
        out[:, 0] = self.alphabet[torch.randint(0, n, (batch,), generator=g)]
        noise = torch.rand(batch, seq, generator=g) < self.noise
        random_letters = self.alphabet[torch.randint(0, n, (batch, seq), generator=g)]
        for t in range(1, seq):
            out[:, t] = torch.where(noise[:, t], random_letters[:, t], self.successor[out[:, t - 1]])
        return out

    def rule_accuracy(self, tokens: torch.Tensor, predicted: torch.Tensor) -> float:
        """Fraction of positions t where predicted[:, t] is the rule's successor of tokens[:, t]."""
        want = self.successor.to(tokens.device)[tokens]
        return float((predicted == want).float().mean())


def causal_lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` (a Hugging Face causal LM) on tokens [B, L], in fp32."""
    logits = model(input_ids=tokens).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten())
