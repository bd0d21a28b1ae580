"""Analysis: identify instruction-specific units, evaluate, compare, ablate (METHOD.md)."""

from sparcom_jax.analysis.ablate import (
    AblationResult, ablate_identification, ablation_matrix, matched_random, random_like,
)
from sparcom_jax.analysis.compare import compare_sets, frequency_shift
from sparcom_jax.analysis.evaluate import (
    category_block_means, category_order, category_overlap, diagonal_dominance, generality,
    instruction_jaccard, layer_distribution, locate_phases, per_category_dominance, size_vs_length,
    spearman, uniqueness,
)
from sparcom_jax.analysis.examples import top_instructions
from sparcom_jax.analysis.identify import (
    RULE_SUPPORT, IdentifyConfig, Identification, category_sets, contrast_config, identify, identify_all,
    instruction_sets, select_units,
)
from sparcom_jax.analysis.study import (
    Comparison, FieldAnalysis, ModelAnalysis, SeriesComparison, analyze_field, analyze_model, between_groups,
    build_summary, compare_models, compare_series, same_template_control, subset_diagonal,
)
from sparcom_jax.analysis.uncertainty import bootstrap, cluster_index, permutation_test, resample_weights

__all__ = [
    "AblationResult", "Comparison", "FieldAnalysis", "IdentifyConfig", "Identification", "ModelAnalysis",
    "RULE_SUPPORT", "SeriesComparison",
    "ablate_identification", "ablation_matrix", "analyze_field", "analyze_model", "between_groups", "bootstrap",
    "build_summary", "category_block_means", "category_order", "category_overlap", "category_sets",
    "cluster_index", "compare_models", "compare_series", "compare_sets", "contrast_config", "diagonal_dominance",
    "frequency_shift", "generality", "identify", "identify_all", "instruction_jaccard",
    "instruction_sets", "layer_distribution", "locate_phases", "matched_random", "per_category_dominance",
    "permutation_test", "random_like", "resample_weights", "same_template_control", "select_units",
    "size_vs_length", "spearman", "subset_diagonal", "top_instructions", "uniqueness",
]
