"""Evaluation: caption metrics (pycocoevalcap), retrieval R@K, zero-shot accuracy.

Java and pycocoevalcap are only needed when caption metrics are computed.
"""
from nofree.eval.captioning import METRICS, as_percent, caption_metrics, format_table, ptb_tokenize
from nofree.eval.retrieval import first_relevant_rank, recall_at_k, relevance_mask, retrieval_report
from nofree.eval.zeroshot import hit_rate, top1_accuracy, topk_accuracy

__all__ = ["METRICS", "as_percent", "caption_metrics", "first_relevant_rank", "format_table",
           "hit_rate", "ptb_tokenize", "recall_at_k", "relevance_mask", "retrieval_report",
           "top1_accuracy", "topk_accuracy"]
