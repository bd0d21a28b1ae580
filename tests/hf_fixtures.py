"""Tiny random Hugging Face checkpoints written by transformers itself (torch only in tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

# name -> (model_type, extra config). Every family and option the loader supports.
VARIANTS = {
    "llama": ("llama", {}),
    "llama3_rope": ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                                  rope_theta=500000.0)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "mistral_window": ("mistral", dict(sliding_window=4)),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(head_dim=16)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                    shared_expert_intermediate_size=40, norm_topk_prob=False)),
    "qwen2_moe_norm": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=40, norm_topk_prob=True)),
    "olmoe": ("olmoe", dict(num_experts=4, num_experts_per_tok=2, eos_token_id=2, pad_token_id=1)),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                    head_dim=16, norm_topk_prob=True)),
}
DENSE = [k for k, (mt, _) in VARIANTS.items() if "moe" not in mt and mt != "mixtral"]
MOE = [k for k in VARIANTS if k not in DENSE]


def make_torch_model(name: str, seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    mt, extra = VARIANTS[name]
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(mt, **{**COMMON, **extra})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    # Larger-than-default random weights so that mistakes change the logits visibly.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
            elif "norm" in pname:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
    return model


def write_checkpoint(name: str, path: Path, seed: int = 0, fused: bool = False) -> Path:
    """save_pretrained a tiny random model; `fused` writes the in-memory 3-D expert layout instead."""
    model = make_torch_model(name, seed)
    path.mkdir(parents=True, exist_ok=True)
    if fused:
        from safetensors.torch import save_file

        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(str(path))
    else:
        model.save_pretrained(str(path))
    return path


def batch_with_padding(vocab: int = 96, seed: int = 1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(3, 9)).astype(np.int64)
    mask = np.ones((3, 9), np.int64)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    return ids, mask


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())
