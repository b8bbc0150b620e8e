"""ASIF (Norelli et al., 2022): anchor sets of paired embeddings, the relative representations that make a joint space, and the top-k search, index and builders behind them."""
