"""Item banks: items, evaluators, and (later) IRT calibration and cheap accuracy estimators."""

from merge3.itembank._bank import (
    BankSpec,
    ClassifierSpec,
    GenerationSpec,
    ItemBank,
    MultipleChoiceSpec,
    TextClassifierSpec,
    read_items,
    write_bank,
)
from merge3.itembank._evaluators import (
    HF_CLASS_FOR,
    ClassifierEvaluator,
    Evaluator,
    GenerationEvaluator,
    MultipleChoiceEvaluator,
    TextClassifierEvaluator,
    load_model_for,
    load_tokenizer,
    make_evaluator,
    mean_pool,
)

from merge3.itembank._estimators import ESTIMATORS, Estimate, Estimator
from merge3.itembank._fidelity import FIDELITY_NS, fidelity_benchmark, format_fidelity_table
from merge3.itembank._irt import DIMS_GRID, ConstantItemWarning, IRTConvergenceWarning, IRTModel, fit_irt
from merge3.itembank._subsets import SUBSET_METHODS, Subset, select_subset

__all__ = [
    "DIMS_GRID",
    "ESTIMATORS",
    "FIDELITY_NS",
    "SUBSET_METHODS",
    "ConstantItemWarning",
    "Estimate",
    "Estimator",
    "IRTConvergenceWarning",
    "IRTModel",
    "Subset",
    "fidelity_benchmark",
    "fit_irt",
    "format_fidelity_table",
    "select_subset",
    "HF_CLASS_FOR",
    "BankSpec",
    "ClassifierEvaluator",
    "ClassifierSpec",
    "Evaluator",
    "GenerationEvaluator",
    "GenerationSpec",
    "ItemBank",
    "MultipleChoiceEvaluator",
    "MultipleChoiceSpec",
    "TextClassifierEvaluator",
    "TextClassifierSpec",
    "load_model_for",
    "load_tokenizer",
    "make_evaluator",
    "mean_pool",
    "read_items",
    "write_bank",
]
