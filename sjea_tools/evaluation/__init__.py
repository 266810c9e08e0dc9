"""Evaluation of a stacked model, level by level (`core`: probe, k-NN, collapse checks, a run on a
dataset) and of an HDF5 store with or without labels (`store`: label-free measures beside random
init and pixels), and hierarchy-aware measures on a fine/coarse label tree (`hierarchy_measures`).
Every name is importable from `sjea_tools.evaluation` as before the split."""

from .core import (EVAL_FILE, KNN_K, KNN_K_RULE, KNN_TEMPERATURE, PRECISION_K, calibrate_batchnorm, coarse_of,
                   collapse_stats, eval_dataset, evaluate_features, evaluate_run, extract_features,
                   hierarchical_scores, knn_accuracy, knn_accuracy_from_neighbours, knn_k_for, linear_probe,
                   load_eval_splits, precision_at_k, random_subset, retrieval_scores, save_feature_file,
                   seeded_split, weighted_vote)
from .hierarchy_measures import (H_AP_DEPTH, TOP_K_DISTANCE, TREE, average_distance_at_k, h_ap,
                                 hierarchical_distance, hierarchy_measures, mistake_severity)
from .store import COPY_RECIPE, COPY_VIEW, SAMPLE_ROWS, STORE_EVAL_ROWS, augmented_copies, evaluate_store

__all__ = ["EVAL_FILE", "KNN_K", "KNN_K_RULE", "KNN_TEMPERATURE", "PRECISION_K", "calibrate_batchnorm", "coarse_of",
           "collapse_stats", "eval_dataset", "evaluate_features", "evaluate_run", "extract_features",
           "hierarchical_scores", "knn_accuracy", "knn_accuracy_from_neighbours", "knn_k_for", "linear_probe",
           "load_eval_splits", "precision_at_k", "random_subset", "retrieval_scores", "save_feature_file",
           "seeded_split", "weighted_vote", "COPY_RECIPE", "COPY_VIEW", "SAMPLE_ROWS", "STORE_EVAL_ROWS",
           "augmented_copies", "evaluate_store", "H_AP_DEPTH", "TOP_K_DISTANCE", "TREE", "average_distance_at_k",
           "h_ap", "hierarchical_distance", "hierarchy_measures", "mistake_severity"]
