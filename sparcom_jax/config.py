"""Typed experiment configs loaded from YAML, with ``key=value`` overrides.

    cfg = load_config("configs/llama2_7b.yaml", ["identify.eps=0.02", "mesh.devices=16"])
    dump_config(cfg, "runs/llama2_7b/config.yaml")

The schema is the dataclasses below; loading walks their fields with
`typing.get_type_hints`, so an unknown key or a value of the wrong type is an
error (`ConfigError`, a ValueError) that names the full dotted key, the file
and, for typos, the closest valid key. Loading a config reads no weights and
starts no device. The training section is `sparcom_jax.train.TrainConfig` itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Union

import yaml

from sparcom_jax.analysis.identify import IdentifyConfig
from sparcom_jax.errors import ConfigError
from sparcom_jax.train.config import TrainConfig


# --------------------------------------------------------------------------- #
# Schema
# --------------------------------------------------------------------------- #

def _check_min(spec: Any, minimum: int, *keys: str) -> None:
    """Refuse a value below `minimum` (None, where the type allows it, means "unset").

    Loading prefixes the section, so the message names the dotted key
    ("c.yaml: data.max_length must be >= 1, got 0"); dry runs fail on it too.
    """
    for k in keys:
        v = getattr(spec, k)
        if v is not None and v < minimum:
            raise ConfigError(f"{k} must be >= {minimum}, got {v}")


def _check_buckets(collect: Any, data: Any) -> None:
    """Refuse collect.buckets whose largest length is below data.max_length (as TrainConfig refuses
    its own): a record that long fits no bucket, and the run stopped at its first batch."""
    if collect.buckets and max(collect.buckets) < data.max_length:
        raise ConfigError(f"collect.buckets: the largest bucket ({max(collect.buckets)}) is below data.max_length="
                          f"{data.max_length}, so a record that long would fit none; add a bucket of "
                          f"{data.max_length}, or lower data.max_length")


_UNSET_VAR = re.compile(r"\$(\w+|\{[^}]*\})")


def _path(default: str | None = None) -> Any:
    """A field naming a file or directory (or a list of them). Loading expands it
    (`_expand_paths`), and it is left out of what the processes of a multi-host run must
    agree on (`to_dict(paths=False)`): each host may mount the files at its own path."""
    return dataclasses.field(default=default, metadata={"path": True})


def _expand_paths(spec: Any) -> None:
    """Expand `~` and environment variables ($VAR, ${VAR}) in the path fields (`_path`) of a
    frozen dataclass, as a shell would on the command line: written literally, `~/runs`
    became a directory named "~" under the current one. Relative paths stay relative to
    the current directory (not to the config file), as paths on the command line are.

    Raises:
      ConfigError: a variable is not set (naming the field and the variable).
    """
    for k in (f.name for f in dataclasses.fields(spec) if f.metadata.get("path")):
        value = getattr(spec, k)
        if value is None:
            continue
        expanded = []
        for v in value if isinstance(value, list) else [value]:
            if not isinstance(v, str):  # a wrong type: the loader names it
                expanded.append(v)
                continue
            out = os.path.expandvars(os.path.expanduser(v))
            unset = _UNSET_VAR.search(out)
            if unset:
                raise ConfigError(f"{k}: environment variable {unset.group(0)} in {v!r} is not set; set it "
                                  "(export NAME=...) or write the path out")
            expanded.append(out)
        object.__setattr__(spec, k, expanded if isinstance(value, list) else expanded[0])


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model of the comparison.

    Attributes:
      name: short name used in outputs (default: the directory name of `path`).
      path: local Hugging Face directory (config.json + *.safetensors).
      hub_id: where to download it from (documentation; nothing is downloaded).
      template: prompt template for this model ("plain" or "chat"); None = data.template.
      init: HF-style config dict of a randomly initialised model (tests, demo);
        used when `path` is not set.
      seed: seed of the random initialisation.
    """

    name: str | None = None
    path: str | None = _path()
    hub_id: str | None = None
    template: Literal["plain", "chat"] | None = None
    init: dict[str, Any] | None = None
    seed: int = 0

    def __post_init__(self):
        _expand_paths(self)

    @property
    def label(self) -> str:
        """The name used in outputs."""
        if self.name:
            return self.name
        if self.path:
            return Path(self.path).name
        return "model"


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Instruction data (see `sparcom_jax.data.load_instructions`).

    Attributes:
      path: instruction file(s) or a `datasets` directory; None = the shipped set.
      adapter: None (record format), a named adapter or "auto".
      fields: expected column -> column in the file.
      category_map: a label in the file -> the category it stands for (a name or short
        name of the six), for files that label categories their own way.
      n_per_category: balanced sample size per category; None = all records.
      seed: seed of the balanced sample.
      lenient: skip invalid records (with a report) instead of failing.
      template: default prompt template ("plain" or "chat").
      scope: counted tokens: "content" (default: the instruction and input text only,
        the same tokens under any template, so base and tuned models are counted on the
        same text), "prompt" (the formatted prompt, template tokens included, as in the
        paper), "response" or "all".
      max_length: sequences are cut to this many tokens.
      split: shares of the disjoint parts the records are cut into (stratified by
        category, near-duplicates kept together, and one instruction text under several
        categories too; see `sparcom_jax.data.splits`):
        "train" (fine-tuning, when the run fine-tunes on these records), "identify"
        (counts and identification; `n_per_category` samples from it) and "ablate"
        (the causal check's loss). The parts are the same whichever stage runs; a pair
        of published models needs no train part (e.g. {identify: 0.8, ablate: 0.2}).
        None: no split (every stage uses every record; the report says so).
      split_seed: seed of the split.
      group_by: which records are one group of near-duplicates, kept in one split part,
        drawn and shuffled together by the analysis (`sparcom_jax.data.splits.group_keys`):
        "near" (records of one category whose instructions' word sets, numbers alike,
        have a Jaccard >= group_threshold, joined through chains) or "text" (identical
        instruction text only, which leaves templated variants such as "... the mean
        ..." / "... the median ..." as independent records). Changing it changes the
        split: checkpoints tuned on another train part and counts grouped otherwise
        are refused.
      group_threshold: the "near" rule's Jaccard, in (0, 1].
    """

    path: str | list[str] | None = _path()
    adapter: str | None = None
    fields: dict[str, str] | None = None
    category_map: dict[str, str] | None = None
    n_per_category: int | None = None
    seed: int = 0
    lenient: bool = False
    template: Literal["plain", "chat"] = "plain"
    scope: Literal["content", "prompt", "response", "all"] = "content"
    max_length: int = 512
    split: dict[str, float] | None = dataclasses.field(
        default_factory=lambda: {"train": 0.5, "identify": 0.3, "ablate": 0.2})
    split_seed: int = 0
    group_by: Literal["near", "text"] = "near"
    group_threshold: float = 0.6

    def __post_init__(self):
        _expand_paths(self)
        if self.path is not None and (not self.path or (isinstance(self.path, list) and "" in self.path)):
            raise ConfigError(f"path: empty ({self.path!r}); name a data file or directory (or a list of them), "
                              "or null for the shipped set")
        if self.adapter not in (None, "auto"):
            from sparcom_jax.data.adapters import get_adapter

            try:  # here, not when the records are read, so that a dry run refuses it too
                get_adapter(self.adapter)
            except ValueError as e:
                raise ConfigError(f"adapter: {e}") from None
        from sparcom_jax.data.loaders import check_fields

        try:  # here too, so that a dry run without the data refuses it
            check_fields(self.fields, self.adapter)
        except ValueError as e:
            raise ConfigError(f"fields: {e}") from None
        from sparcom_jax.categories import normalize_category

        from sparcom_jax.data.records import label_map

        try:  # here too: a dry run refuses it before any record is read
            label_map(self.category_map)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for label, category in (self.category_map or {}).items():
            try:
                normalize_category(category)
            except ValueError as e:
                raise ConfigError(f"category_map: {label!r} -> {e}") from None
        if self.split is not None:
            unknown = sorted(set(self.split) - {"train", "identify", "ablate"})
            if unknown:
                raise ConfigError(f"split: unknown part(s) {unknown}; the parts are train, identify, ablate")
            if "identify" not in self.split:
                raise ConfigError("split: needs an 'identify' share")
            if any(v <= 0 for v in self.split.values()) or abs(sum(self.split.values()) - 1.0) > 1e-6:
                raise ConfigError(f"split: shares {self.split} must be > 0 and sum to 1")
        _check_min(self, 1, "n_per_category", "max_length")
        _check_min(self, 0, "seed", "split_seed")  # numpy's generators take no negative seed
        if not 0 < self.group_threshold <= 1:
            raise ConfigError(f"group_threshold: {self.group_threshold} is not a Jaccard in (0, 1]; the near-duplicate "
                              "rule joins records whose instructions' word sets overlap at least this much (e.g. 0.6)")


@dataclasses.dataclass(frozen=True)
class IdentifySpec(IdentifyConfig):
    """The identification rule (every field of `sparcom_jax.analysis.IdentifyConfig`,
    declared there once) and the analysis options below.

    Experiment configs keep exactly k units per instruction by default (`ties: break`,
    ties at the cut broken by mean activation on active tokens, which needs
    `collect.sums`): with ties kept, a short prompt's frequencies take few values, so
    its set grows past k and set sizes (and the overlaps built on them) follow prompt
    length. `ties: keep` is the paper's rule.

    Attributes:
      n_boot: bootstrap replicates (0 = none).
      n_perm: permutations of the diagonal test (0 = none).
      resample: what the bootstrap draws and the permutation test shuffles: "group"
        (records of a category sharing an instruction text move together; the
        records' group keys come from the count store or the records) or "record"
        (every record independent, which understates the spread and overstates the
        diagonal's significance when near-duplicates share a category).
      instruction_level: instruction x instruction overlap for all fields (true),
        none (false) or the listed count fields.
      contrast: also identify with the contrast rule (absolute `threshold` beside
        top-eps, or the reverse), under which the number of units can change.
      human: source prefix of the subset whose diagonal is reported beside the full
        set (near-duplicates are templated, not human-written); null = none.
      top_units: units listed per category with the instructions that activate them
        most (0 = none).
      top_per_unit: instructions listed per unit.
    """

    ties: Literal["keep", "break"] = "break"
    n_boot: int = 100
    n_perm: int = 999
    resample: Literal["group", "record"] = "group"
    instruction_level: bool | list[str] = True
    contrast: bool = True
    human: str | None = "human"
    top_units: int = 20
    top_per_unit: int = 5

    def __post_init__(self):
        try:  # the rule's own checks
            super().__post_init__()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _check_min(self, 0, "n_boot", "n_perm", "top_units", "top_per_unit")  # names the key and its value
        if not isinstance(self.instruction_level, bool):
            from sparcom_jax.analysis.common import SECTIONS

            # A misspelt field would silently drop that field's N x N overlap.
            unknown = [f for f in self.instruction_level if f not in SECTIONS]
            if unknown:
                raise ConfigError(f"instruction_level: unknown count field(s) {unknown}; use true, false or a "
                                  f"list of {', '.join(SECTIONS)}")

    def to_rule(self) -> IdentifyConfig:
        """The identification rule alone (what outputs record)."""
        return IdentifyConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(IdentifyConfig)})

    def analysis_options(self, full: bool, draws: bool = False) -> dict[str, Any]:
        """`analyze_model`'s options (but its seed) under these settings.

        Args:
          full: the whole analysis (evaluate, compare, report); else the sets alone
            (identify, ablate): no uncertainty, no instruction-level pass.
          draws: the sets alone, bootstrapped with the whole analysis' draws, with the
            instruction-level overlap (the same-template control: its comparisons get intervals
            paired with the models', and its diagonal dominance is a figure, not null).
        """
        common = dict(contrast=self.contrast, human=self.human, top_per_unit=self.top_per_unit)
        if not full:
            boot = dict(n_boot=self.n_boot, resample=self.resample) if draws else dict(n_boot=0)
            return dict(n_perm=0, instruction_level=draws and self.instruction_level, top_units=0, **boot, **common)
        return dict(n_boot=self.n_boot, n_perm=self.n_perm, resample=self.resample,
                    instruction_level=self.instruction_level, top_units=self.top_units, **common)

    def analysis_memory(self, n: int, unit_shapes: dict[str, tuple[int, ...]], full: bool,
                        models: int = 1) -> dict:
        """`sparcom_jax.analysis.memory.analysis_bytes` of `analyze_model` run with
        `analysis_options(full)` on N instructions (the dry run's plan, the benchmark's estimate).

        Args:
          n: instructions N.
          unit_shapes: {count field: unit shape}, in analysis order.
          full: as `analysis_options`.
          models: analyses held together.
        """
        from sparcom_jax.analysis.memory import analysis_bytes

        kw = self.analysis_options(full)
        return analysis_bytes(n, unit_shapes, models=models, n_boot=kw["n_boot"], n_perm=kw["n_perm"],
                              instruction_level=kw["instruction_level"], pooled=self.aggregation == "pooled",
                              strength=self.needs_strength, rules=1 + self.contrast + (self.ties == "break"),
                              chunk=self.chunk)


@dataclasses.dataclass(frozen=True)
class CollectSpec:
    """Count collection.

    Attributes:
      batch_size: sequences per forward (global, over the data axis).
      dtype: compute dtype ("float32" or "bfloat16").
      store: directory of the on-disk count stores; None = <out>/counts.
      buckets: padded sequence lengths (one compilation each); None = at most 8
        lengths fitted to the records' lengths for the least padding.
      moe_impl: expert dispatch of MoE models ("auto": capacity buffer on GPU,
        ragged_dot on TPU, expert loop on CPU; "grouped": tokamax's grouped matmuls
        when installed); every choice gives the same counts.
      template_control: when the tuned model's template differs from the base
        model's, also count the tuned model under the base model's template (the
        same-template control: what changes with the weights alone).
      sums: also collect the float32 activation sums beside the counts (the strength
        of each unit: the tie-break of identify.ties=break, and `Counts.mean_active`
        in Python; about 1-2% slower on CPU, and float32 arrays the size of the counts
        in the store). Counts collected with them serve a run without them (reused,
        read without the sums); not the other way.
      gate_dtype: "float32" computes the gate projections in float32 in a bfloat16
        model (only their sign decides the counts), with the weights kept in float32
        (over bf16 weights a float32 gate gives the bf16 signs exactly); null = the
        compute dtype. The rest of the forward (the residual stream) stays bfloat16.
        The causal check runs the model with the same dtype and gate dtype.
      precision_check: also count the last model in the other precisions (float32,
        bfloat16, bfloat16 with a float32 gate) and report how far each one's sets are
        from the float32 sets: what the chosen precision can support.
    """

    batch_size: int = 8
    dtype: Literal["float32", "bfloat16"] = "float32"
    store: str | None = _path()
    buckets: list[int] | None = None
    moe_impl: Literal["auto", "capacity", "grouped", "ragged", "tiled", "looped"] = "auto"
    template_control: bool = True
    sums: bool = True
    gate_dtype: Literal["float32"] | None = None
    precision_check: bool = False

    def __post_init__(self):
        _expand_paths(self)
        _check_min(self, 1, "batch_size")
        if self.buckets is not None and (not self.buckets or min(self.buckets) < 1):
            raise ConfigError(f"buckets must be null or a non-empty list of lengths >= 1, got {self.buckets}")


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Devices and processes.

    Attributes:
      devices: device count the plan is made for (dry runs); None = the real count.
      data: size of the data (batch) axis; None = devices / model.
      model: size of the model axis (neurons, experts, heads).
      num_processes: host processes of a multi-host run.
      coordinator: "host:port" of process 0 (None: auto-detected on TPU VMs).
      distributed: call `jax.distributed.initialize()` before anything else.
      init_timeout: seconds every process waits for all of them to join
        (`jax.distributed.initialize`); a process still missing then stops the others
        with a message saying what to check.
    """

    devices: int | None = None
    data: int | None = None
    model: int = 1
    num_processes: int = 1
    coordinator: str | None = None
    distributed: bool = False
    init_timeout: int = 300

    def __post_init__(self):
        _check_min(self, 1, "devices", "data", "model", "num_processes", "init_timeout")


@dataclasses.dataclass(frozen=True)
class AblationSpec:
    """Causal check.

    Attributes:
      enabled: run it (it needs the weights).
      n_random: random control sets per category (matched per layer on count and unit
        by unit on activation frequency, excluding the tested set); their spread is
        reported. The smallest Monte-Carlo p-value of "the set hurts more than its
        controls" is 1 / (1 + n_random): 19 reaches 0.05 for one category (10 never
        could); six categories at 0.05 / 6 need 119.
      max_records: reference responses per category used for the loss (from the
        "ablate" part of data.split); None = all of that part.
      batch_size: sequences per forward.
      kinds: "neurons" (dense or shared-expert neurons), "experts" (routed experts) and
        "expert_neurons" (neurons of routed experts); each where the model has them.
      model: which model to ablate: "base", "finetuned" or "both".
      neighbours: each unit of a tested set is replaced in a random control by one of
        the `neighbours` units of its layer (expert) nearest to it in activation
        frequency, outside the set (1 = the nearest: every draw nearly the same set).
      expert_mode: how experts are removed: "post" (default) zeroes their router
        probabilities after the softmax and takes the top-k of the rest, renormalised
        only as the model itself does, so tokens that never used them are untouched;
        "pre" removes them before the softmax (every token's weights rescale when
        the model does not renormalise, norm_topk_prob=false).
      mass_matched: for experts, also draw n_random random expert sets per category that
        drop on average as much routing mass on the category's held-out tokens as its set
        dropped in its own pass, layer by layer (`sparcom_jax.analysis.ablate.mass_matched_random`:
        each layer filled without over- or undershooting on average, each draw within one
        expert; they may hold more experts; drawn after the sets' passes). On by default: a frequency-matched draw cannot take the experts a set
        holds when they are their layers' busiest, so its excess mixes specificity with
        a larger disruption of the routing, and this control is the one that separates
        them. It costs n_random more passes per category and one baseline pass, for
        experts only (the neurons' checks have their own, `neuron_mass_matched`); false leaves it out.
      neuron_mass_matched: for neurons and expert neurons, the firing-mass-matched control:
        n_random random units per category outside the set, per layer (from any expert of
        the layer for expert neurons), whose firing frequencies on the category's records
        (`neuron_mass_source`) sum on average to the set's (the same `mass_fill` as the
        experts', each draw within one unit). "always" (default) for every category with a set; "where_warned" only for
        the categories whose frequency-matched draws fire less than 0.9 x the set (the
        matching warning); "never" leaves it out. It costs n_random passes per category it
        runs for, doubling the neurons' check; on by default because it changes conclusions
        where no frequency warning is given (the full demo's Llama: MATH's ISNs beat every
        frequency-matched draw, p = 0.05, but not the firing-mass-matched ones, p = 0.30;
        docs/analysis.md, "Firing-mass-matched control").
      neuron_mass_source: which records that control's firing is counted on: "held_out"
        (default: the category's held-out records, the ones its loss is measured on, on the
        token scope the sets were identified on, data.scope; counted in the unablated pass,
        which the check runs anyway) or "identification" (the counts the sets were chosen
        from: a set chosen for firing often there may fire less on new records, so its
        draws would be matched to a firing it does not have where the loss is measured).
      neuron_magnitude_matched: for neurons and expert neurons, beside the firing-mass-matched
        control (where it runs, with neuron_mass_source: held_out, which measures each unit's
        activation magnitude in the same unablated pass): n_random random units per category
        outside the set whose activation magnitude on the category's held-out records sums, per
        layer, on average to the set's (the same `mass_fill`, each unit valued at its magnitude).
        "always" (default) for every category that control runs for; "where_warned" only where
        the set carries more than 1.1 x its firing-mass-matched draws' magnitude (the magnitude
        warning); "never" leaves it out. Matched on firing, a set of strongly firing units removes
        more activation than its draws (the fast demo's Llama: 3.3-3.4 x), so that control cannot
        rule out "the set matters because its units fire strongly"; this one can. It costs
        n_random passes per category it runs for (docs/analysis.md, "Magnitude-matched control").
    """

    enabled: bool = True
    n_random: int = 19
    max_records: int | None = 20
    batch_size: int = 8
    kinds: list[Literal["neurons", "experts", "expert_neurons"]] = dataclasses.field(
        default_factory=lambda: ["neurons", "experts", "expert_neurons"])
    model: Literal["base", "finetuned", "both"] = "finetuned"
    neighbours: int = 2
    expert_mode: Literal["post", "pre"] = "post"
    mass_matched: bool = True
    neuron_mass_matched: Literal["always", "where_warned", "never"] = "always"
    neuron_mass_source: Literal["held_out", "identification"] = "held_out"
    neuron_magnitude_matched: Literal["always", "where_warned", "never"] = "always"

    def __post_init__(self):
        _check_min(self, 0, "n_random")
        _check_min(self, 1, "max_records", "batch_size", "neighbours")


@dataclasses.dataclass(frozen=True)
class ReportSpec:
    """The report directory.

    Attributes:
      title: page title (default: the experiment name).
      dpi: figure resolution.
    """

    title: str | None = None
    dpi: int = 100

    def __post_init__(self):
        _check_min(self, 1, "dpi")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One comparison: a base model, its fine-tuned model and optional checkpoints between.

    Attributes:
      name: experiment name.
      out_dir: output directory ("--out" overrides it).
      base: the model before fine-tuning.
      finetuned: the model after fine-tuning (None: only the base is analysed,
        or `finetune` produces it).
      series: intermediate checkpoints in training order (between base and finetuned).
      architecture: the published config.json fields of the pair; used when the
        weights are not there (dry runs, memory plans) and checked against them
        when they are.
      data: the instructions analysed.
      train_data: the fine-tuning records (None: every record of `data`, unsampled).
      identify, collect, mesh, train, ablation, report: the stages' settings.
      seed: global seed.
    """

    name: str
    out_dir: str | None = _path()
    base: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    finetuned: ModelSpec | None = None
    series: list[ModelSpec] = dataclasses.field(default_factory=list)
    architecture: dict[str, Any] | None = None
    data: DataSpec = dataclasses.field(default_factory=DataSpec)
    train_data: DataSpec | None = None
    identify: IdentifySpec = dataclasses.field(default_factory=IdentifySpec)
    collect: CollectSpec = dataclasses.field(default_factory=CollectSpec)
    mesh: MeshSpec = dataclasses.field(default_factory=MeshSpec)
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(template="chat"))
    ablation: AblationSpec = dataclasses.field(default_factory=AblationSpec)
    report: ReportSpec = dataclasses.field(default_factory=ReportSpec)
    seed: int = 0

    def __post_init__(self):
        _expand_paths(self)
        _check_min(self, 0, "seed")
        _check_buckets(self.collect, self.data)
        if self.identify.ties == "break" and not self.collect.sums:
            raise ConfigError("identify.ties=break breaks ties by activation strength, which needs "
                              "collect.sums=true; set it, or identify.ties=keep")
        if self.train.mesh_data is not None or self.train.mesh_model != 1:
            raise ConfigError("train.mesh_data / train.mesh_model: the mesh is set once, in the mesh: section "
                              "(mesh.data, mesh.model), for every stage; remove them from train:")

    def models(self) -> list[ModelSpec]:
        """Every model in order: base, series..., finetuned."""
        return [self.base, *self.series] + ([self.finetuned] if self.finetuned else [])


@dataclasses.dataclass(frozen=True)
class DemoPair:
    """One tiny model pair of the demo.

    Attributes:
      name: prefix of its checkpoints ("<name>-base", "<name>-step<k>", "<name>-chat").
      architecture: HF-style config dict; vocab_size null = the shipped tokenizer's size.
    """

    name: str
    architecture: dict[str, Any]


def _demo_pairs() -> list[DemoPair]:
    common = dict(vocab_size=None, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, hidden_act="silu", max_position_embeddings=512,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    return [
        DemoPair("llama", dict(model_type="llama", intermediate_size=384, **common)),
        DemoPair("mixtral", dict(model_type="mixtral", intermediate_size=192, num_local_experts=8,
                                 num_experts_per_tok=2, **common)),
    ]


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The embedded end-to-end demo (`sparcom demo`): tiny models, shipped data.

    Attributes:
      out_dir: output directory.
      pairs: the model pairs (default: a tiny Llama and a tiny Mixtral-style MoE).
      pretrain: the brief plain-text pre-training that makes the "before" model.
      finetune: the instruction fine-tuning that makes the "after" model.
      data: the instructions analysed (the shipped set).
      identify, collect, ablation, report: as in ExperimentConfig.
      fast: shrink everything (tests): a few steps, few instructions.
      seed: global seed.
    """

    out_dir: str | None = _path("runs/demo")
    pairs: list[DemoPair] = dataclasses.field(default_factory=_demo_pairs)
    pretrain: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        total_steps=150, batch_size=16, learning_rate=3e-3, warmup_steps=15, max_length=128,
        buckets=(128,), template="plain", save_every=150, keep_last=1, async_checkpointing=False))
    finetune: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        total_steps=90, batch_size=16, learning_rate=1e-3, warmup_steps=10, max_length=256,
        buckets=(128, 256), template="chat", save_every=30, keep_last=10, async_checkpointing=False))
    # finetune.max_length 256, not 128: at 128 the chat template cut 21 of the 31 SUM training
    # records before their response began (trained on nothing), so "after" was barely tuned on SUM.
    # Two buckets: most records fit 128, and one bucket of 256 made fine-tuning ~2x slower.
    # 256: the shipped SUM prompts run to ~190 tokens; at 128 five of the eight held-out SUM
    # records kept no response token, so SUM's causal-check loss rested on three.
    data: DataSpec = dataclasses.field(default_factory=lambda: DataSpec(
        n_per_category=16, max_length=256))
    identify: IdentifySpec = dataclasses.field(default_factory=lambda: IdentifySpec(
        eps=0.05, eps_experts=0.1, n_boot=20, n_perm=199))
    collect: CollectSpec = dataclasses.field(default_factory=lambda: CollectSpec(
        batch_size=16, buckets=[128, 256], precision_check=True))
    ablation: AblationSpec = dataclasses.field(default_factory=lambda: AblationSpec(
        max_records=8, batch_size=16))
    report: ReportSpec = dataclasses.field(default_factory=lambda: ReportSpec(title="sparcom demo"))
    fast: bool = False
    seed: int = 0

    def __post_init__(self):
        _expand_paths(self)
        _check_buckets(self.collect, self.data)


# --------------------------------------------------------------------------- #
# Generic typed loading
# --------------------------------------------------------------------------- #

def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):  # a section: its keys, not the class's name
        return f"a mapping of keys ({', '.join(f.name for f in dataclasses.fields(tp))})"
    if isinstance(tp, type) and not typing.get_args(tp):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
                "dict": "mapping", "list": "list"}.get(tp.__name__, tp.__name__)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is Any:
        return "anything"
    return str(tp)


def _join(key: str, sub: Any) -> str:
    return f"{key}.{sub}" if key else str(sub)


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, tp: Any, key: str, src: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (dataclasses built)."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error is the precise one
            return _coerce(value, options[0], key, src)
        for a in options:
            try:
                return _coerce(value, a, key, src)
            except ConfigError:
                pass
        raise _type_error(key, tp, value, src)
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ConfigError(f"{src}: {key}: expected {_type_name(tp)}, got {value!r}"
                          + _suggest(value, [a for a in args if isinstance(a, str)]))
    if origin in (list, tuple):  # tuple[X, ...]: args[0] is X too
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value, src)
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, f"{key}[{i}]", src) for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _type_error(key, tp, value, src)
        vt = args[1] if args else Any
        out = {}
        for k, v in value.items():
            name = _key_text(k, key, src)
            if name in out:
                raise ConfigError(f"{src}: {key}: two keys are both {name!r} (one written as a number, one as text); "
                                  "keep one")
            out[name] = _coerce(v, vt, _join(key, name), src)
        return out
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _type_error(key, tp, value, src)
        return _build(tp, value, key, src)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, tp, value, src)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(key, tp, value, src)
    if isinstance(tp, type) and isinstance(value, tp):  # bool, str and other plain types
        return value
    raise _type_error(key, tp, value, src)


def _key_text(k: Any, key: str, src: str) -> str:
    """A mapping's key as the text it names: YAML reads an unquoted 0 or 2.0 as a number (here "0",
    "2", as a data file's number label is read), and unquoted yes/no/on/off/true/false, null and
    dates as no text at all (refused with the fix: `str` gave "True", which no file's label is).
    The same reading as a data file's cells (`sparcom_jax.data.records._as_text`)."""
    from sparcom_jax.data.records import _as_text

    text = _as_text(k)
    if text is not None:
        return text
    raise ConfigError(f"{src}: {key}: the key {k!r} ({type(k).__name__}) is not text: YAML reads unquoted "
                      "yes/no/on/off/true/false, null and dates as such; quote it as the data writes it "
                      "(e.g. 'yes': code, not yes: code)")


def _type_error(key: str, tp: Any, value: Any, src: str) -> ConfigError:
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    return ConfigError(f"{src}: {key}: expected {_type_name(tp)}, got {shown} "
                       f"({type(value).__name__})")


def _build(cls: type, data: dict, prefix: str, src: str):
    """Build dataclass `cls` from a mapping, checking every key and type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if k not in fields:
            raise _unknown_key(src, prefix, k, list(fields))
        default = _default(fields[k])
        if isinstance(v, dict) and dataclasses.is_dataclass(default):
            v = _overlay(default, v)  # a partial section keeps the other defaults
        kwargs[k] = _coerce(v, hints[k], _join(prefix, k), src)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{src}: missing required key {_join(prefix, name)!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ checks name the field first
        err = ConfigError(f"{src}: {prefix + '.' if prefix else ''}{e}")
        err.cross_field = True  # may be fixed by a later override
        raise err from None


def _unknown_key(src: str, prefix: str, key: str, valid: list[str], homes: list[str] | None = None) -> ConfigError:
    """The error for `key` of section `prefix`, which has only the keys `valid`: with the closest
    valid key and the sections of the whole schema that have `key` (`homes`, `_homes`). The
    parts ride on the error (`unknown`): from_dict, which knows the schema, adds the homes."""
    homes_hint = f" (did you mean {' or '.join(homes)}?)" if homes else ""
    err = ConfigError(f"{src}: unknown key {_join(prefix, key)!r}{_suggest(key, valid)}{homes_hint}; "
                      f"valid keys{' of ' + repr(prefix) if prefix else ''}: {', '.join(valid)}")
    err.unknown = (src, prefix, key, valid)
    return err


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _overlay(default: Any, new: dict) -> dict:
    """`new` over the values of the dataclass `default`: a section (a dataclass field)
    merges key by key, any other value is replaced whole, a mapping such as
    `data.split` included (its default parts must not leak into the one given)."""
    out = to_dict(default)
    for k, v in new.items():
        sub = getattr(default, k, None)
        out[k] = _overlay(sub, v) if isinstance(v, dict) and dataclasses.is_dataclass(sub) else v
    return out


def from_dict(cls: type, data: dict, source: str = "config") -> Any:
    """Build the dataclass `cls` from a plain mapping (as YAML gives it).

    Raises:
      ConfigError: on an unknown key, a missing required key or a wrong type,
        naming the dotted key and `source`.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return _build(cls, data, "", source)
    except ConfigError as e:
        src, prefix, key, valid = getattr(e, "unknown", (None, "", None, None))
        homes = _homes(cls, prefix, key)
        if not homes:
            raise
        raise _unknown_key(src, prefix, key, valid, homes) from None


def _homes(cls: type, prefix: str, key: str | None) -> list[str]:
    """The dotted names `key` has in the other sections of `cls` (and at its top level): a
    key written in the wrong section (`ablation.n_boot` for `identify.n_boot`) is named there."""
    if key is None:
        return []
    hints = typing.get_type_hints(cls)
    found = [key] if prefix and key in hints else []
    for name, tp in hints.items():
        union = typing.get_origin(tp) in (Union, types.UnionType)  # an optional section, not a list of them
        sec = next((t for t in (tp, *(typing.get_args(tp) if union else ())) if dataclasses.is_dataclass(t)), None)
        if sec is not None and name != prefix and key in {f.name for f in dataclasses.fields(sec)}:
            found.append(f"{name}.{key}")
    return [repr(h) for h in found]


def to_dict(cfg: Any, paths: bool = True, base: str | os.PathLike | None = None) -> dict:
    """A plain, YAML-safe dict of a config dataclass (nested); paths=False: with every path
    field (`_path`) None; `base`: with every relative path joined to it (`absolute_path`)."""
    d = dataclasses.asdict(cfg)
    if not paths:
        _map_paths(cfg, d, lambda name, v: None)
    elif base is not None:
        _map_paths(cfg, d, lambda name, v: [absolute_path(x, base) for x in v] if isinstance(v, list)
                   else absolute_path(v, base))
    return d


def absolute_path(value: Any, base: str | os.PathLike) -> Any:
    """A path field's value as a command that read it from the directory `base` found it:
    a relative path joined to `base` ("." parts dropped, ".." kept, as the file system
    resolves it); absolute paths, None and non-strings as they are."""
    if not isinstance(value, str) or os.path.isabs(value):
        return value
    return str(Path(base) / value)


def relative_paths(cfg: Any) -> dict[str, str]:
    """{dotted field: value} of every relative path in a config (`_path` fields; a list's
    entries as field[i]), e.g. {"data.path": "data/mine.jsonl"}."""
    found: dict[str, str] = {}

    def note(name: str, v: Any) -> Any:
        for i, x in enumerate(v if isinstance(v, list) else [v]):
            if isinstance(x, str) and not os.path.isabs(x):
                found[f"{name}[{i}]" if isinstance(v, list) else name] = x
        return v

    _map_paths(cfg, dataclasses.asdict(cfg), note)
    return found


def check_paths_from_here(cfg: Any, config_path: str | os.PathLike) -> None:
    """Refuse a relative input path of the config (models, data) that is not there from the
    current directory but is beside the config file: relative paths are read from the directory
    sparcom runs in, as on the command line, so a config written beside its models and data and
    run from another directory stopped at the first one read, saying only that it "does not exist".

    Raises:
      ConfigError: naming the key, both places and the two fixes.
    """
    here = Path(config_path).parent
    if here.resolve() == Path.cwd().resolve():
        return
    for key, value in relative_paths(cfg).items():
        if key.startswith(("out_dir", "collect.store")) or Path(value).exists() or not (here / value).exists():
            continue  # (outputs, which a run makes; inputs found here, or nowhere: the run names those)
        raise ConfigError(
            f"{config_path}: {key}: {value!r} is not in the current directory ({os.getcwd()}) but is beside the "
            f"config ({here / value}); relative paths in a config are read from the directory sparcom runs in: run "
            f"it from {here}, or write the path as it is from here ({here / value}), or absolute")


def _map_paths(cfg: Any, d: Any, fn: Callable[[str, Any], Any], prefix: str = "") -> None:
    """Replace, in `d` (`dataclasses.asdict(cfg)`), each path field's value v by fn(dotted name, v)."""
    if isinstance(cfg, list):
        for i, (x, dx) in enumerate(zip(cfg, d)):
            _map_paths(x, dx, fn, f"{prefix}[{i}]")
    elif dataclasses.is_dataclass(cfg):
        for f in dataclasses.fields(cfg):
            name = f"{prefix}.{f.name}" if prefix else f.name
            if f.metadata.get("path"):
                d[f.name] = fn(name, d[f.name])
            else:
                _map_paths(getattr(cfg, f.name), d[f.name], fn, name)


# --------------------------------------------------------------------------- #
# Overrides
# --------------------------------------------------------------------------- #

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split "a.b.c=value" into (["a", "b", "c"], value parsed as YAML, duplicate keys refused)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. identify.eps=0.02")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key; write dotted keys like data.max_length=256")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e.__class__.__name__})") from None
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 5e5 (no dot) as a string
    return key.split("."), value


def _set_path(d: Any, path: list[str], value: Any, text: str) -> None:
    for i, part in enumerate(path[:-1]):
        if isinstance(d, list):
            d = d[_index(part, d, path, i, text)]
            continue
        nxt = d.get(part) if isinstance(d, dict) else None
        if nxt is None:
            if not isinstance(d, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[:i])!r} is not a mapping")
            nxt = d[part] = {}
        d = nxt
    last = path[-1]
    if isinstance(d, list):
        d[_index(last, d, path, len(path) - 1, text)] = value
    elif isinstance(d, dict):
        d[last] = value
    else:
        raise ConfigError(f"override {text!r}: {'.'.join(path[:-1])!r} is not a mapping")


def _index(part: str, seq: list, path: list[str], i: int, text: str) -> int:
    try:
        j = int(part)
        seq[j]
        return j
    except (ValueError, IndexError):
        raise ConfigError(f"override {text!r}: {'.'.join(path[:i])!r} has {len(seq)} item(s); "
                          f"index {part!r} is not one of them (set the whole list instead)") from None


def apply_overrides(cfg: Any, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Apply "a.b=value" overrides to a config; each is type-checked like the file.

    Checks that relate several fields (e.g. warmup_steps < total_steps) run once
    all overrides are applied, so their order does not matter.
    """
    if not overrides:
        return cfg
    cls = type(cfg)
    d = to_dict(cfg)
    for text in overrides:
        path, value = parse_override(text)
        _set_path(d, path, value, text)
        try:
            d = to_dict(from_dict(cls, d, source=f"override {text!r}"))
        except ConfigError as e:
            if not getattr(e, "cross_field", False):
                raise
    shown = " ".join(overrides)
    return from_dict(cls, d, source=f"overrides {shown!r}" if len(overrides) > 1 else f"override {shown!r}")


# --------------------------------------------------------------------------- #
# Files
# --------------------------------------------------------------------------- #

class _DuplicateKey(yaml.constructor.ConstructorError):
    """A mapping that names one key twice (plain YAML would keep the last silently)."""


class _StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses duplicate keys in a mapping (merge keys `<<` may
    still be overridden, as YAML defines)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in first:
                        raise _DuplicateKey(
                            None, None, f"duplicate key {key!r} (lines {first[key]} and {line})",
                            key_node.start_mark)
                    first[key] = line
                except TypeError:  # an unhashable key: the base constructor reports it
                    pass
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse a YAML file; errors name the file and line, and a key given twice in one
    mapping is an error naming both lines."""
    from sparcom_jax.fileio import read_utf8, relative_note

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory; pass the YAML config file itself (e.g. {p / 'config.yaml'})")
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found{relative_note(p)}"
                          + ("; the shipped configs are in configs/" if not p.is_absolute() else ""))
    try:
        text = read_utf8(p)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        return _load_yaml(text)
    except _DuplicateKey as e:
        raise ConfigError(f"{p}:{e.problem_mark.line + 1}: {e.problem}; YAML would keep only the "
                          "last value silently, so delete or rename one of them") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}{where}: invalid YAML ({problem})") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                cls: type = ExperimentConfig) -> Any:
    """Load a config file (or the defaults of `cls` when `path` is None) and apply overrides.

    Args:
      path: YAML file.
      overrides: "dotted.key=value" strings; values are parsed as YAML.
      cls: the schema (ExperimentConfig or DemoConfig).

    Returns:
      A frozen `cls` instance.

    Raises:
      ConfigError: unknown key, wrong type or invalid value, naming the key and source.
    """
    if path is None:
        try:
            cfg = cls()
        except TypeError:
            raise ConfigError(f"{cls.__name__} needs a config file (--config FILE)") from None
    else:
        raw = read_yaml(path)
        if cls is ExperimentConfig and isinstance(raw, dict) and "pairs" in raw and "name" not in raw:
            raise ConfigError(f"{path}: this is a demo config; run it with `sparcom demo --config {path}`")
        if cls is DemoConfig and isinstance(raw, dict) and "base" in raw and "pairs" not in raw:
            raise ConfigError(f"{path}: this is an experiment config (it names a base model), not a demo config; "
                              f"run it with `sparcom run --config {path}` (or one stage: collect, identify, ...)")
        cfg = from_dict(cls, raw, source=str(path))
    cfg = apply_overrides(cfg, overrides)
    source = str(path) if path else "config"
    check_architecture(cfg, source=source + (" with overrides" if overrides else ""))
    if isinstance(cfg, ExperimentConfig) and cfg.base.path is None and cfg.base.init is None:
        raise ConfigError(
            f"{source}: no base model; add a `base:` section with `path:` (the local Hugging Face "
            "directory of the model before fine-tuning), or set it on the command line: base.path=DIR")
    return cfg


def _any_vocab(arch: dict[str, Any]) -> dict[str, Any]:
    """vocab_size null means the shipped tokenizer's size (known at load time); any size checks the rest."""
    return {**arch, "vocab_size": arch.get("vocab_size") or 1}


def check_architecture(cfg: Any, source: str = "config") -> None:
    """Validate embedded HF-style architecture dicts against ModelConfig."""
    from sparcom_jax.models.config import ModelConfig

    archs = []
    if isinstance(cfg, ExperimentConfig):
        if cfg.architecture is not None:
            archs.append(("architecture", cfg.architecture))
        keys = ["base", *[f"series[{i}]" for i in range(len(cfg.series))], "finetuned"]  # cfg.models() order
        archs += [(f"{k}.init", _any_vocab(m.init)) for k, m in zip(keys, cfg.models()) if m.init is not None]
    elif isinstance(cfg, DemoConfig):
        archs += [(f"pairs.{p.name}.architecture", _any_vocab(p.architecture)) for p in cfg.pairs]
    for key, arch in archs:
        try:
            ModelConfig.from_hf_config(arch, source=f"{source}: {key}")
        except ValueError as e:
            raise ConfigError(str(e)) from None


def dump_config(cfg: Any, path: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """Write the resolved config as YAML (temp file in the same directory, then rename);
    `base`: with its relative paths joined to it (`to_dict`)."""
    from sparcom_jax.fileio import atomic_write

    p = Path(path)
    atomic_write(p, yaml.safe_dump(to_dict(cfg, base=base), sort_keys=False, default_flow_style=False))
    return p


__all__ = [
    "AblationSpec", "CollectSpec", "ConfigError", "DataSpec", "DemoConfig", "DemoPair",
    "ExperimentConfig", "IdentifySpec", "MeshSpec", "ModelSpec", "ReportSpec", "TrainConfig",
    "apply_overrides", "check_architecture", "dump_config", "from_dict", "load_config",
    "parse_override", "read_yaml", "to_dict",
]
