"""Dry run: the mesh a config resolves to and its memory plan, without reading weights.

    plan = memory_plan(cfg, "run", devices=8)
    print(format_plan(plan))
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sparcom_jax.config import ConfigError, ExperimentConfig
from sparcom_jax.pipeline.common import STAGES, fmt_bytes, fmt_count, identify_records, model_config, resolve_mesh

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "int32": 4}


def _abstract_mesh(data: int, model: int):
    """Something with `.shape` for the sharding rules; no devices needed."""
    try:
        from jax.sharding import AbstractMesh

        return AbstractMesh((data, model), ("data", "model"))
    except Exception:  # older / newer signatures: plain arithmetic is all the rules need
        import types

        return types.SimpleNamespace(shape={"data": data, "model": model})


def param_plan(mcfg, dtype: str, data: int, model: int, rules: str = "analysis") -> dict[str, Any]:
    """Parameter count, total bytes and bytes per device under the sharding rules.

    Uses `abstract_model` (jax.eval_shape): shapes only, no memory.
    """
    from flax import nnx

    from sparcom_jax.models.transformer import abstract_model
    from sparcom_jax.parallel.sharding import ANALYSIS_RULES, FSDP_RULES, logical_axes, spec_for

    table = FSDP_RULES if rules == "fsdp" else ANALYSIS_RULES
    mesh = _abstract_mesh(data, model)
    shape = dict(mesh.shape)
    m = abstract_model(mcfg, dtype=dtype)
    n = per_dev = 0
    sharded: set[str] = set()
    replicated: set[str] = set()
    for key, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
        size = math.prod(var.shape)
        n += size
        axes = logical_axes(key, var)
        spec = spec_for(axes, var.shape, mesh, table)
        split = 1
        for name, ax in zip(axes, spec, strict=True):
            if ax is not None:
                split *= shape[ax]
                if shape[ax] > 1:
                    sharded.add(f"{name}->{ax}")
            elif name and table.get(name) and shape.get(table[name], 1) > 1:
                replicated.add(name)
        per_dev += size / split
    item = _ITEMSIZE[dtype]
    return {"params": n, "dtype": dtype, "bytes": n * item, "bytes_per_device": per_dev * item,
            "params_per_device": per_dev, "sharded": sorted(sharded),
            "not_divisible": sorted(replicated - {s.split("->")[0] for s in sharded})}


def _n_instructions(cfg: ExperimentConfig) -> int | None:
    from sparcom_jax.categories import CATEGORIES

    if cfg.data.n_per_category is not None:
        return cfg.data.n_per_category * len(CATEGORIES)
    paths = cfg.data.path if isinstance(cfg.data.path, list) else [cfg.data.path]
    if all(p is None or Path(p).exists() for p in paths):
        return len(identify_records(cfg))  # a data file that cannot be used fails the dry run too
    return None


def memory_plan(cfg: ExperimentConfig, stage: str = "run", devices: int | None = None) -> dict[str, Any]:
    """Everything a dry run prints, as a dict (see `format_plan`).

    Args:
      cfg: the resolved config.
      stage: a stage name or "run".
      devices: device count to plan for (default mesh.devices, else the visible devices).
    """
    from sparcom_jax.stats.collect import count_fields

    n_dev, data, model = resolve_mesh(cfg.mesh, devices)
    specs = cfg.models()
    mcfg, source = model_config(specs[0], cfg)
    cnt = count_fields(mcfg)
    others = []
    for s in specs[1:]:
        try:
            c, _ = model_config(s, cfg)
            if c != mcfg:
                others.append(s.label)
        except ConfigError:
            pass
    weights = {s.label: bool(s.path and (Path(s.path) / "config.json").is_file()) for s in specs}
    L = mcfg.num_layers
    plan: dict[str, Any] = {
        "stage": stage, "experiment": cfg.name, "model_type": mcfg.model_type, "architecture_source": source,
        "models": [s.label for s in specs], "weights_present": weights, "architecture_differs": others,
        "mesh": {"devices": n_dev, "data": data, "model": model, "num_processes": cfg.mesh.num_processes,
                 "distributed": cfg.mesh.distributed or cfg.mesh.num_processes > 1},
        "param_count": mcfg.param_count(),
    }
    stages = STAGES if stage == "run" else (stage,)
    rows = []
    analysis = {"collect", "ablate"} & set(stages)
    if analysis:
        p = param_plan(mcfg, cfg.collect.dtype, data, model, "analysis")
        plan["params"] = p
        rows.append(("parameters (analysis, " + p["dtype"] + ")", f"{fmt_count(p['params'])}",
                     p["bytes"], p["bytes_per_device"]))
        p32 = param_plan(mcfg, "float32", data, model, "analysis")
        rows.append(("parameters (float32)", "", p32["bytes"], p32["bytes_per_device"]))
    if "finetune" in stages and (stage == "finetune" or cfg.finetuned is None):
        t = cfg.train
        t.check_mesh(data)  # the batch must split over the data axis
        t.check_model(mcfg.max_position_embeddings)
        p = param_plan(mcfg, "float32", data, model, "fsdp")
        opt = {"adamw": 2, "lion": 1, "sgd": 1}.get(t.optimizer, 2)
        state = p["bytes"] * (2 + opt)  # master weights + grads + optimizer moments, float32
        rows.append((f"training state (f32 params+grads+{opt} {t.optimizer} moments, FSDP)",
                     fmt_count(p["params"]), state, p["bytes_per_device"] * (2 + opt)))
        plan["train_params"] = p
        B = max(1, t.micro_batch_size // data)
        logits = B * t.max_length * mcfg.vocab_size * 4
        rows.append((f"logits+grad [B={B},T={t.max_length},V] f32 per device", "", logits * 2 * data, logits * 2))
        act = B * t.max_length * mcfg.hidden_size * _ITEMSIZE[t.compute_dtype] * L * 4
        rows.append(("saved activations ~4x[B,T,D] x L per device", "", act * data, act))
    if "collect" in stages:
        B = max(1, math.ceil(cfg.collect.batch_size / data))
        T = cfg.data.max_length
        it = _ITEMSIZE[cfg.collect.dtype]
        D, H = mcfg.hidden_size, mcfg.num_heads
        attn = B * max(1, H // model) * T * T * 4 * 2
        if mcfg.is_moe:
            ffn = B * T * mcfg.top_k * mcfg.moe_intermediate_size * 4 * 3 + B * T * mcfg.num_experts * 4
            ffn += B * T * mcfg.shared_expert_intermediate_size // model * it * 3
        else:
            ffn = B * T * mcfg.intermediate_size // model * it * 3
        rows.append((f"forward activations (one layer, B={B}/device, T={T})", "",
                     (B * T * D * it * 6 + attn + ffn) * data, B * T * D * it * 6 + attn + ffn))
        for name, shp in cnt.items():
            per = math.prod(shp) * 4
            rows.append((f"counts {name} [B,{','.join(_axis_names(name))}] int32", f"B={B}", per * B * data, per * B))
    store = None
    if {"collect", "identify", "evaluate", "compare", "report"} & set(stages):
        N = _n_instructions(cfg)
        per_instr = sum(math.prod(s) for s in cnt.values()) * 4 + 4
        store = {"n_instructions": N, "bytes_per_instruction": per_instr,
                 "fields": {k: list(v) for k, v in cnt.items()},
                 "bytes_per_model": None if N is None else per_instr * N,
                 "models": len(specs)}
        plan["count_store"] = store
    if {"identify", "evaluate", "compare", "report"} & set(stages):
        N = store["n_instructions"] if store else None
        U = max(math.prod(s) for s in cnt.values())
        chunk = cfg.identify.chunk
        host = chunk * U * 4
        sets = None if N is None else N * U  # bool S(I) while the instruction-level overlap is computed
        jac = None if N is None else N * N * 4
        plan["analysis_host"] = {"chunk_frequencies": host, "instruction_sets": sets, "instruction_matrix": jac}
    plan["rows"] = rows
    return plan


def _axis_names(field: str) -> tuple[str, ...]:
    return {"neuron_active": ("L", "F"), "expert_routed": ("L", "E"),
            "expert_neuron_active": ("L", "E", "G")}[field]


def format_plan(plan: dict[str, Any]) -> str:
    """The dry-run report as a readable table."""
    m = plan["mesh"]
    lines = [
        f"dry run: sparcom {plan['stage']} ({plan['experiment']}) — config valid, no weights read",
        "",
        f"  model type        {plan['model_type']} (from {plan['architecture_source']})",
        f"  parameters        {plan['param_count']:,} ({fmt_count(plan['param_count'])})",
        "  models            " + ", ".join(
            f"{n} ({'weights found' if ok else 'weights not present'})" for n, ok in plan["weights_present"].items()),
        f"  mesh              {m['devices']} devices = data {m['data']} x model {m['model']}"
        + (f", {m['num_processes']} processes" if m["num_processes"] > 1 else "")
        + (" (jax.distributed.initialize)" if m["distributed"] else ""),
    ]
    if plan["architecture_differs"]:
        lines.append(f"  note              architecture differs for {', '.join(plan['architecture_differs'])}")
    p = plan.get("params") or plan.get("train_params")
    if p:
        lines.append("  sharded axes      " + (", ".join(p["sharded"]) or "none (replicated)"))
        if p["not_divisible"]:
            lines.append("  replicated        " + ", ".join(p["not_divisible"]) + " (size not divisible by the axis)")
    if plan["rows"]:
        w = max(len(r[0]) for r in plan["rows"]) + 2
        lines += ["", f"  {'memory':<{w}}{'count':>10}{'total':>14}{'per device':>14}"]
        for name, count, total, per in plan["rows"]:
            lines.append(f"  {name:<{w}}{count:>10}{fmt_bytes(total):>14}{fmt_bytes(per):>14}")
    s = plan.get("count_store")
    if s:
        n = s["n_instructions"]
        lines += ["", "  count store (per model, int32; N instructions)"]
        for k, shp in s["fields"].items():
            lines.append(f"    {k:<22} N x {' x '.join(map(str, shp))}"
                         f"  = {fmt_bytes(math.prod(shp) * 4)} per instruction")
        tot = "N unknown" if n is None else f"N={n}: {fmt_bytes(s['bytes_per_model'])} per model, " \
                                            f"{fmt_bytes(s['bytes_per_model'] * s['models'])} for {s['models']} models"
        lines.append(f"    total                  {tot}")
    a = plan.get("analysis_host")
    if a:
        lines += ["", "  analysis (host memory)",
                  f"    frequency chunk        {fmt_bytes(a['chunk_frequencies'])}"]
        if a["instruction_sets"] is not None:
            lines.append(f"    instruction sets S(I)  {fmt_bytes(a['instruction_sets'])} (bool; /8 when packed)")
            lines.append(f"    instruction matrix     {fmt_bytes(a['instruction_matrix'])} (N x N float32)")
    return "\n".join(lines)
