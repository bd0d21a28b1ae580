"""The one next-token loss: fine-tuning, its evaluation and the ablation check all score with it.

Convention (the only one in the package): a loss target is a *prediction position*.
``targets_BT[b, t]`` is True when the logits at position t are scored against the token
at t+1, i.e. when token t+1 is a real token inside the scope (the response, for
instruction tuning). `target_mask` builds that mask from a token-level scope; the last
column is always False, since the last position predicts nothing inside the row.

Axis letters: see `sparcom_jax.axes`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax


def target_mask(scope_BT, valid_BT):
    """bool [B, T]: True at t when token t+1 is a real token inside the scope.

    Works on numpy arrays (batches built on the host) and on jax arrays (inside a
    jitted step), returning the same kind.

    Args:
      scope_BT: bool [B, T], the tokens to predict (e.g. the response tokens).
      valid_BT: bool [B, T], real (non-padding) tokens.
    """
    next_BT = scope_BT[:, 1:] & valid_BT[:, 1:]
    xp = np if isinstance(next_BT, np.ndarray) else jnp
    return xp.concatenate([next_BT, xp.zeros((next_BT.shape[0], 1), bool)], axis=1)


def next_token_loss(logits_BTV, ids_BT, targets_BT):
    """Summed next-token cross-entropy per row over the target positions.

    Args:
      logits_BTV: float [B, T, V]; position t holds the prediction of token t+1.
      ids_BT: int [B, T] token ids.
      targets_BT: bool [B, T] prediction positions to score (`target_mask`); the
        last column is ignored.

    Returns:
      loss_B float32 [B]: sum over targets t of -log p(ids[t+1] | ids[<= t]).
      n_B float32 [B]: the number of targets per row.
    """
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV[:, :-1], ids_BT[:, 1:])
    on_BT = targets_BT[:, :-1]
    # where, not a product with the mask: a non-finite loss outside the targets must not leak in.
    return (jnp.where(on_BT, nll_BT, 0.0).sum(-1).astype(jnp.float32),
            on_BT.sum(-1, dtype=jnp.float32))
