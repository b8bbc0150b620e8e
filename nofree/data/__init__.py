"""Pairs and images: ``load_pairs`` (JSONL / CSV / image folder), ``load_image(s)``."""
from nofree.data.images import LoadedImages, load_image, load_images
from nofree.data.pairs import IMAGE_SUFFIXES, load_pairs, load_text_lines

__all__ = ["IMAGE_SUFFIXES", "LoadedImages", "load_image", "load_images", "load_pairs",
           "load_text_lines"]
