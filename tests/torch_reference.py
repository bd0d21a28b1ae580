"""Counts computed the plain way: transformers (PyTorch) with forward hooks.

Independent of sparcom_jax: neurons are read from `act_fn` outputs, expert choice
from the router's top-k indices, expert neurons recomputed from the experts'
input and weights for the tokens routed to each expert.
"""

from __future__ import annotations

import numpy as np
import torch


def torch_counts(model, seqs, scopes=None, sums=False):
    """Returns dict: tokens [N], neuron_active [N,L,F], expert_routed [N,L,E], expert_neuron_active [N,L,E,G].

    With `sums` also neuron_act_sum [N,L,F] (act over counted tokens where act > 0),
    expert_weight_sum [N,L,E] (the router's softmax probability, before any
    renormalisation, over counted tokens routed to the expert) and
    expert_neuron_act_sum [N,L,E,G] (act over counted routed tokens where act > 0).
    """
    N = len(seqs)
    T = max(len(s) for s in seqs)
    ids = np.zeros((N, T), np.int64)
    valid = np.zeros((N, T), bool)
    scope = np.zeros((N, T), bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        valid[i, : len(s)] = True
        scope[i, : len(s)] = True if scopes is None else scopes[i]
    count = torch.tensor(scope & valid)
    out: dict[str, list] = {"neuron_active": [], "expert_routed": [], "expert_neuron_active": [],
                            "neuron_act_sum": [], "expert_weight_sum": [], "expert_neuron_act_sum": []}
    captured: dict = {}
    handles = []
    for li, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        if hasattr(mlp, "act_fn"):  # dense
            handles.append(mlp.act_fn.register_forward_hook(
                lambda m, i, o, li=li: captured.__setitem__(("dense", li), o.reshape(N, T, -1))))
            continue
        handles.append(mlp.gate.register_forward_hook(
            lambda m, i, o, li=li: captured.__setitem__(("idx", li), o[2].reshape(N, T, -1))))
        handles.append(mlp.gate.register_forward_hook(
            lambda m, i, o, li=li: captured.__setitem__(("logits", li), o[0].reshape(N, T, -1))))
        handles.append(mlp.experts.register_forward_hook(
            lambda m, i, o, li=li: captured.__setitem__(("x", li), i[0].reshape(N, T, -1))))
        if hasattr(mlp, "shared_expert"):
            handles.append(mlp.shared_expert.act_fn.register_forward_hook(
                lambda m, i, o, li=li: captured.__setitem__(("dense", li), o.reshape(N, T, -1))))
    with torch.no_grad():
        model(torch.tensor(ids), attention_mask=torch.tensor(valid.astype(np.int64)))
        for li, layer in enumerate(model.model.layers):
            if ("dense", li) in captured:
                act = captured[("dense", li)]
                on = (act > 0) & count[..., None]
                out["neuron_active"].append(on.sum(1))
                out["neuron_act_sum"].append(torch.where(on, act.double(), 0.0).sum(1))
            if ("idx", li) in captured:
                experts = layer.mlp.experts
                E = experts.gate_up_proj.shape[0]
                G = experts.gate_up_proj.shape[1] // 2
                chosen = torch.zeros(N, T, E, dtype=torch.bool)
                chosen.scatter_(2, captured[("idx", li)], True)
                routed = chosen & count[..., None]
                out["expert_routed"].append(routed.sum(1))
                probs = torch.softmax(captured[("logits", li)].double(), dim=-1)
                out["expert_weight_sum"].append(torch.where(routed, probs, 0.0).sum(1))
                x = captured[("x", li)]
                per_e, sum_e = [], []
                for e in range(E):
                    gate = x @ experts.gate_up_proj[e, :G].T  # [N, T, G]
                    act = experts.act_fn(gate)
                    on = (act > 0) & routed[..., e:e + 1]
                    per_e.append(on.sum(1))
                    sum_e.append(torch.where(on, act.double(), 0.0).sum(1))
                out["expert_neuron_active"].append(torch.stack(per_e, 1))
                out["expert_neuron_act_sum"].append(torch.stack(sum_e, 1))
    for h in handles:
        h.remove()
    res = {"tokens": (scope & valid).sum(1)}
    for k, v in out.items():
        if k.endswith("_sum") and not sums:
            continue
        res[k] = (torch.stack(v, 1).numpy().astype(np.float64 if k.endswith("_sum") else np.int64)
                  if v else None)
    return res
