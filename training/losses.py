"""The training objectives, as plain functions of tensors (model-independent, unit-testable).

* ``info_nce``: contrastive loss with in-batch negatives and a learnable temperature; in-batch
  items of the positive's own group (same category) are not counted as negatives.
* ``group_advantages``: GRPO's group-normalised advantages.
* ``grpo_loss``: policy-gradient loss over sampled completions with a per-token KL penalty to a
  frozen reference (the k3 estimator, always >= 0).
"""

from __future__ import annotations

import torch


def info_nce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: torch.Tensor,
    groups: torch.Tensor | None = None,
    symmetric: bool = True,
    group_positives: bool = False,
) -> torch.Tensor:
    """InfoNCE of row i of ``queries`` against row i of ``keys``, the other rows as negatives.

    Inputs are L2-normalised [B, D]; ``logit_scale`` is the log of the inverse temperature
    (clamped to 100, as CLIP does). With ``groups`` [B], rows j != i with groups[j] == groups[i]
    are not negatives: they are masked out or, with ``group_positives``, counted as positives
    (supervised contrastive: the loss averages the log-probability of every same-group key, so
    one batch teaches each row all of its group's members rather than one partner).
    """
    if queries.shape != keys.shape or queries.ndim != 2:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must both be [B, D]")
    scale = logit_scale.float().exp().clamp(max=100.0).reshape(())
    logits = scale * queries.float() @ keys.float().T
    positive = torch.eye(len(queries), dtype=torch.bool, device=logits.device)
    if groups is not None:
        same = groups[:, None] == groups[None, :]
        if group_positives:
            positive = same
        else:
            logits = logits.masked_fill(same & ~positive, float("-inf"))
    loss = _multi_positive_cross_entropy(logits, positive)
    if symmetric:
        loss = 0.5 * (loss + _multi_positive_cross_entropy(logits.T, positive.T))
    return loss


def _multi_positive_cross_entropy(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the negative mean log-softmax over that row's positive columns (with one
    positive a row, cross-entropy)."""
    log_probs = logits.log_softmax(dim=1).masked_fill(~positive, 0.0)  # -inf x 0 would be nan
    per_row = log_probs.sum(dim=1) / positive.sum(dim=1)
    return -per_row.mean()


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps), rewards laid out group after group."""
    if rewards.ndim != 1 or group_size < 2 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} cannot be split into groups of {group_size} (need >= 2)"
        )
    grouped = rewards.float().view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)


def grpo_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    kl_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean KL). ``logprobs``/``ref_logprobs``/``mask`` are [N, T] over completion tokens.

    One update per sample batch (on-policy), so the clipped ratio of PPO is exactly 1 and the
    objective reduces to advantage-weighted log-likelihood; the ratio form keeps its gradient.
    """
    ratio = torch.exp(logprobs - logprobs.detach())
    delta = ref_logprobs - logprobs
    kl = torch.exp(delta) - delta - 1.0  # k3: unbiased, non-negative
    per_token = -ratio * advantages[:, None] + kl_weight * kl
    mask = mask.to(per_token.dtype)
    lengths = mask.sum(dim=1).clamp(min=1)
    loss = ((per_token * mask).sum(dim=1) / lengths).mean()
    mean_kl = ((kl * mask).sum(dim=1) / lengths).mean()
    return loss, mean_kl.detach()
