"""Instruction data: records, loaders, adapters, templates, token scopes, batching.

Heavy libraries (`datasets`, `transformers`, `tokenizers`) are imported only when a
function needs them, so `import sparcom_jax.data` stays cheap.
"""

from sparcom_jax.data.adapters import ADAPTERS, DOLLY_CATEGORIES, detect_adapter
from sparcom_jax.data.batching import Batch, BatchPlan, default_buckets, fit_buckets, pad_batch, plan_batches
from sparcom_jax.data.loaders import SHIPPED_PATH, as_records, load_instructions, read_table
from sparcom_jax.data.records import DataWarning, Excluded, LoadReport, Problem, Record, validate_row
from sparcom_jax.data.sampling import count_by_category, sample_balanced
from sparcom_jax.data.templates import (
    SCOPES,
    TEMPLATES,
    Encoded,
    EncodedSet,
    content_caps,
    encode_record,
    encode_records,
    format_plain,
    user_message,
)
from sparcom_jax.data.tokenizer import TOKENIZER_DIR, default_tokenizer, resolve_tokenizer

__all__ = [
    "ADAPTERS", "DOLLY_CATEGORIES", "SCOPES", "SHIPPED_PATH", "TEMPLATES", "TOKENIZER_DIR", "as_records",
    "Batch", "BatchPlan", "DataWarning", "Encoded", "EncodedSet", "Excluded", "LoadReport",
    "Problem", "Record", "content_caps", "count_by_category", "default_buckets", "default_tokenizer", "fit_buckets",
    "detect_adapter", "encode_record", "encode_records", "format_plain", "load_instructions",
    "pad_batch", "plan_batches", "read_table", "resolve_tokenizer", "sample_balanced",
    "user_message", "validate_row",
]
