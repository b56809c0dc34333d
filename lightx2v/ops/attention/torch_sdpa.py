"""PyTorch's scaled_dot_product_attention (it picks cuDNN / flash / memory-efficient / math itself)."""

import torch
import torch.nn.functional as F


def torch_sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D]. No mask, no dropout."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
