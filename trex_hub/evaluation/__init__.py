"""Transfer evaluation with the linear-probe protocol of the t-ReX paper (arXiv 2206.15369).

>>> from trex_hub.evaluation import evaluate_features
>>> result = evaluate_features(train_feats, train_labels, test_feats, test_labels, seed=0)
>>> result["top1"], result["hparams"]["C"]

Modules: :mod:`.protocol` (search, refit, thread limits), :mod:`.splits` (the published and
trex_hub validation splits), :mod:`.probes` (logistic regression, SGD linear layer),
:mod:`.search` (Optuna TPE or log grid), :mod:`.metrics` (top-k, mean per-class, log-odds),
:mod:`.results` (one JSON per model/dataset/seed), :mod:`.report` (tables and plot),
:mod:`.runner` (what ``trex-eval run`` does, with :mod:`.options`, :mod:`.image_sets`,
:mod:`.feature_sets`, :mod:`.models` and :mod:`.feature_cache`), :mod:`.progress` (tqdm bars).
scikit-learn and matplotlib are imported only by the functions that need them.
"""
from .metrics import log_odds, mean_log_odds, mean_per_class_accuracy, topk_accuracy
from .protocol import C_RANGE, LR_RANGE, WD_RANGE, ProtocolConfig, evaluate_features
from .report import aggregate, to_csv, to_markdown
from .results import load_results, write_result
from .splits import published_split, validation_split

__all__ = ["evaluate_features", "validation_split", "published_split", "ProtocolConfig",
           "C_RANGE", "LR_RANGE", "WD_RANGE", "log_odds", "mean_log_odds",
           "mean_per_class_accuracy", "topk_accuracy",
           "aggregate", "to_markdown", "to_csv", "load_results", "write_result"]
