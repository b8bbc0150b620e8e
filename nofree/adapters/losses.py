"""Training losses of the adapters, as pure functions.

- :func:`contrastive_loss`: the symmetric InfoNCE loss of CLIP / LiT (Radford et al., 2021;
  Zhai et al., 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning"):
  ``logits = t · z_img · z_txtᵀ``, ``L = ½ (CE_rows + CE_cols)``.
- :func:`sigmoid_loss`: the pairwise sigmoid loss of SigLIP (Zhai et al., 2023, "Sigmoid Loss
  for Language Image Pre-Training"): every (image, text) cell is an independent binary task.
- :func:`caption_batch` and :func:`next_token_loss`: teacher-forced captioning targets for a
  frozen causal LM behind a prefix (ClipCap, Mokady et al., 2021) or with cross-attention
  (Flamingo, Alayrac et al., 2022). Captions are right-padded with the LM's *real* pad id, an
  attention mask marks real positions, and padded / prefix positions carry the label ``-100``
  (ignored), so no real token id is ever mistaken for padding.

Several captions of one image may share a batch; both contrastive losses accept ``image_ids``
so that such pairs count as positives instead of false negatives.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def positive_mask(image_ids: Tensor | None, n: int, device: torch.device) -> Tensor:
    """``(n, n)`` bool: cell (i, j) is a positive pair (same image); identity when ids are None."""
    if image_ids is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    image_ids = image_ids.to(device)
    return image_ids[:, None] == image_ids[None, :]


def contrastive_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, *,
                     image_ids: Tensor | None = None) -> Tensor:
    """Symmetric contrastive loss of a batch of B matching (image, text) rows.

    image_emb ``(B, D)`` and text_emb ``(B, D)`` are L2-normalised; logit_scale is the scalar
    multiplier t (not its log). With ``image_ids`` ``(B,)``, every text of the same image is a
    positive: the target distribution spreads evenly over positives. Returns a scalar.
    """
    logits = logit_scale * image_emb @ text_emb.t()                     # (B, B)
    positives = positive_mask(image_ids, logits.shape[0], logits.device).float()
    rows = -(positives / positives.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    cols = -(positives / positives.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return 0.5 * (rows + cols)


def sigmoid_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, logit_bias: Tensor, *,
                 image_ids: Tensor | None = None) -> Tensor:
    """SigLIP loss: ``-1/B Σ_ij log σ(z_ij (t · x_i·y_j + b))``, z = +1 on positives, -1 elsewhere.

    Shapes as in :func:`contrastive_loss`; ``logit_bias`` is the learned scalar b. Returns a scalar.
    """
    logits = logit_scale * image_emb @ text_emb.t() + logit_bias        # (B, B)
    signs = positive_mask(image_ids, logits.shape[0], logits.device).float() * 2.0 - 1.0
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


def caption_batch(caption_ids: Sequence[Sequence[int]], *, eos_id: int, pad_id: int,
                  n_start: int) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher-forcing tensors for captions that follow ``n_start`` conditioning positions.

    The LM sees ``n_start`` start positions (prefix embeddings or start tokens, supplied by the
    caller) followed by the caption tokens; it must predict every caption token and then eos.

    Returns
      ``ids`` ``(B, Tc)`` long: caption tokens right-padded with ``pad_id``;
      ``mask`` ``(B, n_start + Tc)`` long: 1 on start and caption positions, 0 on padding;
      ``labels`` ``(B, n_start + Tc)`` long: ``labels[:, t]`` is the token the logits at
      position t must predict (caption tokens then eos), ``-100`` elsewhere.
    """
    if n_start < 1:
        raise ValueError("caption_batch needs at least one start position to predict the first token")
    if not caption_ids:
        raise ValueError("caption_batch needs at least one caption")
    width = max(len(c) for c in caption_ids)
    batch = len(caption_ids)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, n_start + width), dtype=torch.long)
    labels = torch.full((batch, n_start + width), IGNORE_INDEX, dtype=torch.long)
    mask[:, :n_start] = 1
    for row, caption in enumerate(caption_ids):
        n = len(caption)
        if n:
            ids[row, :n] = torch.as_tensor(list(caption), dtype=torch.long)
        mask[row, n_start:n_start + n] = 1
        targets = list(caption) + [eos_id]
        labels[row, n_start - 1:n_start + n] = torch.as_tensor(targets, dtype=torch.long)
    return ids, mask, labels


def next_token_loss(logits: Tensor, labels: Tensor, *, reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``logits`` ``(B, T, V)`` against aligned ``labels`` ``(B, T)``.

    ``labels[:, t]`` is the target of ``logits[:, t]`` (already shifted, see
    :func:`caption_batch`); ``-100`` is ignored. ``reduction='sum'`` returns the summed loss
    (for token-weighted averages over several batches). Computed in float32.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)
