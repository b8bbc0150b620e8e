"""Frozen causal language models seen one decoding step at a time (the ``nofree.core.LanguageModel`` protocol); the Hugging Face backend is :mod:`nofree.lm.hf`."""
