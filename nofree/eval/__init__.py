"""Evaluation: caption metrics (pycocoevalcap), retrieval R@K, zero-shot accuracy, and bootstrap
intervals over the images (how far a score or a difference between two methods can be trusted).

Java and pycocoevalcap are only needed when caption metrics are computed.
"""
from nofree.eval.captioning import METRICS, as_percent, caption_metrics, format_table, ptb_tokenize
from nofree.eval.retrieval import first_relevant_rank, r1_intervals, recall_at_k, relevance_mask, retrieval_report
from nofree.eval.significance import clustered_interval, mean_interval, paired_difference
from nofree.eval.zeroshot import hit_rate, top1_accuracy, topk_accuracy

__all__ = ["METRICS", "as_percent", "caption_metrics", "clustered_interval", "first_relevant_rank",
           "format_table", "hit_rate", "mean_interval", "paired_difference", "ptb_tokenize", "r1_intervals",
           "recall_at_k", "relevance_mask", "retrieval_report", "top1_accuracy", "topk_accuracy"]
