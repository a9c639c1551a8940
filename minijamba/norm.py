"""RMSNorm (Zhang & Sennrich 2019): the norm of every Mamba and Jamba layer, of the Jamba mixer's Δ, B, C, and of the
final hidden state. x / sqrt(mean(x²) + eps) · weight, with no mean subtracted and no bias (LayerNorm without them)."""

import torch
from torch import nn

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight over the last dim, computed in at least float32 (as HF MambaRMSNorm)."""

    def __init__(self, d, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
