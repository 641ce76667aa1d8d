"""Information-bottleneck pieces of CMAF-Net (paper Sec. 3.1-3.2, Eqs. 4-5).

* :class:`VariationalBottleneck` — q(z|x) = N(mu(x), diag(sigma(x)^2)) on a branch's pooled
  features; the KL to the N(0, I) prior (Eq. 4) is returned per sample in closed form.
* :func:`normalized_hsic` — the differentiable dependence estimate used for I(Z_s; Z_t) (Eq. 5).
"""

from __future__ import annotations

import torch
from torch import nn


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL( N(mu, diag(exp(logvar))) || N(0, I) ) per sample: 0.5 * sum(mu^2 + var - 1 - logvar)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)


class VariationalBottleneck(nn.Module):
    """Stochastic encoder z = mu + sigma * eps (training) or z = mu (evaluation)."""

    def __init__(self, in_features: int, dim: int, logvar_clamp: float = 10.0) -> None:
        super().__init__()
        self.encoder = nn.Linear(in_features, 2 * dim)
        self.dim = dim
        self.logvar_clamp = logvar_clamp
        # Start near the prior's scale (sigma ~ 1 would drown mu in noise at step 0): small
        # weights and logvar bias -4 give sigma ~ 0.14, so the classifier can learn at once.
        nn.init.normal_(self.encoder.weight, std=0.02)
        nn.init.zeros_(self.encoder.bias)
        with torch.no_grad():
            self.encoder.bias[dim:].fill_(-4.0)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, in_features) -> (z, mu, logvar), each (B, dim)."""
        mu, logvar = self.encoder(h).chunk(2, dim=-1)
        # Clamp so exp(logvar) cannot overflow in fp16 or blow up the KL in early training.
        logvar = logvar.clamp(-self.logvar_clamp, self.logvar_clamp)
        if self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        else:
            z = mu
        return z, mu, logvar


def _gaussian_gram(x: torch.Tensor) -> torch.Tensor:
    """RBF Gram matrix with the median heuristic: sigma^2 = median of the off-diagonal sq. distances."""
    sq = torch.cdist(x, x).pow(2)
    n = x.shape[0]
    # The off-diagonal entries without a boolean-mask gather (whose output size is only known
    # after a device->host sync): in the flattened n*n matrix the diagonal sits every n+1
    # elements, so dropping element 0 and viewing the rest as (n-1, n+1) puts one diagonal
    # entry at the end of each row. Same entries in the same order as sq[~eye(n)]: same median.
    off = sq.reshape(-1)[1:].reshape(n - 1, n + 1)[:, :n]
    # Bandwidth is a statistic of the batch, not something to optimise through: detach it.
    sigma2 = off.detach().median().clamp_min(1e-6)
    return torch.exp(-sq / (2.0 * sigma2))


def normalized_hsic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Normalised HSIC (kernel CKA) between two batches of vectors, in [0, 1].

    nHSIC = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with Gaussian kernels (median heuristic)
    and the biased estimator HSIC = tr(K H L H) / (n - 1)^2. It is 0 iff the kernel embeddings
    are independent in the batch and 1 for identical embeddings up to isotropic scaling; it is
    differentiable and needs no extra critic network (unlike InfoNCE/MINE). Batches of fewer than
    3 samples carry no dependence information: the result is then 0 (still connected to the graph).
    """
    x = x.float().flatten(1)
    y = y.float().flatten(1)
    n = x.shape[0]
    if n < 3:
        return (x.sum() + y.sum()) * 0.0
    k, l_ = _gaussian_gram(x), _gaussian_gram(y)
    kc = k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()
    lc = l_ - l_.mean(dim=0, keepdim=True) - l_.mean(dim=1, keepdim=True) + l_.mean()
    hsic_kl = (kc * lc).sum()
    hsic_kk = (kc * kc).sum()
    hsic_ll = (lc * lc).sum()
    return hsic_kl / torch.sqrt(hsic_kk * hsic_ll).clamp_min(1e-12)
