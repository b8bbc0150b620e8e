"""Pairs and images: ``load_pairs`` (JSONL / CSV / image folder), ``load_image(s)``; caption
pools: ``load_text_lines``, ``filter_pool``."""
from nofree.data.images import LoadedImages, load_image, load_images
from nofree.data.pairs import IMAGE_SUFFIXES, load_pairs, load_text_lines
from nofree.data.pool import filter_pool

__all__ = ["IMAGE_SUFFIXES", "LoadedImages", "filter_pool", "load_image", "load_images", "load_pairs",
           "load_text_lines"]
