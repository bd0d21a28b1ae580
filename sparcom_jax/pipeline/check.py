"""`selfcheck`: load a model (or build a tiny random one), run a forward and check it,
against transformers when it is installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparcom_jax.config import ConfigError
from sparcom_jax.pipeline.common import timed

_TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY_ARCHS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", intermediate_size=128, **_TINY),
    "mixtral": dict(model_type="mixtral", intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
                    **_TINY),
}


def selfcheck(path: str | None = None, *, model_type: str = "llama", dtype: str = "float32",
              compare: bool = True, seq_len: int = 16, atol: float = 1e-3) -> dict[str, Any]:
    """Load an HF directory (or build a tiny random model), run a forward, check it.

    Checks logits shape [B, T, V] and finiteness and, when torch and
    transformers are importable, compares the logits with transformers'.

    Returns:
      {"ok", "model", "shape", "finite", "max_abs_diff" (or None), "reference"}.
    """
    import tempfile

    import numpy as np

    from sparcom_jax.checkpoints.hf import load_model, save_model
    from sparcom_jax.models.config import ModelConfig
    from sparcom_jax.models.transformer import init_model

    tmp = None
    if path is None:
        if model_type not in TINY_ARCHS:
            raise ConfigError(f"selfcheck: unknown --model-type {model_type!r}; choose {', '.join(TINY_ARCHS)}")
        model = init_model(ModelConfig.from_hf_config(TINY_ARCHS[model_type]), seed=0, dtype=dtype)
        if compare:
            tmp = tempfile.TemporaryDirectory(prefix="sparcom-selfcheck-")
            path = save_model(model, Path(tmp.name) / "model")
        label = f"tiny random {model_type}"
    else:
        model = load_model(path, dtype=dtype)
        label = str(path)
    cfg = model.config
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(2, seq_len), dtype=np.int32)
    mask = np.ones_like(ids)
    mask[1, seq_len // 2:] = 0  # right padding on the second row
    with timed(f"selfcheck: forward of {label}"):
        logits = np.asarray(model(ids, mask))
    res: dict[str, Any] = {"model": label, "params": cfg.param_count(), "shape": list(logits.shape),
                           "finite": bool(np.isfinite(logits).all()), "max_abs_diff": None, "reference": None}
    res["shape_ok"] = res["shape"] == [2, seq_len, cfg.vocab_size]
    if compare and path is not None:
        try:
            import torch
            from transformers import AutoModelForCausalLM
        except ImportError:
            res["reference"] = "skipped (torch/transformers not installed)"
        else:
            with timed("selfcheck: transformers reference"):
                ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
                with torch.no_grad():
                    out = ref(input_ids=torch.from_numpy(ids.astype(np.int64)),
                              attention_mask=torch.from_numpy(mask.astype(np.int64))).logits.numpy()
            valid = mask.astype(bool)
            res["max_abs_diff"] = float(np.abs(out[valid] - logits[valid]).max())
            res["reference"] = "transformers"
    if tmp is not None:
        tmp.cleanup()
    tol = atol if dtype == "float32" else 0.1 * max(1.0, float(np.abs(logits).max()))
    res["ok"] = res["finite"] and res["shape_ok"] and (res["max_abs_diff"] is None or res["max_abs_diff"] <= tol)
    return res
