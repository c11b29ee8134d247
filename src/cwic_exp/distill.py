"""Distillation losses (METHOD.md §6), computed in fp32 in token chunks to bound memory."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_parts(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
             chunk: int = 2048) -> tuple[Tensor, Tensor, Tensor]:
    """Sums over real tokens of FKL = KL(p_t‖p_s) and RKL = KL(p_s‖p_t); and the count of tokens.

    Differentiable in the student's logits; the teacher's are treated as constants.
    """
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V)
    t = teacher_logits.reshape(-1, V).detach()
    if mask is not None:
        sel = mask.reshape(-1).bool().to(s.device)
        s, t = s[sel], t[sel]
    fkl = s.new_zeros((), dtype=torch.float32)
    rkl = s.new_zeros((), dtype=torch.float32)
    for i in range(0, s.shape[0], chunk):
        ls = F.log_softmax(s[i:i + chunk].float(), -1)
        lt = F.log_softmax(t[i:i + chunk].float(), -1)
        fkl = fkl + (lt.exp() * (lt - ls)).sum()
        rkl = rkl + (ls.exp() * (ls - lt)).sum()
    return fkl, rkl, torch.tensor(s.shape[0], device=s.device)


def symmetric_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """½ (FKL + RKL) averaged over real tokens."""
    fkl, rkl, n = kl_parts(student_logits, teacher_logits, mask)
    return 0.5 * (fkl + rkl) / n.clamp_min(1)


def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """Sum over real tokens of the mean squared error of the last hidden states (the "MSE" ablation)."""
    d = (student_hidden.float() - teacher_hidden.detach().float()).pow(2).mean(-1)
    if mask is not None:
        d = d * mask.to(d.dtype)
    return d.sum()
