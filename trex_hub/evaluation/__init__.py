"""Transfer evaluation with the paper's linear-probe protocol (TREX_SPEC section 4).

>>> from trex_hub.evaluation import evaluate_features
>>> result = evaluate_features(train_feats, train_labels, test_feats, test_labels, seed=0)
>>> result["top1"], result["hparams"]["C"]

Modules: :mod:`.protocol` (split, search, refit), :mod:`.probes` (logistic regression, SGD
linear layer), :mod:`.search` (Optuna TPE or log grid), :mod:`.metrics` (top-k, log-odds),
:mod:`.results` (one JSON per model/dataset/seed), :mod:`.report` (tables and plot),
:mod:`.runner` (what ``trex-eval run`` does). scikit-learn and matplotlib are imported only by
the functions that need them.
"""
from .metrics import log_odds, mean_log_odds, topk_accuracy
from .protocol import C_RANGE, LR_RANGE, WD_RANGE, ProtocolConfig, evaluate_features, \
    validation_split
from .report import aggregate, to_csv, to_markdown
from .results import load_results, write_result

__all__ = ["evaluate_features", "validation_split", "ProtocolConfig", "C_RANGE", "LR_RANGE",
           "WD_RANGE", "log_odds", "mean_log_odds", "topk_accuracy",
           "aggregate", "to_markdown", "to_csv", "load_results", "write_result"]
