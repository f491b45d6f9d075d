"""Test-only transcription of the seed algorithm (He et al. 2019, Algorithm 1, as in the official builder).

Deliberately plain: a Python loop over parameters for the momentum update, the queue stored `dim x K` as in the
paper, `K % batch == 0` as the official code assumes, one process (no shuffle). The package's `MocoModel` is checked
against it; nothing here is imported by the package.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn


class ReferenceMoCo(nn.Module):
    def __init__(self, encoder_q: nn.Module, queue: torch.Tensor, m: float, T: float) -> None:
        super().__init__()
        self.m, self.T = m, T
        self.encoder_q = copy.deepcopy(encoder_q)
        self.encoder_k = copy.deepcopy(encoder_q)
        for param_k in self.encoder_k.parameters():
            param_k.requires_grad = False
        self.register_buffer("queue", queue.T.clone())  # dim x K, as in the paper
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        batch_size = keys.shape[0]
        K = self.queue.shape[1]
        ptr = int(self.queue_ptr)
        assert K % batch_size == 0
        self.queue[:, ptr : ptr + batch_size] = keys.T
        self.queue_ptr[0] = (ptr + batch_size) % K

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            k = F.normalize(self.encoder_k(im_k), dim=1)
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        self._dequeue_and_enqueue(k)
        return logits, labels


class ReferenceMoCoV3(nn.Module):
    """MoCo v3, Algorithm 1 of Chen, Xie, He 2021, written as the paper's pseudocode (and the official code's order:
    the momentum encoder is updated before it encodes the keys). `f_q` = backbone + projection MLP, `predictor` on
    top of it; `f_k` = momentum copy of `f_q`. Negatives: the keys of all processes, gathered."""

    def __init__(self, f_q: nn.Module, predictor: nn.Module, T: float) -> None:
        super().__init__()
        self.T = T
        self.f_q = copy.deepcopy(f_q)
        self.predictor = copy.deepcopy(predictor)
        self.f_k = copy.deepcopy(f_q)
        for param_k in self.f_k.parameters():
            param_k.requires_grad = False

    def ctr(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        rank = 0
        if torch.distributed.is_initialized():
            gathered = [torch.empty_like(k) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(gathered, k)
            k, rank = torch.cat(gathered), torch.distributed.get_rank()
        logits = torch.einsum("nc,mc->nm", q, k) / self.T
        N = logits.shape[0]
        labels = torch.arange(N) + N * rank
        return F.cross_entropy(logits, labels) * (2 * self.T)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
        q1, q2 = self.predictor(self.f_q(x1)), self.predictor(self.f_q(x2))
        with torch.no_grad():
            for param_q, param_k in zip(self.f_q.parameters(), self.f_k.parameters(), strict=True):
                param_k.data = param_k.data * m + param_q.data * (1.0 - m)
            k1, k2 = self.f_k(x1), self.f_k(x2)
        return self.ctr(q1, k2) + self.ctr(q2, k1)
