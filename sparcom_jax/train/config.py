"""The fine-tuning configuration: one frozen dataclass, validated before any compute.

Every field that changes the numbers (learning rate, batch, seed, ...) is part of
`TrainConfig.fingerprint()`, which a resumed run must match; fields that only
change logging or checkpoint cadence (`log_every`, `save_every`, `keep_last`,
`eval_batch_size`, `async_checkpointing`), the mesh (`mesh_data`, `mesh_model`) or
nothing a run computes (`allow_cut_responses`) are not, so they may change between a
run and its resumption.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from sparcom_jax.data.templates import TEMPLATES
from sparcom_jax.errors import ConfigError

OPTIMIZERS: tuple[str, ...] = ("adamw", "lion", "sgd")
COMPUTE_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
# Fields a resumed run may change: cadence, the mesh (which changes only the order of
# floating-point reductions, so losses agree within float tolerance rather than bit for bit),
# and a permission that changes nothing a run that runs computes.
_NON_NUMERIC_FIELDS = ("save_every", "keep_last", "log_every", "eval_batch_size", "async_checkpointing",
                       "mesh_data", "mesh_model", "allow_cut_responses")


class TrainConfigError(ConfigError):
    """A fine-tuning setting that cannot work; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Supervised instruction fine-tuning settings.

    Batch terms: `batch_size` is the global number of sequences per optimizer
    step. It is split into `grad_accum` micro-batches of `batch_size //
    grad_accum` rows that run one after another; each micro-batch is split over
    the mesh's data axis, so it must be a multiple of the data-axis size.

    The loss is next-token cross-entropy on response tokens (the target token
    t+1 is in the response), averaged per token over the whole global batch
    (every micro-batch and device together), so it does not depend on how the
    batch is split.

    Attributes:
      learning_rate: peak learning rate, reached after `warmup_steps`.
      warmup_steps: linear warm-up from 0.
      total_steps: optimizer steps; None derives it from `epochs`.
      epochs: passes over the data when `total_steps` is None.
      end_lr_fraction: the cosine decay ends at learning_rate * end_lr_fraction.
      weight_decay: decoupled weight decay; never applied to norms and biases.
      clip_norm: global gradient-norm clip; None or 0 disables it.
      batch_size: sequences per optimizer step (global, over all devices).
      grad_accum: micro-batches per optimizer step.
      optimizer: one of OPTIMIZERS.
      b1, b2, eps: optimizer moments (b1 is SGD's momentum; lion uses b1, b2).
      seed: seeds the data order (the model is initialised by the caller).
      compute_dtype: "float32" or "bfloat16"; master weights and optimizer
        state stay float32 either way.
      template: "plain" or "chat" (the tokenizer's chat template).
      max_length: longest sequence in tokens; longer ones are cut (with a warning).
      buckets: padded lengths (one compilation each); None: a geometric ladder
        up to max_length (`sparcom_jax.data.default_buckets`).
      save_every: checkpoint every this many steps (plus step 0 and the last).
      keep_last: keep this many latest checkpoints (once the run ends, the last step is one of
        them: keep_last=2 keeps 0, the last save before the end and the last); step 0 and
        the last step are never deleted.
      log_every: write a metrics line every this many steps.
      eval_batch_size: rows per eval batch; None uses the micro-batch size.
      mesh_data: data-axis size; None uses every device not on the model axis.
      mesh_model: model-axis size (tensor parallelism over neurons and heads).
      async_checkpointing: write checkpoints in a background thread.
      allow_cut_responses: train although `max_length` cuts some records before their
        response begins (they are trained on nothing, so their categories are
        under-tuned; a `DataWarning` names them). Default False: such a run is refused
        before any compute, naming the categories and the max_length that keeps them.
    """

    learning_rate: float = 3e-4
    warmup_steps: int = 10
    total_steps: int | None = None
    epochs: int = 1
    end_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float | None = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    optimizer: str = "adamw"
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    seed: int = 0
    compute_dtype: str = "float32"
    template: str = "plain"
    max_length: int = 512
    buckets: tuple[int, ...] | None = None
    save_every: int = 100
    keep_last: int = 2
    log_every: int = 1
    eval_batch_size: int | None = None
    mesh_data: int | None = None
    mesh_model: int = 1
    async_checkpointing: bool = True
    allow_cut_responses: bool = False

    def __post_init__(self):
        if self.buckets is not None:
            object.__setattr__(self, "buckets", tuple(int(b) for b in self.buckets))
        self.validate()

    # ---- derived values -------------------------------------------------
    @property
    def micro_batch_size(self) -> int:
        """Rows per micro-batch (one forward/backward pass)."""
        return self.batch_size // self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["buckets"] = list(self.buckets) if self.buckets is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainConfigError(f"unknown TrainConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def fingerprint(self) -> str:
        """Hash of the fields that change the losses (what a resumed run must match)."""
        d = {k: v for k, v in self.to_dict().items() if k not in _NON_NUMERIC_FIELDS}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    # ---- validation -----------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Check the settings on their own (no devices, no data). Raises TrainConfigError."""

        def need(cond: bool, msg: str):
            if not cond:
                raise TrainConfigError(msg)

        need(self.optimizer in OPTIMIZERS,
             f"optimizer={self.optimizer!r} is not supported; choose one of {', '.join(OPTIMIZERS)}")
        need(self.compute_dtype in COMPUTE_DTYPES,
             f"compute_dtype={self.compute_dtype!r} is not supported; choose one of {', '.join(COMPUTE_DTYPES)} "
             "(master weights are always float32)")
        need(self.template in TEMPLATES, f"template={self.template!r} is not supported; choose one of {TEMPLATES}")
        need(self.learning_rate > 0, f"learning_rate={self.learning_rate} must be > 0")
        need(0.0 <= self.end_lr_fraction <= 1.0, f"end_lr_fraction={self.end_lr_fraction} must be in [0, 1]")
        need(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        need(self.clip_norm is None or self.clip_norm >= 0, f"clip_norm={self.clip_norm} must be >= 0 or None")
        need(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        need(self.total_steps is None or self.total_steps >= 1,
             f"total_steps={self.total_steps} must be >= 1 (or None to use epochs)")
        need(self.total_steps is None or self.warmup_steps < self.total_steps,
             f"warmup_steps={self.warmup_steps} must be smaller than total_steps={self.total_steps}")
        need(self.epochs >= 1, f"epochs={self.epochs} must be >= 1")
        need(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        need(self.grad_accum >= 1, f"grad_accum={self.grad_accum} must be >= 1")
        need(self.batch_size % self.grad_accum == 0,
             f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}; "
             f"use a batch_size that is a multiple of {self.grad_accum}")
        need(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"b1={self.b1}, b2={self.b2} must be in [0, 1)")
        need(self.eps > 0, f"eps={self.eps} must be > 0")
        # numpy's default_rng takes no negative seed; without this check a run would fail only
        # at its first batch, after writing run.json and checkpoint 0 under the bad seed.
        need(self.seed >= 0, f"seed={self.seed} must be >= 0 (it seeds the data order)")
        need(self.max_length >= 2, f"max_length={self.max_length} must be >= 2 (a prompt and a target)")
        if self.buckets is not None:
            need(len(self.buckets) > 0 and all(b >= 2 for b in self.buckets),
                 f"buckets={self.buckets} must be lengths >= 2")
            need(max(self.buckets) >= self.max_length,
                 f"buckets={self.buckets}: the largest bucket must be >= max_length={self.max_length}")
        need(self.save_every >= 1, f"save_every={self.save_every} must be >= 1")
        need(self.keep_last >= 1, f"keep_last={self.keep_last} must be >= 1")
        need(self.log_every >= 1, f"log_every={self.log_every} must be >= 1")
        need(self.eval_batch_size is None or self.eval_batch_size >= 1,
             f"eval_batch_size={self.eval_batch_size} must be >= 1 or None")
        need(self.mesh_model >= 1, f"mesh_model={self.mesh_model} must be >= 1")
        need(self.mesh_data is None or self.mesh_data >= 1, f"mesh_data={self.mesh_data} must be >= 1 or None")
        return self

    def check_mesh(self, data_size: int) -> None:
        """Check the batch split against a mesh whose data axis has `data_size` devices.

        Raises:
          TrainConfigError: a micro-batch (or eval batch) cannot be split evenly.
        """
        micro = self.micro_batch_size
        if micro % data_size:
            raise TrainConfigError(
                f"batch_size={self.batch_size} / grad_accum={self.grad_accum} = {micro} rows per micro-batch "
                f"is not divisible by the {data_size} devices of the mesh's data axis; make batch_size a "
                f"multiple of grad_accum * {data_size} = {self.grad_accum * data_size} "
                f"(or lower grad_accum, or use mesh_data)")
        ev = self.eval_batch_size or micro
        if ev % data_size:
            raise TrainConfigError(
                f"eval_batch_size={ev} is not divisible by the {data_size} devices of the mesh's data axis; "
                f"use a multiple of {data_size}")

    def check_model(self, max_position_embeddings: int) -> None:
        """Check sequence lengths against the model's positions."""
        if self.max_length > max_position_embeddings:
            raise TrainConfigError(
                f"max_length={self.max_length} is longer than the model's max_position_embeddings="
                f"{max_position_embeddings}; set max_length <= {max_position_embeddings}")
