"""Prompt modules: textual prompts, visual prompts, and the couplings between them.

* :class:`TextPrompts` — N textual prompts for a class set: ``n_ctx`` learnable context vectors per prompt (word- or
  randomly initialised, optionally class-specific), fixed words, the class name, deep prompts for blocks
  ``1 .. depth-1``. With ``n_ctx = 0`` it is a frozen hand-written template (zero-shot CLIP, VPT's text side).
* :class:`VisualPrompts` — M free visual prompt sets (VPT, IVLP), with deep prompts.
* :class:`LinearCoupling` — MaPLe/ALIGN: visual prompts are a learned linear map of the textual ones, one map per
  depth shared by the N prompts (so M = N).
* :class:`SharedPromptGenerator` — UPT: one shared token set transformed jointly, split into a textual and a
  visual prompt.
* :class:`MetaNet` — CoCoOp's image-conditioned bias on the context.

Sequences are ordered class-major: row ``k * N + n`` is class k with prompt n (docs/methods.md, 'Conventions').
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from vlprompt.backbone import PromptableCLIP
from vlprompt.errors import ConfigError

CLASS_POSITIONS = ("end", "middle", "front")


@dataclass
class ClassText:
    """The text side of a class set after the text encoder.

    Attributes:
        features: ``(K, N, D)`` prompt-level (EOT) features, not normalised.
        tokens: ``(K, N, L, D)`` token features (L = truncated length).
        reference_mask: ``(K, N, L)`` the token set of the original ALIGN code: positions ``0 .. e_k - 2`` with
            ``e_k`` the EOT position of prompt 0 of class k, used for every prompt of that class.
        paper_mask: ``(K, N, L)`` the token set of the paper: learnable context rows plus class-name rows.
    """

    features: torch.Tensor
    tokens: torch.Tensor
    reference_mask: torch.Tensor
    paper_mask: torch.Tensor


def _count_tokens(clip: PromptableCLIP, text: str) -> int:
    """Number of BPE tokens of ``text`` (without start/end tokens)."""
    if not text.strip():
        return 0
    ids = clip.tokenize([text])
    return int(clip.eot_index(ids)[0]) - 1


class TextPrompts(nn.Module):
    """N textual prompts over a class set.

    Args:
        clip: the backbone (read for widths, tokenizer and frozen word embeddings).
        classnames: the K class names.
        n_prompts: N.
        n_ctx: learnable context vectors per prompt (0 = a fixed hand-written template).
        ctx_init: one init string or one per prompt (fewer than N: the rest are random). With an init string the
            prompt reads ``"<init> <classname>."``; its first ``n_ctx`` tokens are learnable and start from their
            word embeddings, the remaining words stay fixed ("a photo of a" with n_ctx 2: "a photo" learnable,
            "of a" fixed). Without one it reads ``"X X … <classname>."`` with N(0, init_std²) context.
        template: used when ``n_ctx == 0``: a template with ``{}`` for the class name, or a list of templates
            (an ensemble: one prompt per template, N = len(template)).
        depth: prompts at blocks ``0 .. depth-1``; deep prompts (blocks ≥ 1) start N(0, init_std²).
        csc: class-specific context (CoOp CSC): one context per class and prompt.
        class_position: ``"end"``, ``"middle"`` or ``"front"`` (CoOp); deep prompts need ``"end"``.
    """

    def __init__(
        self,
        clip: PromptableCLIP,
        classnames: Sequence[str],
        n_prompts: int = 1,
        n_ctx: int = 2,
        ctx_init: str | Sequence[str] | None = None,
        template: str | Sequence[str] = "a photo of a {}.",
        depth: int = 1,
        csc: bool = False,
        class_position: str = "end",
        init_std: float = 0.02,
    ):
        super().__init__()
        if n_prompts < 1:
            raise ConfigError(f"n_prompts must be >= 1, got {n_prompts}")
        if n_ctx < 0:
            raise ConfigError(f"n_ctx must be >= 0, got {n_ctx}")
        if not 1 <= depth <= clip.text_layers:
            raise ConfigError(f"text prompt depth must be in 1..{clip.text_layers}, got {depth}")
        if class_position not in CLASS_POSITIONS:
            raise ConfigError(f"class_position must be one of {CLASS_POSITIONS}, got {class_position!r}")
        if n_ctx == 0 and (depth > 1 or csc):
            raise ConfigError("a fixed template (n_ctx 0) cannot have deep or class-specific prompts")
        if depth > 1 and class_position != "end":
            raise ConfigError("deep text prompts need class_position 'end'")
        self.clip = [clip]  # a list keeps the backbone out of this module's parameters and state dict
        if n_ctx == 0 and not isinstance(template, str):
            n_prompts = len(template)
        self.n_prompts, self.n_ctx, self.depth = n_prompts, n_ctx, depth
        self.csc, self.class_position = csc, class_position
        self.set_template(template)
        inits = [ctx_init] if isinstance(ctx_init, str) else list(ctx_init or [])
        if len(inits) > n_prompts:
            raise ConfigError(f"{len(inits)} ctx_init strings for {n_prompts} prompts")
        self.prefixes = [self._prefix(clip, init) for init in inits] + ["X " * n_ctx] * (n_prompts - len(inits))
        self.prefixes = [p.strip() for p in self.prefixes]
        width = clip.text_width

        ctx = torch.empty(n_prompts, n_ctx, width).normal_(0, init_std)
        with torch.no_grad():
            for n, init in enumerate(inits):
                ids = clip.tokenize([init])
                ctx[n] = clip.embed_tokens(ids)[0, 1 : 1 + n_ctx].float()
        if csc:
            ctx = ctx.unsqueeze(1).repeat(1, len(classnames), 1, 1)
        self.ctx = nn.Parameter(ctx) if n_ctx > 0 else None
        self.deep = nn.ParameterList(
            [nn.Parameter(torch.empty(n_prompts, n_ctx, width).normal_(0, init_std)) for _ in range(depth - 1)]
        )
        self.set_classnames(classnames)

    @staticmethod
    def _prefix(clip: PromptableCLIP, init: str) -> str:
        return init.replace("_", " ").strip()

    def _check_init_lengths(self) -> None:
        clip = self.clip[0]
        for prefix in self.prefixes:
            if _count_tokens(clip, prefix) < self.n_ctx:
                raise ConfigError(f"ctx_init {prefix!r} has fewer than n_ctx={self.n_ctx} tokens")

    def set_template(self, template: str | Sequence[str]) -> None:
        """The hand-written template(s) of a fixed (n_ctx 0) text side; ignored for learned prompts."""
        self.templates = [template] if isinstance(template, str) else list(template)
        if self.n_ctx == 0 and len(self.templates) != self.n_prompts:
            raise ConfigError(f"{len(self.templates)} templates for {self.n_prompts} fixed prompts")

    # ------------------------------------------------------------------ class set
    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Rebuild the fixed parts (token ids, word embeddings, masks) for new classes; context is kept."""
        if self.csc and self.ctx is not None and self.ctx.shape[1] != len(classnames):
            raise ConfigError("class-specific context (csc) is tied to its training classes and cannot be "
                              f"moved to a set of {len(classnames)} other classes")
        self._check_init_lengths()
        clip = self.clip[0]
        names = [name.replace("_", " ") for name in classnames]
        texts, name_starts, name_lengths = [], [], []
        for name in names:
            name_length = _count_tokens(clip, name)
            for n, prefix in enumerate(self.prefixes):
                if self.n_ctx == 0:
                    before = self.templates[n].split("{}")[0]
                    texts.append(self.templates[n].format(name))
                else:
                    before = prefix
                    texts.append(f"{prefix} {name}.")
                name_starts.append(1 + _count_tokens(clip, before))
                name_lengths.append(name_length)
        token_ids = clip.tokenize(texts)
        device = token_ids.device
        self.register_buffer("token_ids", token_ids, persistent=False)
        with torch.no_grad():
            self.register_buffer("word_embeddings", clip.embed_tokens(token_ids), persistent=False)
        self.register_buffer("eot", clip.eot_index(token_ids), persistent=False)
        self.register_buffer("name_start", torch.tensor(name_starts, device=device), persistent=False)
        self.register_buffer("name_length", torch.tensor(name_lengths, device=device), persistent=False)
        self.n_classes = len(names)

    # ------------------------------------------------------------------ inputs to the text encoder
    def context(self) -> torch.Tensor | None:
        """Layer-0 context ``(N, n_ctx, W)`` or ``(N, K, n_ctx, W)`` with csc."""
        return self.ctx

    def deep_prompts(self) -> list[torch.Tensor | None]:
        """Per block (index 0 unused): ``(N, n_ctx, W)``."""
        return [None] + list(self.deep)

    def input_embeddings(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Text encoder inputs ``(lead, K * N, L, W)``.

        Args:
            ctx: context to splice in, ``([lead,] N, n_ctx, W)`` (shared) or ``([lead,] N, K, n_ctx, W)`` (csc);
                default: the learned context. ``lead`` = 1 unless given (CoCoOp: one context per image).
        """
        words = self.word_embeddings.unsqueeze(0)  # (1, K*N, L, W)
        ctx = self.ctx if ctx is None else ctx
        if ctx is None or self.n_ctx == 0:
            return words
        K, N, b = self.n_classes, self.n_prompts, self.n_ctx
        if ctx.dim() == (4 if self.csc else 3):
            ctx = ctx.unsqueeze(0)
        lead = ctx.shape[0]
        if self.csc:
            rows = ctx.transpose(1, 2)  # (lead, K, N, b, W)
        else:
            rows = ctx.unsqueeze(1).expand(lead, K, N, b, ctx.shape[-1])
        rows = rows.reshape(lead, K * N, b, -1).to(words.dtype)
        words = words.expand(lead, -1, -1, -1)
        embeddings = torch.cat([words[:, :, :1], rows, words[:, :, 1 + b :]], dim=2)
        if self.class_position != "end":
            embeddings = embeddings.gather(2, self._position_index().expand_as(embeddings))
        return embeddings

    def _position_index(self) -> torch.Tensor:
        """Row permutation ``(1, K*N, L, 1)`` moving the class name to the front or middle (CoOp)."""
        length = self.word_embeddings.shape[1]
        index = torch.arange(length, device=self.token_ids.device).repeat(self.token_ids.shape[0], 1)
        b = self.n_ctx
        for row, (start, count) in enumerate(zip(self.name_start.tolist(), self.name_length.tolist())):
            ctx_rows = list(range(1, 1 + b))
            fixed_rows = list(range(1 + b, start))
            name_rows = list(range(start, start + count))
            if self.class_position == "front":
                order = name_rows + ctx_rows + fixed_rows
            else:
                half = b // 2
                order = ctx_rows[:half] + name_rows + ctx_rows[half:] + fixed_rows
            index[row, 1 : 1 + len(order)] = torch.tensor(order)
        return index.view(1, -1, length, 1)

    # ------------------------------------------------------------------ encode
    def encode(self, ctx: torch.Tensor | None = None, deep: Sequence[torch.Tensor | None] | None = None) -> ClassText:
        """Run the text encoder on all K·N prompts.

        Args:
            ctx: context override (UPT's generator output), same shape as :meth:`context`.
            deep: deep prompt override, per block ``(N, n_ctx, W)``.
        """
        clip = self.clip[0]
        embeddings = self.input_embeddings(ctx)[0]
        K, N = self.n_classes, self.n_prompts
        deep = self.deep_prompts() if deep is None else deep
        deep_rows = [None if p is None else p.repeat(K, 1, 1) for p in deep]
        out = clip.encode_text(embeddings=embeddings, eot_index=self.eot, deep_prompts=deep_rows)
        length = out.tokens.shape[1]
        return ClassText(
            features=out.features.view(K, N, -1),
            tokens=out.tokens.view(K, N, length, -1),
            reference_mask=self.reference_mask(length),
            paper_mask=self.paper_mask(length),
        )

    def reference_mask(self, length: int) -> torch.Tensor:
        """``(K, N, L)``: positions ``0 .. e_k - 2``, e_k = EOT of prompt 0 of class k (original ALIGN slice)."""
        eot_first = self.eot.view(self.n_classes, self.n_prompts)[:, :1]  # (K, 1)
        positions = torch.arange(length, device=self.eot.device)
        mask = positions.view(1, 1, -1) < (eot_first - 1).unsqueeze(-1)
        return mask.expand(self.n_classes, self.n_prompts, length)

    def paper_mask(self, length: int) -> torch.Tensor:
        """``(K, N, L)``: the learnable context rows and the class-name rows (ALIGN paper, Fig. 2)."""
        positions = torch.arange(length, device=self.eot.device).view(1, -1)
        start, count = self.name_start.view(-1, 1), self.name_length.view(-1, 1)
        if self.class_position != "end":  # after the permutation the name and context occupy rows 1 .. b+count
            mask = (positions >= 1) & (positions < 1 + self.n_ctx + count)
        else:
            mask = ((positions >= 1) & (positions < 1 + self.n_ctx)) | ((positions >= start) & (positions < start + count))
        return mask.view(self.n_classes, self.n_prompts, length)


class VisualPrompts(nn.Module):
    """M free visual prompt sets (VPT / IVLP style).

    Parameters: ``prompts (M, b, W_vis)`` for layer 0 and ``depth - 1`` deep tensors ``(M, b, W_vis)``.

    Args:
        init: ``"normal"`` (N(0, init_std²), the CLIP prompt-learning code) or ``"uniform"`` (original VPT:
            U(−v, v), v = sqrt(6 / (3·patch² + width))).
    """

    def __init__(self, clip: PromptableCLIP, n_sets: int = 1, n_ctx: int = 2, depth: int = 1,
                 init: str = "normal", init_std: float = 0.02):
        super().__init__()
        if not 1 <= depth <= clip.vision_layers:
            raise ConfigError(f"visual prompt depth must be in 1..{clip.vision_layers}, got {depth}")
        if n_ctx < 1 or n_sets < 1:
            raise ConfigError("visual prompts need n_ctx >= 1 and at least one set")
        width = clip.vision_width
        if init == "uniform":
            patch = clip.visual.conv1.kernel_size[0]
            bound = (6.0 / (3 * patch * patch + width)) ** 0.5
            make = lambda: torch.empty(n_sets, n_ctx, width).uniform_(-bound, bound)  # noqa: E731
        elif init == "normal":
            make = lambda: torch.empty(n_sets, n_ctx, width).normal_(0, init_std)  # noqa: E731
        else:
            raise ConfigError(f"visual prompt init must be 'normal' or 'uniform', got {init!r}")
        self.prompts = nn.Parameter(make())
        self.deep = nn.ParameterList([nn.Parameter(make()) for _ in range(depth - 1)])

    def forward(self) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """``(M, b, W_vis)`` layer-0 prompts and the per-block deep prompts (index 0 unused)."""
        return self.prompts, [None] + list(self.deep)


class LinearCoupling(nn.Module):
    """MaPLe/ALIGN coupling: visual prompt = Linear_i(textual prompt) at every prompted depth i.

    One ``Linear(W_text → W_vis)`` per depth, shared across the N prompts (MaPLe's coupling).
    """

    def __init__(self, clip: PromptableCLIP, depth: int):
        super().__init__()
        self.proj = nn.Linear(clip.text_width, clip.vision_width)
        self.deep_proj = nn.ModuleList([nn.Linear(clip.text_width, clip.vision_width) for _ in range(depth - 1)])

    def forward(self, ctx: torch.Tensor, deep: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, list]:
        """``ctx (N, b, W_t)``, deep per block → visual ``(N, b, W_v)`` and per-block deep prompts."""
        visual_deep = [None] + [proj(p) for proj, p in zip(self.deep_proj, deep[1:])]
        return self.proj(ctx), visual_deep


class SharedPromptGenerator(nn.Module):
    """UPT: a shared token set ``U (2n, W_t)`` transformed jointly, then split.

    One transformer-style layer over U (single-head self-attention with residual and LayerNorm, then a pre-norm
    MLP with residual); the first n outputs are the textual context, ``Linear(W_t → W_v)`` of the last n the
    visual prompts. The tokens attend to each other as the UPT paper describes (the released code's layout
    makes attention act per token; see docs/methods.md).
    """

    def __init__(self, clip: PromptableCLIP, n_ctx: int = 4, init_std: float = 0.02, dropout: float = 0.1):
        super().__init__()
        width = clip.text_width
        self.n_ctx = n_ctx
        self.tokens = nn.Parameter(torch.empty(2 * n_ctx, width).normal_(0, init_std))
        self.attention = nn.MultiheadAttention(width, num_heads=1, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, width))
        self.to_visual = nn.Linear(width, clip.vision_width)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Textual context ``(1, n, W_t)`` and visual prompts ``(1, n, W_v)``."""
        u = self.tokens.unsqueeze(0)
        u = self.norm(u + self.attention(u, u, u, need_weights=False)[0])
        u = u + self.mlp(self.mlp_norm(u))
        return u[:, : self.n_ctx], self.to_visual(u[:, self.n_ctx :])


class MetaNet(nn.Module):
    """CoCoOp's meta-net π: image feature ``(B, D)`` → context bias ``(B, W_t)`` (Linear → ReLU → Linear)."""

    def __init__(self, clip: PromptableCLIP, hidden_ratio: int = 16):
        super().__init__()
        dim = clip.embed_dim
        self.net = nn.Sequential(
            nn.Linear(dim, max(dim // hidden_ratio, 1)), nn.ReLU(inplace=True),
            nn.Linear(max(dim // hidden_ratio, 1), clip.text_width),
        )

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.net(image_features)
