"""Analysis: identify instruction-specific units, evaluate, compare, ablate (METHOD.md)."""

from sparcom_jax.analysis.ablate import (
    AblationResult, ablate_identification, ablation_matrix, frequency_bins, matched_random, random_like,
)
from sparcom_jax.analysis.compare import compare_sets, frequency_shift
from sparcom_jax.analysis.evaluate import (
    category_block_means, category_order, category_overlap, diagonal_dominance, generality,
    instruction_jaccard, layer_distribution, locate_phases, uniqueness,
)
from sparcom_jax.analysis.identify import (
    IdentifyConfig, Identification, category_sets, identify, instruction_sets, select_units,
)
from sparcom_jax.analysis.pipeline import (
    FieldAnalysis, ModelAnalysis, analyze_field, analyze_model, build_summary, compare_models,
    compare_series,
)
from sparcom_jax.analysis.uncertainty import bootstrap, permutation_test

__all__ = [
    "AblationResult", "FieldAnalysis", "IdentifyConfig", "Identification", "ModelAnalysis",
    "ablation_matrix", "analyze_field", "analyze_model", "bootstrap", "build_summary",
    "category_block_means", "category_order", "category_overlap", "category_sets", "compare_models",
    "compare_series", "compare_sets", "diagonal_dominance", "frequency_shift", "generality",
    "identify", "instruction_jaccard", "instruction_sets", "layer_distribution", "locate_phases",
    "permutation_test", "random_like", "select_units", "uniqueness",
]
