"""A CLIP whose encoders accept prompt tokens at any layer, built on open_clip without forking it.

:func:`vlprompt.weights.load_clip` returns a :class:`PromptableCLIP`: a frozen open_clip model plus two forward
passes that walk its sub-modules (token embedding, positional embedding, residual blocks, final norm and
projection; patch embedding, class token, ``ln_pre``, blocks, ``ln_post``, ``proj``) so that prompt methods can

* give the text encoder their own input embeddings (learned context spliced between fixed word embeddings) and
  replace rows of the hidden sequence before chosen blocks ("deep prompts"),
* append visual prompt tokens after the patch tokens (MaPLe/ALIGN) or insert them after the class token
  (original VPT/UPT), and replace them before chosen blocks,
* read back the global features *and* every token projected into the joint embedding space.

Image towers walked: open_clip's own ViT (above), timm's ViT family inside open_clip's ``TimmModel`` (SigLIP,
EVA-02 with rotary embeddings; :meth:`PromptableCLIP._encode_image_timm`) and CLIP's ResNets (no prompts; the
attention pool's output at every position). Without prompts the forwards equal open_clip's ``encode_text`` /
``encode_image`` (tested). Widths, depths, context length and image size are always read from the wrapped model.

Prompt conventions (docs/methods.md, 'Conventions'): text deep prompts for block ``i >= 1`` replace rows ``[start, start + b)``
of the sequence *before* block ``i``; visual deep prompts replace the rows that hold the visual prompts. "Depth J"
means prompts at blocks ``0 .. J-1``, block 0 being the input embedding.

One class over ~560 lines, kept in one file on purpose: the text forward and the three image-tower walks
(open_clip ViT, timm ViT, ResNet) share the prompt-splicing helpers and must stay side by side to be checked
against each other and against open_clip's own forwards; loading weights is :mod:`vlprompt.weights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlprompt.errors import ConfigError

# Deep prompts per block: a mapping block index -> tensor, or a sequence whose entry i is for block i (None = no
# replacement at that block). Entry/key 0 is ignored by the encoders: layer-0 prompts enter through the inputs.
DeepPrompts = Mapping[int, torch.Tensor] | Sequence[torch.Tensor | None] | None


@dataclass
class TextOutput:
    """Output of :meth:`PromptableCLIP.encode_text`.

    Attributes:
        features: ``(n, D)`` projected hidden state at the EOT position (not normalised).
        tokens: ``(n, L, D)`` every position after ``ln_final`` and the projection. ``L`` is the context length,
            or the truncated length ``max(eot_index) + 1`` when truncation is on.
        eot_index: ``(n,)`` position of the end-of-text token of each sequence.
    """

    features: torch.Tensor
    tokens: torch.Tensor
    eot_index: torch.Tensor


@dataclass
class ImageOutput:
    """Output of :meth:`PromptableCLIP.encode_image`.

    Attributes:
        features: ``(B, D)`` projected class-token output after ``ln_post`` (not normalised).
        tokens: ``(B, T, D)`` every non-class token (patches and visual prompts, in sequence order) after
            ``ln_post`` and the projection; ``None`` for backbones without token outputs (ResNets).
        patch_slice: where the patch tokens lie inside ``tokens`` (the rest are prompt outputs).
    """

    features: torch.Tensor
    tokens: torch.Tensor | None
    patch_slice: slice

    @property
    def patch_tokens(self) -> torch.Tensor:
        """``(B, n_patches, D)`` the projected patch tokens only."""
        if self.tokens is None:
            raise ValueError("this backbone has no token outputs")
        return self.tokens[:, self.patch_slice]


def _deep_prompt_at(deep_prompts: DeepPrompts, block: int) -> torch.Tensor | None:
    if deep_prompts is None:
        return None
    if isinstance(deep_prompts, Mapping):
        return deep_prompts.get(block)
    return deep_prompts[block] if block < len(deep_prompts) else None


def _expand_rows(prompt: torch.Tensor, batch: int) -> torch.Tensor:
    """``(b, W)`` or ``(1|batch, b, W)`` -> ``(batch, b, W)``."""
    if prompt.dim() == 2:
        prompt = prompt.unsqueeze(0)
    return prompt.expand(batch, -1, -1)


def _deep_rows(deep_prompts: DeepPrompts, block: int, batch: int, n_prompts: int, dtype) -> torch.Tensor | None:
    """The ``(batch, b, W)`` deep prompt rows that replace the prompt rows before ``block``, or None."""
    prompt = _deep_prompt_at(deep_prompts, block) if block > 0 else None
    if prompt is None:
        return None
    rows = _expand_rows(prompt, batch).to(dtype)
    if rows.shape[1] != n_prompts:
        raise ValueError(f"deep visual prompts at block {block} have {rows.shape[1]} tokens, the layer-0 prompts "
                         f"{n_prompts}")
    return rows


def _splice_rows(x: torch.Tensor, rows: torch.Tensor, start: int, n_replaced: int = 0) -> torch.Tensor:
    """``x`` ``(B, T, W)`` with ``rows`` ``(B, b, W)`` at positions ``start .. start + b``, in place of the
    ``n_replaced`` rows that were there."""
    return torch.cat([x[:, :start], rows, x[:, start + n_replaced:]], dim=1)


class PromptableCLIP(nn.Module):
    """A frozen open_clip CLIP with prompt-aware forward passes.

    Args:
        model: an open_clip ``CLIP`` or ``CustomTextCLIP``. All its parameters are frozen.
        tokenizer: the model's tokenizer (callable ``list[str] -> LongTensor (n, context_length)``).
        name: a label for configs and reports (e.g. ``"ViT-B-16/openai"``).
    """

    def __init__(self, model: nn.Module, tokenizer: Callable, name: str = "clip"):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        # CLIP keeps text modules at the top level, CustomTextCLIP inside ``.text``; same attribute names.
        self.text = model if hasattr(model, "token_embedding") else model.text
        if getattr(self.text, "cls_emb", None) is not None:
            raise ConfigError(f"{name}: text towers with a CLS embedding are not supported for prompting")
        self.visual = model.visual
        self.image_tower = _image_tower_kind(self.visual)
        self.grad_checkpointing = False
        # Causal text masks make every position independent of later ones: truncating after the last EOT is exact.
        self.truncate_text = self.text.attn_mask is not None

    # ----------------------------------------------------------------- dimensions, read from the model
    @property
    def embed_dim(self) -> int:
        """Dimension D of the joint embedding space."""
        projection = self.text.text_projection
        if projection is None:
            return self.text.ln_final.normalized_shape[0]
        return projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1]

    @property
    def text_width(self) -> int:
        return self.text.token_embedding.embedding_dim

    @property
    def text_layers(self) -> int:
        return len(self.text.transformer.resblocks)

    @property
    def context_length(self) -> int:
        return self.text.positional_embedding.shape[0]

    @property
    def timm_trunk(self) -> nn.Module | None:
        """The trunk of a timm ViT-family image tower (EVA, SigLIP, timm ViTs, wrapped by open_clip's
        ``TimmModel``), or None: the modules :meth:`encode_image` walks for those towers."""
        return self.visual.trunk if self.image_tower == "timm_vit" else None

    @property
    def is_vit(self) -> bool:
        """Is the image tower a ViT that takes visual prompts: open_clip's own or a timm ViT-family trunk?"""
        return self.image_tower in ("vit", "timm_vit")

    def visual_prompts_unsupported(self) -> ConfigError:
        """The error for visual prompts on an image tower that cannot take them."""
        return ConfigError(
            f"{self.name}: visual prompts need a ViT image tower (open_clip's own, or a timm ViT/EVA/SigLIP trunk); "
            f"this model's is {type(self.visual).__name__}"
            + (f" over {type(self.visual.trunk).__name__}" if hasattr(self.visual, "trunk") else ""))

    @property
    def has_image_tokens(self) -> bool:
        """Does :meth:`encode_image` return local features? ViTs (patch tokens) and CLIP's ResNets (the attention
        pool's outputs at every spatial position); not other towers (e.g. ConvNeXt)."""
        return self.image_tower != "other"

    @property
    def token_grid(self) -> tuple[int, int]:
        """``(gh, gw)``: the spatial layout of the patch tokens (ViT patches; ResNet positions after stride 32)."""
        if self.image_tower == "timm_vit":
            grid = self.timm_trunk.patch_embed.grid_size
        elif self.image_tower == "vit":
            grid = self.visual.grid_size
        elif self.image_tower == "resnet":
            grid = round((self.visual.attnpool.positional_embedding.shape[0] - 1) ** 0.5)
        else:
            raise ConfigError(f"{self.name}: this image encoder has no token outputs")
        return (int(grid[0]), int(grid[1])) if isinstance(grid, (tuple, list)) else (int(grid), int(grid))

    @property
    def vision_width(self) -> int:
        if not self.is_vit:
            raise self.visual_prompts_unsupported()
        return self.timm_trunk.embed_dim if self.image_tower == "timm_vit" else self.visual.conv1.out_channels

    @property
    def vision_layers(self) -> int:
        if not self.is_vit:
            return 0
        return len(self.timm_trunk.blocks if self.image_tower == "timm_vit" else self.visual.transformer.resblocks)

    @property
    def image_size(self) -> int:
        size = self.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def image_mean(self) -> tuple[float, ...]:
        return tuple(getattr(self.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)

    @property
    def image_std(self) -> tuple[float, ...]:
        return tuple(getattr(self.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)

    @property
    def logit_scale(self) -> torch.Tensor:
        """``exp(logit_scale)`` of the model (100 for OpenAI CLIP); frozen."""
        return self.model.logit_scale.exp().detach()

    @property
    def dtype(self) -> torch.dtype:
        return self.text.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text.token_embedding.weight.device

    # ----------------------------------------------------------------- text
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids ``(n, context_length)`` on the model's device."""
        return self.tokenizer(list(texts)).to(self.device)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Frozen word embeddings ``(n, L) -> (n, L, W_text)``."""
        return self.text.token_embedding(token_ids).to(self.dtype)

    def eot_index(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Position of the end-of-text token, ``(n,)``, as open_clip pools it."""
        eos_id = getattr(self.text, "text_eos_id", None) or getattr(self.text, "eos_id", None)
        pool_type = getattr(self.text, "text_pool_type", None) or getattr(self.text, "pool_type", "argmax")
        if pool_type == "eos" and eos_id is not None:
            return (token_ids == eos_id).int().argmax(dim=-1)
        if pool_type == "last":
            return torch.full(token_ids.shape[:1], token_ids.shape[1] - 1, device=token_ids.device)
        if pool_type != "argmax":
            raise ConfigError(f"{self.name}: text pooling {pool_type!r} is not supported for prompting")
        return token_ids.argmax(dim=-1)

    def encode_text(
        self,
        token_ids: torch.Tensor | None = None,
        *,
        embeddings: torch.Tensor | None = None,
        eot_index: torch.Tensor | None = None,
        deep_prompts: DeepPrompts = None,
        deep_prompt_start: int = 1,
        truncate: bool | None = None,
    ) -> TextOutput:
        """Run the text tower with optional prompt embeddings.

        Args:
            token_ids: ``(n, L)`` token ids. Needed unless both ``embeddings`` and ``eot_index`` are given.
            embeddings: ``(n, L, W_text)`` input embeddings to use instead of the word embeddings of
                ``token_ids`` (the prompt learner splices its learned context into them).
            eot_index: ``(n,)`` EOT positions; default from ``token_ids``.
            deep_prompts: per block ``i >= 1`` a ``(b, W_text)`` or ``(n, b, W_text)`` tensor that replaces rows
                ``[deep_prompt_start, deep_prompt_start + b)`` before block ``i``.
            truncate: run the blocks only on positions ``0 .. max(eot_index)`` (exact for causal masks, the
                default when the model has one); the returned ``tokens`` then have that shorter length.
        """
        if embeddings is None:
            if token_ids is None:
                raise ValueError("encode_text needs token_ids or embeddings")
            embeddings = self.embed_tokens(token_ids)
        if eot_index is None:
            if token_ids is None:
                raise ValueError("encode_text with embeddings only needs eot_index")
            eot_index = self.eot_index(token_ids)
        n, length, _ = embeddings.shape
        if truncate if truncate is not None else self.truncate_text:
            length = int(eot_index.max()) + 1
            embeddings = embeddings[:, :length]
        cast = self.dtype
        x = embeddings.to(cast) + self.text.positional_embedding[:length].to(cast)
        mask = self.text.attn_mask
        if mask is not None:
            mask = mask[:length, :length]
        for block_index, block in enumerate(self.text.transformer.resblocks):
            prompt = _deep_prompt_at(deep_prompts, block_index) if block_index > 0 else None
            if prompt is not None:
                rows = _expand_rows(prompt, n).to(x.dtype)
                end = deep_prompt_start + rows.shape[1]
                x = torch.cat([x[:, :deep_prompt_start], rows, x[:, end:]], dim=1)
            x = self._run_block(self.text.transformer, block, x, mask)
        x = self.text.ln_final(x)
        tokens = self._project_text(x)
        features = tokens[torch.arange(n, device=tokens.device), eot_index]
        return TextOutput(features=features, tokens=tokens, eot_index=eot_index)

    def _project_text(self, x: torch.Tensor) -> torch.Tensor:
        projection = self.text.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, nn.Linear) else x @ projection

    # ----------------------------------------------------------------- image
    def encode_image(
        self,
        images: torch.Tensor,
        *,
        prompts: torch.Tensor | None = None,
        deep_prompts: DeepPrompts = None,
        prompt_position: str = "after_patches",
        patch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> ImageOutput:
        """Run the image tower with optional visual prompts.

        Args:
            images: ``(B, 3, H, W)`` normalised images.
            prompts: layer-0 visual prompts, ``(b, W_vis)`` shared or ``(B, b, W_vis)`` per image. They get no
                positional embedding and pass through ``ln_pre`` with the other tokens.
            deep_prompts: per block ``i >= 1`` a ``(b, W_vis)`` or ``(B, b, W_vis)`` tensor that replaces the
                prompt rows before block ``i``.
            prompt_position: ``"after_patches"`` (sequence = [CLS, patches, prompts], MaPLe/ALIGN) or
                ``"after_cls"`` ([CLS, prompts, patches], original VPT/UPT).
            patch_transform: applied to the patch-embedding grid ``(B, gh, gw, W_vis)`` before positional
                embeddings are added (the APLe image adapter hooks in here).
        """
        if not self.is_vit:
            if prompts is not None or deep_prompts is not None or patch_transform is not None:
                raise self.visual_prompts_unsupported()
            if self.image_tower == "resnet":
                return self._encode_image_resnet(images)
            features = self.visual(images.to(self.dtype))
            return ImageOutput(features=features, tokens=None, patch_slice=slice(0, 0))
        if prompt_position not in ("after_patches", "after_cls"):
            raise ConfigError(f"prompt_position must be 'after_patches' or 'after_cls', got {prompt_position!r}")
        if self.image_tower == "timm_vit":
            return self._encode_image_timm(images, prompts, deep_prompts, prompt_position, patch_transform)
        visual = self.visual
        if getattr(visual, "attn_pool", None) is not None:
            raise ConfigError(f"{self.name}: attention-pooled ViTs are not supported for prompting")
        batch = images.shape[0]
        x = visual.conv1(images.to(self.dtype))  # (B, W, gh, gw)
        if patch_transform is not None:
            x = patch_transform(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x.flatten(2).transpose(1, 2)  # (B, n_patches, W)
        n_patches = x.shape[1]
        cls = visual.class_embedding.to(x.dtype).expand(batch, 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.patch_dropout(x)
        start = x.shape[1] if prompt_position == "after_patches" else 1  # where the prompt rows go

        n_prompts = 0
        if prompts is not None:
            rows = _expand_rows(prompts, batch).to(x.dtype)
            n_prompts = rows.shape[1]
            x = _splice_rows(x, rows, start)
        x = visual.ln_pre(x)
        for block_index, block in enumerate(visual.transformer.resblocks):
            rows = _deep_rows(deep_prompts, block_index, batch, n_prompts, x.dtype)
            if rows is not None:
                x = _splice_rows(x, rows, start, n_replaced=n_prompts)
            x = self._run_block(visual.transformer, block, x, None)

        first_patch = n_prompts if prompt_position == "after_cls" else 0
        patch_rows = slice(1 + first_patch, 1 + first_patch + n_patches)
        if getattr(visual, "final_ln_after_pool", False):  # open_clip pools first, then normalises
            pooled = visual.ln_post(x[:, patch_rows].mean(dim=1) if visual.pool_type == "avg" else x[:, 0])
            x = visual.ln_post(x)
        else:
            x = visual.ln_post(x)
            pooled = x[:, patch_rows].mean(dim=1) if visual.pool_type == "avg" else x[:, 0]
        tokens = x[:, 1:]
        if visual.proj is not None:
            pooled = pooled @ visual.proj
            tokens = tokens @ visual.proj
        return ImageOutput(features=pooled, tokens=tokens, patch_slice=slice(first_patch, first_patch + n_patches))

    def _encode_image_timm(self, images, prompts, deep_prompts, prompt_position, patch_transform) -> ImageOutput:
        """The prompted forward of a timm ViT-family trunk, module by module as timm's own ``forward_features``
        and ``forward_head`` (then open_clip's projection head).

        Prompts sit after the patches or right after the prefix tokens (class token, registers), get no absolute
        position, pass through ``norm_pre`` with the other tokens and, under rotary embeddings (EVA-02, laid over
        every token after the prefix), the identity rotation. Pooling sees the image tokens only, so that without
        prompts everything equals open_clip's ``encode_image``. Token features are the tokens after the trunk's
        final norm, ``fc_norm`` and heads.
        """
        trunk, batch = self.timm_trunk, images.shape[0]
        if getattr(trunk, "rope_mixed", False) or getattr(trunk, "dynamic_img_size", False):
            raise ConfigError(f"{self.name}: mixed-mode rotary embeddings and dynamic image sizes are not supported")
        x = trunk.patch_embed(images.to(self.dtype))  # (B, gh·gw, W)
        if patch_transform is not None:
            x = patch_transform(x.view(batch, *self.token_grid, x.shape[-1])).flatten(1, 2)
        embedded = trunk._pos_embed(x)  # timm's ViT returns the tokens, EVA (tokens, rotary embedding or None)
        x, rope = embedded if isinstance(embedded, tuple) else (trunk.patch_drop(embedded), None)
        n_image_tokens, prefix = x.shape[1], trunk.num_prefix_tokens
        start = n_image_tokens if prompt_position == "after_patches" else prefix  # where the prompt rows go

        n_prompts = 0
        if prompts is not None:
            rows = _expand_rows(prompts, batch).to(x.dtype)
            n_prompts = rows.shape[1]
            x = _splice_rows(x, rows, start)
            if rope is not None:
                rope = _with_identity_rotations(rope, n_prompts, at_start=start == prefix)
        x = trunk.norm_pre(x)  # prompts pass through it with the other tokens, as in open_clip's ViT (ln_pre)
        for block_index, block in enumerate(trunk.blocks):
            rows = _deep_rows(deep_prompts, block_index, batch, n_prompts, x.dtype)
            if rows is not None:
                x = _splice_rows(x, rows, start, n_replaced=n_prompts)
            x = self._run_timm_block(block, x, rope)
        x = trunk.norm(x)
        image_tokens = torch.cat([x[:, :start], x[:, start + n_prompts:]], dim=1)
        pooled = self.visual.head(trunk.forward_head(image_tokens))
        tokens = self.visual.head(trunk.head(trunk.fc_norm(x[:, prefix:])))
        first_patch = n_prompts if start == prefix else 0
        return ImageOutput(features=pooled, tokens=tokens,
                           patch_slice=slice(first_patch, first_patch + n_image_tokens - prefix))

    def _run_timm_block(self, block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        run = (lambda h: block(h)) if rope is None else (lambda h: block(h, rope=rope))  # noqa: E731
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(run, x, use_reentrant=False, preserve_rng_state=False)
        return run(x)

    def _encode_image_resnet(self, images: torch.Tensor) -> ImageOutput:
        """CLIP's ResNet with the attention pool's output at every position: the pool attends from each of the
        1 + HW positions (the mean token first) to all of them and open_clip keeps position 0 as the image
        feature; the HW spatial outputs are the local features PLOT uses (PLOT, ICLR 2023)."""
        visual = self.visual
        x = visual.stem(images.to(self.dtype))
        for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            x = layer(x)
        outputs = _attention_pool_every_position(visual.attnpool, x)  # (B, 1 + HW, D)
        return ImageOutput(features=outputs[:, 0], tokens=outputs[:, 1:], patch_slice=slice(0, outputs.shape[1] - 1))

    # ----------------------------------------------------------------- shared
    def _run_block(self, transformer: nn.Module, block: nn.Module, x: torch.Tensor, mask) -> torch.Tensor:
        batch_first = getattr(transformer, "batch_first", True)
        if batch_first and torch.is_grad_enabled() and _is_plain_block(block):
            run = _plain_block_forward
        else:
            if not batch_first:
                x = x.transpose(0, 1)
            run = lambda b, h, m: b(h, attn_mask=m)  # noqa: E731
        if self.grad_checkpointing and torch.is_grad_enabled():
            # No RNG state to save: the frozen backbone runs without dropout (see train()).
            x = checkpoint(run, block, x, mask, use_reentrant=False, preserve_rng_state=False)
        else:
            x = run(block, x, mask)
        return x if batch_first else x.transpose(0, 1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward: less memory, more time (see docs/benchmarks.md)."""
        self.grad_checkpointing = enable

    def train(self, mode: bool = True) -> "PromptableCLIP":
        # The backbone is frozen: keep dropout/patch-dropout off whatever the prompt modules do.
        super().train(False)
        return self


def _image_tower_kind(visual: nn.Module) -> str:
    """Which forward :meth:`PromptableCLIP.encode_image` runs: ``"vit"`` (open_clip's VisionTransformer),
    ``"timm_vit"`` (a timm ViT-family trunk inside open_clip's TimmModel: the modules walked are all there),
    ``"resnet"`` (CLIP's ModifiedResNet, with its attention pool) or ``"other"`` (run as a whole, no tokens)."""
    if hasattr(visual, "conv1") and hasattr(visual, "class_embedding"):
        return "vit"
    trunk = getattr(visual, "trunk", None)
    walked = ("patch_embed", "_pos_embed", "norm_pre", "blocks", "norm", "forward_head", "num_prefix_tokens")
    if trunk is not None and all(hasattr(trunk, name) for name in walked):
        return "timm_vit"
    return "resnet" if hasattr(visual, "attnpool") else "other"


def _with_identity_rotations(rope: torch.Tensor, n_rows: int, at_start: bool = False) -> torch.Tensor:
    """timm's concatenated ``[sin | cos]`` rotary embedding ``(..., N, 2d)`` with ``n_rows`` rows of the identity
    rotation (sin 0, cos 1) added along the token axis, after the others (or before them with ``at_start``):
    tokens there keep their features unrotated."""
    sin, cos = rope.chunk(2, dim=-1)
    shape = (*rope.shape[:-2], n_rows, sin.shape[-1])
    identity = torch.cat([sin.new_zeros(shape), cos.new_ones(shape)], dim=-1)
    return torch.cat([identity, rope] if at_start else [rope, identity], dim=-2)


def _attention_pool_every_position(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ``AttentionPool2d`` on the feature map ``x`` ``(B, C, H, W)``, returning the output at every
    position ``(B, 1 + H·W, D)`` instead of position 0 only (same weights, same arithmetic)."""
    x = x.flatten(2).permute(2, 0, 1)  # (HW, B, C)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + pool.positional_embedding[:, None, :].to(x.dtype)
    x, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True, training=False, need_weights=False,
    )
    return x.transpose(0, 1)


def _is_plain_block(block: nn.Module) -> bool:
    """Is ``block`` open_clip's ``ResidualAttentionBlock`` with a packed self-attention and no hooks?"""
    attn = getattr(block, "attn", None)
    return (
        type(block) is ResidualAttentionBlock
        and type(attn) is nn.MultiheadAttention
        and attn.batch_first
        and attn._qkv_same_embed_dim
        and attn.bias_k is None
        and not attn.add_zero_attn
        and not hasattr(block, "ln_1_kv")
        and not (block._forward_pre_hooks or block._forward_hooks)  # hooks must see the block's own call
    )


def _plain_block_forward(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``block(x, attn_mask=mask)`` for a plain block (:func:`_is_plain_block`), batch-first ``(n, L, W)``.

    The same operations as open_clip's block and ``nn.MultiheadAttention``, with the projections applied to the
    contiguous batch-first sequence. ``nn.MultiheadAttention`` with gradients enabled transposes its input to
    sequence-first and projects the non-contiguous result; with frozen weights ``matmul`` then runs a batched
    product against ``L`` copies of the weight, which makes a training step about 20% slower on CPU.
    """
    attn = block.attn
    n, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)  # (n, H, L, W/H)
    mask = None if mask is None else mask.to(x.dtype)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn.dropout if attn.training else 0.0)
    y = F.linear(y.transpose(1, 2).reshape(n, length, width), attn.out_proj.weight, attn.out_proj.bias)
    x = x + block.ls_1(y)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def describe(clip: PromptableCLIP) -> dict:
    """A JSON-able description of the backbone for run folders."""
    return {
        "name": clip.name,
        "embed_dim": clip.embed_dim,
        "text_width": clip.text_width,
        "text_layers": clip.text_layers,
        "vision_width": clip.vision_width if clip.is_vit else None,
        "vision_layers": clip.vision_layers,
        "image_size": clip.image_size,
    }


__all__ = [
    "ImageOutput",
    "PromptableCLIP",
    "TextOutput",
    "describe",
]
