"""Dry run: the mesh a config resolves to and its memory plan, without reading weights.

    plan = memory_plan(cfg, "run", devices=8)
    print(format_plan(plan))
"""

from __future__ import annotations

import functools
import math
import types
from pathlib import Path
from typing import Any

from sparcom_jax.config import ConfigError, ExperimentConfig
from sparcom_jax.console import fmt_bytes, fmt_count
from sparcom_jax.pipeline.common import (
    ablate_records, check_model_dirs, check_model_names, has_weights, identify_records, model_config, own_train_files,
    require_tokenizers, resolve_mesh, stages_run, template_for, train_records,
)

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "int32": 4}


def param_plan(mcfg, dtype: str, data: int, model: int, rules: str = "analysis") -> dict[str, Any]:
    """Parameter count, total bytes, and bytes per device (all, one layer's) under the sharding rules.

    Uses `abstract_model` (jax.eval_shape): shapes only, no memory.
    """
    from flax import nnx

    from sparcom_jax.models.transformer import abstract_model
    from sparcom_jax.parallel.sharding import ANALYSIS_RULES, FSDP_RULES, logical_axes, spec_for

    table = FSDP_RULES if rules == "fsdp" else ANALYSIS_RULES
    shape = {"data": data, "model": model}
    mesh = types.SimpleNamespace(shape=shape)  # all the sharding rules read of a mesh; no devices needed
    m = abstract_model(mcfg, dtype=dtype)
    n = per_dev = layer_dev = 0
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
        if axes[0] == "layers":
            layer_dev += size / split / mcfg.num_layers
    item = _ITEMSIZE[dtype]
    return {"params": n, "dtype": dtype, "bytes": n * item, "bytes_per_device": per_dev * item,
            "layer_bytes_per_device": layer_dev * item,
            "params_per_device": per_dev, "sharded": sorted(sharded),
            "not_divisible": sorted(replicated - {s.split("->")[0] for s in sharded})}


def count_activation_bytes(mcfg, dispatch, B: int, T: int, dtype: str, model: int = 1,
                           counting: bool = True) -> int:
    """Estimated bytes of the counting forward's temporaries for one [B, T] batch on one device
    (with `counting` False, of a forward that counts nothing, up to its final norm).

    The weights and the per-batch counts (their own plan rows) are not included. What
    one scanned layer holds at its peak, the larger of its attention and its FFN, plus
    what lives through the whole forward: the residual stream, the attention mask (the
    blocked attention's additive bias), and one layer's weights (a scan step may copy its
    slice of the stacked parameters; the expert loop and the tile scan, which take one
    expert's weights at a traced index, gather the layer's whole expert stack to every
    device of the model axis). Sizes follow the attention kernel and MoE strategy
    `dispatch` runs ("capacity" at its largest capacity, which every batch's buffers are
    allocated for), and the model axis (`model`) that splits heads, FFN neurons and
    experts. A data axis changes nothing but B: each device holds its own rows' buffers
    (an MoE layer routes and sorts each data shard's rows apart).
    XLA fuses elementwise work differently per backend, so this is an estimate: on CPU
    within 30% of the compiled program's own memory analysis for float32 models, on one
    device (tests/test_memory.py) and per device of a 4-device model axis and of data axes
    of 2 and 4 (tests/test_plan.py); the MoE strategies measured 0.74-1.12x (compiled /
    planned; B 4 and 8, T 128 and 300), 0.83-0.95x in the tests' cases.
    A shared expert is planned beside the routed experts' buffers, which XLA does not hold
    at once: where the two are of a size it plans too much (1.8x the compiled step for a
    shared FFN 8x an expert's on the capacity path, 8 experts; within 30% when either is
    the larger by far).

    Args:
      mcfg: the architecture; dispatch: the `Dispatch` the run uses; B: sequences per
      device; T: the padded length; dtype: compute dtype; model: the mesh's model axis;
      counting: plan `dispatch.moe_counting` and the counts' reducer, else `dispatch.moe_forward`.
    """
    it = _ITEMSIZE[dtype]
    D, d = mcfg.hidden_size, mcfg.head_dim
    H, K = max(1, mcfg.num_heads // model), max(1, mcfg.num_kv_heads // model)
    x = B * T * D * it
    # Attention: q, k, v and the output, and the float32 scores. The blocked attention
    # scores every query block against the keys up to its end (about half the T x T
    # matrix for long T) and holds the probabilities of some of them (XLA's schedule;
    # measured on CPU: about half), with an additive float32 mask; XLA's fused call
    # holds the whole matrix's scores, masked scores and probabilities; cuDNN's flash
    # attention holds no scores.
    scores, mask = 0, 0
    if dispatch.attention == "blocked":
        n = min(dispatch.attn_max_blocks, max(1, -(-T // dispatch.attn_block)))
        edges = [round(i * T / n) for i in range(n + 1)]
        scores = 1.5 * B * H * sum((b - a) * b for a, b in zip(edges[:-1], edges[1:])) * 4
        mask = B * T * T * 4
    elif dispatch.attention == "xla":
        scores = 3 * B * H * T * T * 4
    attention = x + B * T * (2 * H + 2 * K) * d * it + scores
    if mcfg.is_moe:
        ffn = x + _routed_bytes(mcfg, dispatch, B, T, it, model, counting)
        if mcfg.has_shared_expert:
            ffn += 3 * B * T * mcfg.shared_expert_intermediate_size // model * it
    else:
        ffn = x + 3 * B * T * mcfg.intermediate_size // model * it
    layer_weights = param_plan(mcfg, dtype, 1, model)["layer_bytes_per_device"]
    strategy = dispatch.moe_counting if counting else dispatch.moe_forward
    if mcfg.is_moe and strategy in ("looped", "tiled"):  # the experts a device lacks, gathered
        layer_weights += 3 * mcfg.num_experts * mcfg.hidden_size * mcfg.moe_intermediate_size * it * (model - 1) // model
    return int(x + mask + layer_weights + max(attention, ffn))


def _routed_bytes(mcfg, dispatch, B: int, T: int, it: int, model: int, counting: bool) -> int:
    """Bytes of the routed experts' buffers of a forward over B sequences of T tokens (one
    device's rows), `it` bytes an element; `counting`: as in `count_activation_bytes`."""
    E, G, k, D = mcfg.num_experts, mcfg.moe_intermediate_size, mcfg.top_k, mcfg.hidden_size
    M = B * T * k
    strategy = dispatch.moe_counting if counting else dispatch.moe_forward
    G_buf = 2 * G
    if strategy == "capacity":
        cap = max(min(M, -(-math.ceil(f * M / E) // 8) * 8) for f in dispatch.capacity_factors)
        buf_rows = E // model * cap
    elif strategy == "looped":  # its buffer holds the gate activations, not the up products
        buf_rows = M + E * dispatch.loop_tail + dispatch.loop_tile
        G_buf = G
    elif strategy == "tiled":  # the scan stacks each tile's gate activations, not its up products
        buf_rows = M + E * dispatch.scan_tile
        G_buf = G
    else:  # ragged_dot: the assignments themselves
        buf_rows = M
    # The routed rows in and out with their gate (and up) products, the rows in and
    # out in assignment order and their activations gathered back (the expert loop
    # works in place in its buffer), and the count reducer's operand.
    gathered = 0 if strategy == "looped" else M * (2 * D + G) * it
    reducer = M * G * (4 if dispatch.count_method == "segment" else 2)
    if strategy == "tiled":  # XLA reuses the scan's stacked activations for the reducer's operand
        gathered, reducer = M * (D + G) * it, 0
    if not counting and strategy in ("looped", "tiled"):  # they keep no activations, only the rows in and out
        gathered, reducer, G_buf = 2 * M * D * it, 0, 0
    return buf_rows * (2 * D + G_buf) * it + gathered + reducer


def loss_activation_bytes(mcfg, dispatch, B: int, T: int, dtype: str, model: int = 1) -> int:
    """Estimated bytes of the causal check's loss forward's temporaries for one [B, T] batch on
    one device: the larger of its body (`count_activation_bytes` of a forward that counts
    nothing) and the float32 logits with their log-probabilities, [B, T, V] each, split over
    the model axis with the vocabulary (XLA holds the two apart). Arguments as there."""
    body = count_activation_bytes(mcfg, dispatch, B, T, dtype, model, counting=False)
    V = mcfg.vocab_size
    return max(body, 2 * B * T * (V // model if V % model == 0 else V) * 4)


def _paths(path) -> list:
    """A data spec's path(s) as a list (None: the shipped set)."""
    return path if isinstance(path, list) else [path]


def _here(paths) -> bool:
    """Whether every data file of `paths` is on this machine (None: the shipped set is)."""
    return all(p is None or Path(p).exists() for p in paths)


def _tokenizer_here(spec) -> bool:
    """Whether the model's tokenizer can be read without its weights: its directory is here
    (`require_tokenizers` checked its tokenizer files), or it is a random `init` model."""
    return not spec.path or has_weights(spec)


def _n_instructions(cfg: ExperimentConfig, ablates: bool = False) -> tuple[int | None, str]:
    """(identify records the counts will hold, or None when unknown; where that came from).
    `ablates`: the stage runs the causal check, so its held-out part is checked too."""
    from sparcom_jax.categories import CATEGORIES

    paths = _paths(cfg.data.path)
    if _here(paths):
        # Records are cheap to read: a data file that cannot be used, or an identify part too
        # small for data.n_per_category, fails the dry run as it would fail the run.
        n = len(identify_records(cfg))
        if ablates:
            from sparcom_jax.data.records import check_responses

            check_responses(ablate_records(cfg))
        return n, f"{cfg.data.path or 'the shipped set'} (read and checked: {n} records to count)"
    absent = ", ".join(str(p) for p in paths if not Path(p).exists())
    note = f"{cfg.data.path} ({absent + ' ' if len(paths) > 1 else ''}not on this machine: not checked"
    if cfg.data.n_per_category is not None:  # plan for the sample
        n = cfg.data.n_per_category * len(CATEGORIES)
        return n, f"{note}; planned for {n} records, data.n_per_category x 6)"
    return None, f"{note}; record count unknown)"


def train_check(cfg: ExperimentConfig) -> str:
    """Refuse, as fine-tuning would before any compute, training records that train.max_length
    cuts before their response begins (`check_responses_cut`: with train.allow_cut_responses
    a warning), when the records and the base model's tokenizer are on this machine.

    Returns:
      What was checked, for the plan's "train data" line.
    """
    from sparcom_jax.pipeline.provenance import spec_tokenizer
    from sparcom_jax.pipeline.stages import train_config, train_encoding
    from sparcom_jax.train import check_responses_cut

    paths = _paths(cfg.data.path) + (_paths(cfg.train_data.path) if own_train_files(cfg) else [])
    absent = ", ".join(str(p) for p in paths if p is not None and not Path(p).exists())
    why = (f"{absent} not on this machine" if absent else
           None if _tokenizer_here(cfg.base) else f"the tokenizer of {cfg.base.label} is not on this machine")
    if why:
        return f"not checked ({why}): a record that train.max_length cuts before its response is refused when found"
    tcfg, records, tok = train_config(cfg), train_records(cfg), spec_tokenizer(cfg.base)
    check_responses_cut(train_encoding(tcfg, records, tok), records, tok, tcfg)
    return f"{len(records)} records (read and tokenized: responses checked against train.max_length={tcfg.max_length})"


def context_check(cfg: ExperimentConfig, stages: tuple[str, ...]) -> list[str]:
    """Refuse, as the run would, sequences longer than a model's context (`position_error`:
    collection refuses them, and the causal check's loss), when the records and the
    model's tokenizer are on this machine; else note what the run will check.

    Sequences are cut to data.max_length, so only a model whose max_position_embeddings is
    below it (or data.max_length null) has any to check: its records are encoded under every
    template it is counted with (`jobs_of`), the held-out ones under its own (`ablated_of`).

    Returns:
      Notes for the models that could not be checked here.
    """
    from sparcom_jax.data import encode_records
    from sparcom_jax.pipeline.stages import ablated_of, jobs_of
    from sparcom_jax.stats.losses import encode_held_out

    specs = cfg.models()
    parts = []
    if "collect" in stages:
        encode = functools.partial(encode_records, scope=cfg.data.scope)
        parts.append(("collect", identify_records, encode, [(j.spec, j.template) for j in jobs_of(cfg, specs)]))
    if "ablate" in stages and cfg.ablation.enabled:
        parts.append(("ablate", ablate_records, encode_held_out,
                      [(s, template_for(s, cfg)) for s in ablated_of(cfg, specs)]))
    notes = [_context_of(cfg, stage, records, encode, spec, template)
             for stage, records, encode, pairs in parts
             for spec, template in {(s.label, t): (s, t) for s, t in pairs}.values()]
    return list(dict.fromkeys(n for n in notes if n))


def _context_of(cfg: ExperimentConfig, stage: str, records, encode, spec, template: str) -> str | None:
    """`context_check` of one model under one template: raises the run's refusal, or returns
    a note when it cannot be checked here (None: nothing to check, or checked)."""
    import warnings

    from sparcom_jax.pipeline.provenance import spec_tokenizer
    from sparcom_jax.stats.runner import position_error

    m = cfg.data.max_length
    try:
        mcfg = model_config(spec, cfg)[0]
    except ConfigError:  # no architecture: the run refuses the model itself
        return None
    limit = mcfg.max_position_embeddings
    if m is not None and m <= limit:
        return None
    if not (_here(_paths(cfg.data.path)) and _tokenizer_here(spec)):
        return (f"data.max_length={m} is above the context of {spec.label} (max_position_embeddings={limit}): "
                f"the run refuses its records longer than {limit} tokens (not checked here: its tokenizer or "
                "the records are not on this machine)")
    with warnings.catch_warnings():  # truncation: the run reports it, once
        warnings.simplefilter("ignore")
        enc = encode(records(cfg), spec_tokenizer(spec), template=template, max_length=m)
    error = position_error(mcfg, enc.lengths, enc.record_ids)
    if error is not None:
        raise ConfigError(f"{stage} {spec.label} ({template} template): {error}")
    return None


def memory_plan(cfg: ExperimentConfig, stage: str = "run", devices: int | None = None) -> dict[str, Any]:
    """Everything a dry run prints, as a dict (see `format_plan`).

    Args:
      cfg: the resolved config.
      stage: a stage name or "run".
      devices: device count to plan for (default mesh.devices, else the visible devices).
    """
    from sparcom_jax.stats.collect import count_fields, result_nbytes

    n_dev, data, model = resolve_mesh(cfg.mesh, devices)
    if cfg.finetuned is not None:  # as the run checks them
        check_model_names(cfg)
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
    weights = {s.label: has_weights(s) for s in specs}
    stages = stages_run(stage)
    require_tokenizers(cfg, specs, stages)
    check_model_dirs(cfg, specs, stages, weights=False)  # (planned before the weights are downloaded)
    L = mcfg.num_layers
    plan: dict[str, Any] = {
        "stage": stage, "experiment": cfg.name, "model_type": mcfg.model_type, "architecture_source": source,
        "models": [s.label for s in specs], "weights_present": weights, "architecture_differs": others,
        "mesh": {"devices": n_dev, "data": data, "model": model, "num_processes": cfg.mesh.num_processes,
                 "distributed": cfg.mesh.distributed or cfg.mesh.num_processes > 1},
        "param_count": mcfg.param_count(),
    }
    rows = []
    if {"collect", "ablate"} & set(stages):
        from sparcom_jax.parallel.mesh import check_process_rows

        check_process_rows(n_dev, model, cfg.mesh.num_processes)
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
        plan["train_data"] = train_check(cfg)
        p = param_plan(mcfg, "float32", data, model, "fsdp")
        # Adam's two moments, Lion's one, SGD's momentum trace (none without momentum: make_optimizer)
        opt = {"adamw": 2, "lion": 1, "sgd": 1 if t.b1 > 0 else 0}.get(t.optimizer, 2)
        state = p["bytes"] * (2 + opt)  # master weights + grads + optimizer moments, float32
        rows.append((f"training state (f32 params+grads+{opt} {t.optimizer} moments, FSDP)",
                     fmt_count(p["params"]), state, p["bytes_per_device"] * (2 + opt)))
        plan["train_params"] = p
        B = max(1, t.micro_batch_size // data)
        logits = B * t.max_length * mcfg.vocab_size * 4
        rows.append((f"logits+grad [B={B},T={t.max_length},V] f32 per device", "", logits * 2 * data, logits * 2))
        act = B * t.max_length * mcfg.hidden_size * _ITEMSIZE[t.compute_dtype] * L * 4
        rows.append(("saved activations ~4x[B,T,D] x L per device", "", act * data, act))
    from sparcom_jax.models.dispatch import Dispatch

    dispatch = Dispatch.choose(cfg.collect.moe_impl, dtype=cfg.collect.dtype, head_dim=mcfg.head_dim)
    T = cfg.data.max_length
    if "collect" in stages:
        B = max(1, math.ceil(cfg.collect.batch_size / data))
        act = count_activation_bytes(mcfg, dispatch, B, T, cfg.collect.dtype, model)
        what = dispatch.moe_counting if mcfg.is_moe else "dense"
        rows.append((f"forward activations (counting, B={B}/device, T={T}, {what})", "", act * data, act))
        rows += count_rows(mcfg, B, T, cfg.collect.sums, data)
    if "ablate" in stages and cfg.ablation.enabled:
        # Each process runs its passes alone, on its own devices (`make_mesh(local=True)`).
        local = max(1, data // cfg.mesh.num_processes)
        B = max(1, math.ceil(cfg.ablation.batch_size / local))
        act = loss_activation_bytes(mcfg, dispatch, B, T, cfg.collect.dtype, model)
        what = dispatch.moe_forward if mcfg.is_moe else "dense"
        rows.append((f"forward activations (causal check, B={B}/device, T={T}, {what}, logits)", "", act * data, act))
    if {"collect", "identify", "evaluate", "compare", "ablate", "report"} & set(stages):
        N, plan["data"] = _n_instructions(cfg, ablates="ablate" in stages and cfg.ablation.enabled)
        # The store holds the float32 sums beside the counts when collect.sums is on.
        per_instr = result_nbytes(mcfg, 1, cfg.collect.sums)
        plan["count_store"] = {"n_instructions": N, "bytes_per_instruction": per_instr,
                               "fields": {k: list(v) for k, v in count_fields(mcfg, cfg.collect.sums).items()},
                               "bytes_per_model": None if N is None else per_instr * N, "models": len(specs)}
    plan["notes"] = context_check(cfg, stages)
    if {"identify", "evaluate", "compare", "report"} & set(stages) and N is not None:
        plan["analysis_host"] = analysis_plan(cfg, cnt, N, len(specs), stages, plan["count_store"])
    plan["rows"] = rows
    return plan


def analysis_plan(cfg: ExperimentConfig, unit_shapes: dict[str, tuple[int, ...]], n: int, models: int,
                  stages: tuple[str, ...], store: dict[str, Any]) -> dict[str, Any]:
    """Host memory of the analysis stages (`sparcom_jax.analysis.memory`), per process.

    The evaluate, compare and report stages analyse in full (bootstrap, permutations, the
    N x N instruction overlap); identify and ablate only identify. Every model's analysis is
    kept while the next one runs. In a multi-process run every process merges the counts of
    the model it analyses into memory (`merge_shares`: the merged arrays, while one process's
    share is read into them), beside the analysis.
    """
    full = bool({"evaluate", "compare", "report"} & set(stages))
    est = cfg.identify.analysis_memory(n, unit_shapes, full, models)
    procs = cfg.mesh.num_processes
    merged = 0 if procs == 1 else store["bytes_per_model"] + -(-store["bytes_per_model"] // procs)
    return {"full": full, "n_instructions": n, "models": models,
            "fields": {f: {k: v for k, v in fb.items() if k != "held"} for f, fb in est["fields"].items()},
            "peak_per_model": est["peak"], "kept_per_model": est["kept"], "peak": est["peak_all"],
            "merged_counts": merged, "processes": procs, "per_process": est["peak_all"] + merged}


def count_rows(mcfg, B: int, T: int, sums: bool, data: int) -> list[tuple[str, str, int, int]]:
    """The plan's rows of the counts (and sums) a collection leaves on each device: those of
    one counting step over B rows per device padded to T (`step_nbytes`: the counts in their
    transfer dtype, for every unit, since the step's outputs are split over the data axis only),
    for each of the batches in flight. The runner fetches a batch's counts PIPELINE_DEPTH
    batches after it dispatched it, so that many wait on the device beside the one counted.
    The tokens and non-finite flags they come with, B x (4 + L) bytes, are left out."""
    from sparcom_jax.stats.collect import step_dtypes, step_nbytes
    from sparcom_jax.stats.runner import PIPELINE_DEPTH

    flight = PIPELINE_DEPTH + 1
    nbytes = step_nbytes(mcfg, B, T, sums)
    rows = []
    for name, dtype in step_dtypes(mcfg, T, sums).items():
        per = nbytes[name] * flight
        rows.append((f"counts {name} [B,{','.join(_axis_names(name))}] {dtype.name}, {flight} batches in flight",
                     f"B={B}", per * data, per))
    return rows


_AXES = {"neuron_active": ("L", "F"), "expert_routed": ("L", "E"), "expert_neuron_active": ("L", "E", "G")}


def _axis_names(field: str) -> tuple[str, ...]:
    """The axes of a count field or of the sums beside it (`Counts.SUM_FIELDS`)."""
    from sparcom_jax.stats.counts import Counts

    return _AXES.get(field) or _AXES[{v: k for k, v in Counts.SUM_FIELDS.items()}[field]]


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
        + (f", {m['num_processes']} processes of {m['devices'] // m['num_processes']} devices each"
           if m["num_processes"] > 1 else "")
        + (" (jax.distributed.initialize)" if m["distributed"] else ""),
    ]
    if m["distributed"] and m["num_processes"] == 1:
        # On a TPU VM jax.distributed finds the hosts itself, so a config may leave the count at 1: the
        # plan then checks nothing of a host's share.
        lines.append("  processes         not planned (mesh.num_processes=1; jax.distributed finds them at run time): "
                     "set mesh.num_processes to the number of hosts (a v4-32 has 4, a v5e-32 8) to check that the "
                     "model axis stays within a host and to plan each host's merged counts")
    if plan.get("data"):
        lines.append(f"  data              {plan['data']}")
    if plan.get("train_data"):
        lines.append(f"  train data        {plan['train_data']}")
    lines += [f"  note              {n}" for n in plan.get("notes", ())]
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
        lines += ["", "  count store (per model, int32 counts, float32 sums; N instructions)"]
        for k, shp in s["fields"].items():
            lines.append(f"    {k:<22} N x {' x '.join(map(str, shp))}"
                         f"  = {fmt_bytes(math.prod(shp) * 4)} per instruction")
        tot = "N unknown" if n is None else f"N={n}: {fmt_bytes(s['bytes_per_model'])} per model, " \
                                            f"{fmt_bytes(s['bytes_per_model'] * s['models'])} for {s['models']} models"
        lines.append(f"    total                  {tot}")
    a = plan.get("analysis_host")
    if a:
        what = "bootstrap, permutations, N x N overlap" if a["full"] else "identification only"
        lines += ["", f"  analysis (host memory per process, N={a['n_instructions']}, {what})"]
        for f, fb in a["fields"].items():
            steps = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in fb.items() if k not in ("peak", "kept") and v)
            lines.append(f"    {f:<22} peak {fmt_bytes(fb['peak'])} ({steps}); keeps {fmt_bytes(fb['kept'])}")
        lines.append(f"    {a['models']} model(s)             peak {fmt_bytes(a['peak'])} "
                     f"(one model's peak beside the others' kept results)")
        if a["merged_counts"]:
            lines.append(f"    merged counts          {fmt_bytes(a['merged_counts'])} (one model's counts, "
                         f"every process; x the processes sharing a host)")
        lines.append(f"    total                  {fmt_bytes(a['per_process'])} per process")
    return "\n".join(lines)
