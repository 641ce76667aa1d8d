"""The Cross-Modal Attention Fusion block (paper Sec. 4.3, Eq. 13) and its regularisers."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from wsi_cmaf.errors import ModelConfigError
from wsi_cmaf.models.config import parse_tau_init

logger = logging.getLogger(__name__)


def init_log_tau(spec: str, num_heads: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw log tau for each head from a Table 7 spec such as ``"lognormal(0,0.1)"``.

    The parameter is log tau so tau = exp(.) stays > 0 without constraints or clamping in the
    optimiser; LogNormal(mu, sigma) is then simply Normal(mu, sigma) on the parameter.
    """
    kind, p = parse_tau_init(spec)
    if kind == "fixed":
        tau = torch.full((num_heads,), p[0])
    elif kind == "uniform":
        tau = p[0] + (p[1] - p[0]) * torch.rand(num_heads, generator=generator)
    elif kind == "normal":
        # Normal(1, 0.1) is > 0 with overwhelming probability; the floor only guards the log.
        tau = (p[0] + p[1] * torch.randn(num_heads, generator=generator)).clamp_min(1e-3)
    else:  # lognormal
        return p[0] + p[1] * torch.randn(num_heads, generator=generator)
    return tau.log()


def attention_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each attention row: (B, H, Nq, Nk) -> (B, H, Nq)."""
    return -(attn * torch.log(attn.clamp_min(1e-12))).sum(dim=-1)


def diversity_regulariser(attn: torch.Tensor) -> torch.Tensor:
    """Negative normalised mean squared Frobenius distance between heads' attention maps.

    ||A_i - A_j||_F^2 <= 2 Nq (rows are distributions), so the value lies in [-1, 0]; minimising
    it maximises pairwise differences. Squared norm: the plain norm has an infinite gradient
    when two heads coincide, which is exactly where training starts.
    """
    b, h, nq, _ = attn.shape
    flat = attn.reshape(b, h, -1)
    d2 = torch.cdist(flat.float(), flat.float()).pow(2)  # (B, H, H)
    pairs = h * (h - 1)  # ordered pairs, i != j (diagonal is zero)
    return -(d2.sum(dim=(1, 2)) / (pairs * 2.0 * nq)).mean()


def log_frequency_prior(num_classes: int, class_counts: tuple[float, ...] | None = None) -> torch.Tensor:
    """log pi_c from class counts (C,); a uniform prior when ``class_counts`` is None."""
    if class_counts is None:
        return torch.full((num_classes,), -math.log(num_classes))
    if len(class_counts) != num_classes:
        raise ModelConfigError(f"dfa_class_counts has {len(class_counts)} entries for {num_classes} classes")
    counts = torch.as_tensor(class_counts, dtype=torch.float32)
    if not bool((counts > 0).all()):
        raise ModelConfigError("dfa_class_counts must all be > 0")
    return (counts / counts.sum()).log()


class DFAReadout(nn.Module):
    """Dynamic Focal Attention: a class-attention readout of the fused tokens with class biases.

    C learnable class queries attend over the fused tokens with the CMAF heads' temperatures:
    l[h, c, n] = <q_hc, k_hn> / (sqrt(d_h) tau_h) + b[h, c]. The softmax runs over *classes*
    (each location shares its attention among the classes): a softmax over tokens would cancel
    a per-class constant, so the bias would do nothing. b starts at log class frequency and is
    learned, so it moves from "how common is c" towards "how much evidence does c need".
    Each class's readout (mean over tokens of its attention-weighted values) goes through one
    shared linear map to a logit offset, so class identity enters only through the attention.
    """

    def __init__(self, dim: int, num_heads: int, num_classes: int,
                 class_counts: tuple[float, ...] | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.num_classes = num_heads, dim // num_heads, num_classes
        self.class_queries = nn.Parameter(torch.randn(num_heads, num_classes, self.head_dim) * 0.02)
        self.key = nn.Linear(dim, dim)
        self.class_bias = nn.Parameter(log_frequency_prior(num_classes, class_counts).repeat(num_heads, 1))
        self.out = nn.Linear(dim, 1, bias=False)  # a bias shared by all classes would cancel

    @torch.no_grad()
    def reset_prior(self, class_counts: tuple[float, ...] | None) -> None:
        """Re-initialise the biases from class counts (e.g. counted on the training data)."""
        self.class_bias.copy_(log_frequency_prior(self.num_classes, class_counts).repeat(self.num_heads, 1))

    def forward(self, tokens: torch.Tensor, tau: torch.Tensor,
                aux: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Fused tokens (B, N, D) -> per-class logit offsets (B, C)."""
        b, n, _ = tokens.shape
        k = self.key(tokens).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # B,H,N,dh
        v = tokens.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        scale = 1.0 / (math.sqrt(self.head_dim) * tau.to(k.dtype).view(1, -1, 1, 1))
        logits = torch.einsum("hcd,bhnd->bhcn", self.class_queries.to(k.dtype), k) * scale
        attn = torch.softmax(logits + self.class_bias.to(k.dtype).view(1, self.num_heads, -1, 1), dim=2)
        readout = torch.einsum("bhcn,bhnd->bchd", attn, v).reshape(b, self.num_classes, -1) / n
        if aux is not None:
            aux["dfa_attn"] = attn  # (B, H, C, N)
            aux["dfa_bias"] = self.class_bias  # (H, C), for per-class logging
            aux["dfa_class_mass"] = attn.float().mean(dim=(0, 1, 3))  # (C,)
        return self.out(readout).squeeze(-1)


class CMAFBlock(nn.Module):
    """Queries from F_s, keys/values from F_t, per-head learnable temperature, gated fusion.

    Inputs are token maps on the same grid: F_s (B, D_s, h, w), F_t (B, D_t, h, w).
    Output F_fused (B, D_t, h, w). With ``aux`` it also returns the attention maps, their entropy,
    the gate and the three regularisers.
    """

    def __init__(
        self,
        spatial_dim: int = 512,
        dim: int = 480,
        num_heads: int = 8,
        tau_init: str = "lognormal(0,0.1)",
        learn_temperature: bool = True,
        gating: bool = True,
        reg_diversity: bool = True,
        reg_entropy: bool = True,
        reg_orthogonality: bool = True,
        attn_dropout: float = 0.0,
        dfa_classes: int = 0,
        dfa_class_counts: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.attn_dropout = attn_dropout
        self.use_div, self.use_ent, self.use_orth = reg_diversity, reg_entropy, reg_orthogonality
        # F_s projected to D_t is the query (W_Q) *and* the fusion's local path: a second
        # D_t x D_t query map after it would add 0.23 M parameters for little expressiveness
        # (two linear maps compose). Likewise no output projection after the heads: the gate's
        # 1x1 conv mixes the heads right after. Both choices keep CMAF-Net in the paper's
        # parameter budget (see MODEL.md).
        self.proj_s = nn.Linear(spatial_dim, dim)
        self.norm_s = nn.LayerNorm(dim)
        self.norm_t = nn.LayerNorm(dim)
        self.kv = nn.Linear(dim, 2 * dim)
        log_tau = init_log_tau(tau_init, num_heads)
        if learn_temperature:
            self.log_tau = nn.Parameter(log_tau)
        else:  # "w/o temperature learning": a buffer, saved with the weights but never trained
            self.register_buffer("log_tau", log_tau)
        # The entropy regulariser weighs the heads uniformly. Learned per-head weights (the former
        # design) get gradient from the regulariser alone, dR/dw_h = s_h (e_h - R), so their softmax
        # drifts to whichever head already has the lowest entropy: "when beneficial" cannot be
        # learned that way (MODEL.md "Regularisers"). The zeros are kept as a buffer so checkpoints
        # that saved the learned logits still load; their values are not used.
        if reg_entropy:
            self.register_buffer("entropy_logits", torch.zeros(num_heads))
        else:
            self.entropy_logits = None
        self.gate = nn.Conv2d(2 * dim, dim, 1) if gating else None
        # Created last and only when asked, so a DFA-off block draws the same initial weights
        # and holds the same tensors as a block without the readout.
        self.dfa = DFAReadout(dim, num_heads, dfa_classes, dfa_class_counts) if dfa_classes else None

    def attach_dfa(self, num_classes: int, class_counts: tuple[float, ...] | None = None) -> DFAReadout:
        """Add the DFA class readout (CMAF-Net calls this after building its head, see there)."""
        self.dfa = DFAReadout(self.dim, self.num_heads, num_classes, class_counts)
        return self.dfa

    @property
    def tau(self) -> torch.Tensor:
        """Per-head temperature tau^(h) = exp(log tau^(h)), shape (H,)."""
        return self.log_tau.exp()

    def forward(
        self, f_s: torch.Tensor, f_t: torch.Tensor, aux: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Fuse; when ``aux`` is a dict, fill it with monitoring tensors and regularisers."""
        b, _, h, w = f_s.shape
        # (B, C, h, w) -> (B, N, C) tokens: a free view for channels_last maps (inference path).
        s_tok = self.norm_s(self.proj_s(f_s.flatten(2).transpose(1, 2)))  # (B, N, D)
        t_tok = self.norm_t(f_t.flatten(2).transpose(1, 2))  # (B, Nk, D)
        q = s_tok.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        k, v = self.kv(t_tok).unflatten(-1, (2, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        # Eq. 13 divides the logits by sqrt(d_h) * tau_h. SDPA's `scale` is one float for all
        # heads, so the per-head part is folded into the queries (q / tau_h), which is exactly
        # equivalent, and SDPA keeps its fused kernels with scale = 1/sqrt(d_h).
        q = q / self.tau.to(q.dtype).view(1, -1, 1, 1)
        scale = 1.0 / math.sqrt(self.head_dim)
        drop = self.attn_dropout if self.training else 0.0
        if aux is None:
            att = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=scale)
        else:
            # Monitoring/training path: materialise A^(h) (the fused kernel never exposes it).
            attn = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
            att = F.dropout(attn, drop, self.training) @ v
            self._fill_attention_aux(attn, aux)
        att = att.transpose(1, 2).reshape(b, h * w, self.dim)  # (B, N, D), heads concatenated
        # The gate's 1x1 conv is a linear map per token: apply it to the tokens and fuse there,
        # then view the result as a channels_last (B, D, h, w) map. No token<->map copies.
        if self.gate is not None:
            gate_w = self.gate.weight.flatten(1)  # (D, 2D, 1, 1) -> (D, 2D)
            g = torch.sigmoid(F.linear(torch.cat([att, s_tok], dim=-1), gate_w, self.gate.bias))
            fused = torch.addcmul(s_tok, g, att - s_tok)  # g * att + (1 - g) * s
        else:  # "w/o gating": an equal, fixed mix
            g = None
            fused = 0.5 * (att + s_tok)
        fused = fused.view(b, h, w, self.dim).permute(0, 3, 1, 2)
        if aux is not None:
            if g is not None:
                aux["gate"] = g.view(b, h, w, self.dim).permute(0, 3, 1, 2)
            if self.use_orth:
                # Squared cosine per token: anti-aligned features are as redundant as aligned ones.
                cos = F.cosine_similarity(att.float(), s_tok.float(), dim=-1, eps=1e-6)
                aux["reg_orthogonality"] = cos.pow(2).mean()
        return fused

    def _fill_attention_aux(self, attn: torch.Tensor, aux: dict[str, torch.Tensor]) -> None:
        aux["tau"] = self.tau
        aux["attn"] = attn
        ent = attention_entropy(attn.float())  # (B, H, Nq)
        aux["attn_entropy"] = ent.mean(dim=(0, 2))
        if self.use_div and self.num_heads > 1:
            aux["reg_diversity"] = diversity_regulariser(attn)
        if self.entropy_logits is not None:
            # Entropy normalised by its maximum log(Nk) so the term is in [0, 1] at any grid size.
            max_ent = math.log(max(attn.shape[-1], 2))
            weights = torch.full((self.num_heads,), 1.0 / self.num_heads, device=attn.device)
            aux["reg_entropy"] = (weights * aux["attn_entropy"] / max_ent).sum()
            aux["entropy_weights"] = weights
