"""CLIP image and text encoders from open_clip, with dense features in the joint image-text space.

`CLIPBackbone` wraps any open_clip ResNet or ViT model. Besides the usual global image embedding
and text embeddings it gives, for images of any size:

* `dense_features(images, mode)`: one joint-space embedding per patch (ViT) or per stride-32
  location (ResNet), computed by one of the training-free last-layer variants of `DENSE_MODES`;
* `feature_maps(images, indices)`: intermediate feature maps for decoders.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import nn

from ..errors import InputError, UsageError

# How each dense mode changes the last block of a ViT:
# (attention kind, keep the residual path, keep the feed-forward path).
_VIT_LAST_BLOCK = {
    "plain": ("qk", True, True),  # unchanged CLIP: attention of q against k
    "maskclip": ("value", True, True),  # MaskCLIP: value path only, then residual and FFN
    "sclip": ("csa", True, True),  # SCLIP: correlative self-attention, q-q plus k-k
    "clearclip": ("qq", False, False),  # ClearCLIP: q-q attention, no residual, no FFN
    "naclip": ("kk_gauss", False, False),  # NACLIP: k-k attention + Gaussian neighbourhood
}
DENSE_MODES = tuple(_VIT_LAST_BLOCK)
RESNET_DENSE_MODES = ("plain", "maskclip")


@dataclass
class DenseFeatures:
    """Dense joint-space features of a batch of images.

    features: (B, D, h, w) embeddings in the image-text space (not normalised).
    keys: (B, C, h, w) key features of the last attention layer, for MaskCLIP's key smoothing.
    """

    features: torch.Tensor
    keys: torch.Tensor


# How each dense mode resizes the ViT positional embedding to a new grid. 'size': bicubic to the grid size
# (open_clip, MaskCLIP, TCL). 'scale': SCLIP's / ClearCLIP's / NACLIP's `interpolate_pos_encoding`, bicubic with
# scale factors ((h + 0.1) / g, (w + 0.1) / g) that also set the sampling positions, and only when the number of
# tokens changes. 'bilinear': bilinear to the grid size (align_corners=False), DenseCLIP's resize (ViT and ResNet
# attention pool alike).
POS_RESIZE = {"sclip": "scale", "clearclip": "scale", "naclip": "scale"}


def resize_grid_embedding(pos: torch.Tensor, grid: tuple[int, int], extra_tokens: int = 1, how: str = "size"
                          ) -> torch.Tensor:
    """Resize a (extra + g*g, C) positional embedding to (extra + grid[0]*grid[1], C); `how`: 'size', 'scale' or
    'bilinear', as described above POS_RESIZE. The extra (class) tokens are kept as they are."""
    extra, spatial = pos[:extra_tokens], pos[extra_tokens:]
    side = int(math.isqrt(spatial.shape[0]))
    if (side, side) == tuple(grid) or (how == "scale" and grid[0] * grid[1] == side * side):
        return pos  # bilinear and bicubic to the same size are the identity
    spatial = spatial.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    if how == "scale":
        factors = ((grid[0] + 0.1) / side, (grid[1] + 0.1) / side)
        spatial = F.interpolate(spatial, scale_factor=factors, mode="bicubic", align_corners=False,
                                recompute_scale_factor=False)
    else:
        mode = "bilinear" if how == "bilinear" else "bicubic"
        spatial = F.interpolate(spatial, size=grid, mode=mode, align_corners=False)
    spatial = spatial.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([extra, spatial], dim=0)


def gaussian_neighbourhood(grid: tuple[int, int], std: float, device=None) -> torch.Tensor:
    """NACLIP's additive attention bias: (1 + h*w, 1 + h*w), exp(-d^2 / 2 std^2) between patches, 0 for the class token."""
    ys, xs = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], dim=1).float()
    bias = torch.exp(-torch.cdist(coords, coords).square() / (2 * std**2))
    return F.pad(bias, (1, 0, 1, 0))


def convolution_layout(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in the memory layout ResNet convolutions run fastest on here: channels-last on a CPU (oneDNN,
    15-25% faster, outputs equal), as it is elsewhere."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


class CLIPBackbone(nn.Module):
    """A CLIP model (open_clip) with global, text and dense embeddings.

    Build it with `ovdense.backbones.load_clip`. Images given to the `encode_image`,
    `dense_features` and `feature_maps` methods are (B, 3, H, W) tensors already normalised with
    `image_mean` / `image_std`; any H and W work (positional embeddings are resized).
    """

    def __init__(self, model: nn.Module, tokenizer, name: str, weights: str):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.weights = weights
        visual = model.visual
        if isinstance(visual, VisionTransformer):
            self.arch = "vit"
        elif isinstance(visual, ModifiedResNet):
            self.arch = "resnet"
        else:
            raise UsageError(f"{name}: dense features need an open_clip ViT or ModifiedResNet image tower, got "
                             f"{type(visual).__name__}; `ovdense models` lists which architectures have dense modes")
        self.image_mean = tuple(getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
        self.image_std = tuple(getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
        self.naclip_std = 5.0

    # ----------------------------------------------------------------------------------- basics
    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def embed_dim(self) -> int:
        return self.visual.output_dim

    @property
    def image_size(self) -> int:
        """The side of the square images the model was trained on (open_clip stores an int or a pair)."""
        size = self.visual.image_size
        return size if isinstance(size, int) else size[0]

    @property
    def stride(self) -> int:
        """Pixels per dense-feature cell."""
        return self.visual.patch_size[0] if self.arch == "vit" else 32

    @property
    def dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.visual.parameters()).device

    @property
    def identity(self) -> str:
        """A string naming the architecture and the weights it was loaded from (embedding caches use
        `text_fingerprint`)."""
        return f"{self.name}@{self.weights}"

    # -------------------------------------------------------------------------- text fingerprint
    @property
    def text_fingerprint(self) -> str:
        """sha256 (hex) of the text tower's weights, which alone determine text embeddings; keys the text cache.

        Hashes every tensor's name, shape and dtype, the values of small tensors and a fixed strided sample
        of 2^14 values of the others (ViT-B/16: ~20 ms instead of reading 250 MB). Remembered until a text
        tensor is replaced or changed in place (training, `load_state_dict`).
        """
        m = self.model
        parts = {"text": m.text} if hasattr(m, "text") else {  # open_clip's CustomTextCLIP, else CLIP
            n: getattr(m, n) for n in ("token_embedding", "positional_embedding", "transformer", "ln_final",
                                       "text_projection")}
        tensors = {}
        for prefix, part in parts.items():
            if isinstance(part, nn.Module):
                tensors.update(part.state_dict(prefix=f"{prefix}.", keep_vars=True))
            elif isinstance(part, torch.Tensor):
                tensors[prefix] = part
        state = tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in tensors.values())
        if getattr(self, "_text_fingerprint", (None, None))[0] != state:
            digest = hashlib.sha256()
            for name, t in tensors.items():
                values = t.detach().flatten()
                values = values[::-(-values.numel() // 2**14)] if values.numel() > 2**14 else values
                digest.update(f"{name} {tuple(t.shape)} {t.dtype};".encode())
                digest.update(values.cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._text_fingerprint = (state, digest.hexdigest())
        return self._text_fingerprint[1]

    def supported_modes(self) -> tuple[str, ...]:
        return DENSE_MODES if self.arch == "vit" else RESNET_DENSE_MODES

    # ------------------------------------------------------------------------------------- text
    def tokenize(self, texts: list[str], truncate: bool = False) -> torch.Tensor:
        """(N,) strings -> (N, context_length) token ids.

        An over-long prompt is an error, not a silent cut, unless `truncate` (training captions).
        """
        limit = getattr(self.tokenizer, "context_length", None)
        encode = getattr(self.tokenizer, "encode", None)
        if limit and encode and not truncate:
            for text in texts:
                n = len(encode(text)) + 2  # start and end tokens
                if n > limit:
                    shown = text if len(text) <= 60 else text[:57] + "..."
                    raise InputError(f"the prompt {shown!r} is {n} tokens long; the text encoder of {self.name} "
                                     f"takes at most {limit}: shorten the class name")
        return self.tokenizer(texts)

    def encode_text(self, texts: list[str], truncate: bool = False) -> torch.Tensor:
        """(N,) strings -> (N, D) text embeddings (not normalised), equal to open_clip's `encode_text`."""
        tokens = self.tokenize(texts, truncate).to(self.device)
        m = self.model
        if getattr(m, "text_pool_type", None) != "argmax" or getattr(m, "attn_mask", None) is None:
            return m.encode_text(tokens)
        # Causal attention: the end-of-text token (the largest id) never attends to the padding after
        # it, so the padding is dropped; CPU text encoding gets several times faster.
        length = int(tokens.argmax(dim=-1).max()) + 1
        tokens = tokens[:, :length]
        return self.encode_token_embeddings(m.token_embedding(tokens), tokens.argmax(dim=-1))

    def encode_token_embeddings(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """The text tower on given token embeddings: x (N, L, width), end-of-text positions eot (N,) -> (N, D).

        Lets prompt learning (DenseCLIP's context tokens) insert learned embeddings between the words.
        """
        m = self.model
        length = x.shape[1]
        cast = m.transformer.get_cast_dtype()
        x = x.to(cast) + m.positional_embedding[:length].to(cast)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:length, :length]))
        x = x[torch.arange(len(x), device=x.device), eot]
        return m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection

    def image_pyramid(self, images: torch.Tensor, indices: list[int], pos_resize: str = "size",
                      class_embedding_twice: bool = False) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """One pass for dense decoders: intermediate maps (B, C_i, h_i, w_i) at `indices` (as in `feature_maps`),
        the global embedding (B, D) and the dense embeddings (B, D, h, w) of CLIP's own last layer (ResNet:
        the attention pool at every location; ViT: ln_post and proj on every token). Differentiable.

        pos_resize: how the positional embedding (ViT, or the ResNet attention pool's) reaches the feature grid, as in
        POS_RESIZE. class_embedding_twice: ViT only, see `_vit_embed`."""
        images = images.to(self.dtype)
        if self.arch == "resnet":
            stages = self._resnet_trunk(images)
            tokens = self._attention_pool(stages[-1], pos_resize=pos_resize)  # (B, 1 + h*w, D)
            grid = tuple(stages[-1].shape[-2:])
            maps = [stages[i] for i in indices]
        else:
            maps, x, grid = self._vit_maps(images, indices, run_all=True, pos_resize=pos_resize,
                                           class_embedding_twice=class_embedding_twice)
            tokens = self.visual.ln_post(x) @ self.visual.proj
        dense = tokens[:, 1:].transpose(1, 2).reshape(len(tokens), -1, *grid)
        return maps, tokens[:, 0], dense

    # ------------------------------------------------------------------------------------ image
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) global image embedding, equal to open_clip's `encode_image` at its native size."""
        images = images.to(self.dtype)
        if self.arch == "resnet":
            return self.global_attention_pool(self._resnet_trunk(images)[-1])
        x, _ = self._vit_embed(images)
        x = self.vit_blocks(x, self.visual.transformer.resblocks)
        pooled, _ = self.visual._pool(x)
        return pooled @ self.visual.proj

    def dense_features(self, images: torch.Tensor, mode: str = "maskclip") -> DenseFeatures:
        """(B, 3, H, W) -> DenseFeatures with (B, D, H/stride, W/stride) joint-space features."""
        if mode not in self.supported_modes():
            raise UsageError(f"dense mode {mode!r} is not available for {self.name} ({self.arch}); "
                             f"choose one of {', '.join(self.supported_modes())}")
        images = images.to(self.dtype)
        if self.arch == "resnet":
            return self._resnet_dense(images, mode)
        return self._vit_dense(images, mode)

    def feature_maps(self, images: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        """Intermediate maps: ViT block outputs or ResNet stage outputs, each (B, C, h, w).

        indices: block (ViT, 0-based) or stage (ResNet, 0..3) numbers; negative counts from the end.
        """
        images = images.to(self.dtype)
        if self.arch == "resnet":
            stages = self._resnet_trunk(images)
            return [stages[i] for i in indices]
        return self._vit_maps(images, indices, run_all=False)[0]

    def resize_position_grid(self, size: int, how: str = "bilinear") -> None:
        """Replace the image tower's positional embedding (ViT tokens, or the ResNet attention pool's) by its resize
        (`how`, as in POS_RESIZE) to the grid of `size` x `size` images, which becomes the native size: DenseCLIP
        does this once when it loads CLIP, for its training size, then resizes that grid to each input's."""
        v = self.visual
        owner = v if self.arch == "vit" else v.attnpool
        grid = (size // self.stride,) * 2
        old = owner.positional_embedding
        resized = resize_grid_embedding(old.detach(), grid, how=how).clone()
        owner.positional_embedding = nn.Parameter(resized, requires_grad=old.requires_grad)
        v.image_size = (size, size) if isinstance(v.image_size, (tuple, list)) else size
        if self.arch == "vit":
            v.grid_size = grid

    # ------------------------------------------------------------------------------ ViT internals
    def _vit_embed(self, images: torch.Tensor, pos_resize: str = "size", class_embedding_twice: bool = False
                   ) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) -> tokens (B, 1 + h*w, width) after ln_pre, and the grid (h, w).

        class_embedding_twice: the class token is class_embedding + (positional_embedding[0] + class_embedding), as
        DenseCLIP's CLIPVisionTransformer computes it (a quirk its released ViT checkpoints were trained with)."""
        v = self.visual
        x = v.conv1(images)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        pos = resize_grid_embedding(v.positional_embedding, grid, how=pos_resize).to(x.dtype)
        if class_embedding_twice:
            pos = torch.cat([pos[:1] + v.class_embedding.to(x.dtype), pos[1:]])
        x = torch.cat([cls, x], dim=1) + pos
        return v.ln_pre(v.patch_dropout(x)), grid

    def _vit_maps(self, images: torch.Tensor, indices: list[int], run_all: bool, pos_resize: str = "size",
                  class_embedding_twice: bool = False) -> tuple[list[torch.Tensor], torch.Tensor, tuple[int, int]]:
        """Block outputs at `indices` as maps (B, width, h, w), the last tokens computed (B, N, width) and the
        grid; blocks after the last wanted one run only with `run_all`. pos_resize, class_embedding_twice: as in
        `_vit_embed`."""
        x, grid = self._vit_embed(images, pos_resize, class_embedding_twice)
        blocks = self.visual.transformer.resblocks
        wanted = {i % len(blocks) for i in indices}
        outputs = {}
        for i, block in enumerate(blocks if run_all else blocks[: max(wanted) + 1]):
            x = self.vit_blocks(x, [block])
            if i in wanted:
                outputs[i] = x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, *grid)
        return [outputs[i % len(blocks)] for i in indices], x, grid

    def vit_blocks(self, x: torch.Tensor, blocks) -> torch.Tensor:
        """Run blocks on batch-first tokens (B, N, width)."""
        batch_first = getattr(self.visual.transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)
        for block in blocks:
            x = block(x)
        return x if batch_first else x.transpose(0, 1)

    def _vit_dense(self, images: torch.Tensor, mode: str) -> DenseFeatures:
        v = self.visual
        if v.attn_pool is not None:
            raise UsageError(f"{self.name}: dense features are not defined for attention-pooled ViTs")
        x, grid = self.vit_tokens(images, depth=-1, pos_resize=POS_RESIZE.get(mode, "size"))
        x, keys = self.vit_last_block(x, mode, grid)
        tokens = v.ln_post(x[:, 1:]) @ v.proj  # (B, h*w, D)
        batch = images.shape[0]
        return DenseFeatures(
            features=tokens.transpose(1, 2).reshape(batch, -1, *grid),
            keys=keys[:, 1:].transpose(1, 2).reshape(batch, -1, *grid),
        )

    def vit_tokens(self, images: torch.Tensor, depth: int, pos_resize: str = "size"
                   ) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) -> tokens (B, 1 + h*w, width) after the first `depth` blocks (negative: all but the
        last -depth), and the grid (h, w). pos_resize: see POS_RESIZE."""
        x, grid = self._vit_embed(images.to(self.dtype), pos_resize)
        return self.vit_blocks(x, self.visual.transformer.resblocks[:depth]), grid

    def vit_last_block(self, x: torch.Tensor, mode: str, grid: tuple[int, int], block: nn.Module | None = None,
                       with_keys: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A last block in one of `DENSE_MODES`: (B, N, width) -> tokens (B, N, width), keys (B, N, width) or None.

        The keys are MaskCLIP's, for its key smoothing: out_proj(W_k ln_1(x) + b_k) (computed `with_keys` only).

        block: the transformer block to run (default: this CLIP's last; TCL passes its trainable copy).
        """
        block = self.visual.transformer.resblocks[-1] if block is None else block
        attn = block.attn
        if not isinstance(attn, nn.MultiheadAttention):
            raise UsageError(f"{self.name}: dense modes need nn.MultiheadAttention blocks")
        kind, residual, ffn = _VIT_LAST_BLOCK[mode]
        q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        if kind == "value":
            out = v
        else:
            heads = attn.num_heads
            q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, hd)
            if kind == "qk":
                out = F.scaled_dot_product_attention(q, k, v)
            elif kind == "csa":
                out = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
            elif kind == "qq":
                out = F.scaled_dot_product_attention(q, q, v)
            else:  # kk_gauss
                bias = gaussian_neighbourhood(grid, self.naclip_std, x.device).to(x.dtype)
                out = F.scaled_dot_product_attention(k, k, v, attn_mask=bias)
            out = out.transpose(1, 2).flatten(2)
            k = k.transpose(1, 2).flatten(2)
        out, k = attn.out_proj(out), attn.out_proj(k) if with_keys else None
        if residual:
            out = x + block.ls_1(out)
        if ffn:
            out = out + block.ls_2(block.mlp(block.ln_2(out)))
        return out, k

    # --------------------------------------------------------------------------- ResNet internals
    def _resnet_trunk(self, images: torch.Tensor, stages: int = 4) -> list[torch.Tensor]:
        """(B, 3, H, W) -> the first `stages` stage outputs, each (B, C_i, H/2^(i+2), W/2^(i+2)).

        On a CPU the images go in channels-last (`convolution_layout`)."""
        v = self.visual
        x = v.stem(convolution_layout(images))
        out = []
        for layer in (v.layer1, v.layer2, v.layer3, v.layer4)[:stages]:
            x = layer(x)
            out.append(x)
        return out

    def _pool_tokens(self, x: torch.Tensor, pos_resize: str = "size") -> torch.Tensor:
        """(B, C, h, w) -> the attention pool's input (1 + h*w, B, C): the mean token first, positions added."""
        tokens = x.flatten(2).permute(2, 0, 1)  # (h*w, B, C)
        tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens], dim=0)
        pos = resize_grid_embedding(self.visual.attnpool.positional_embedding, tuple(x.shape[-2:]), how=pos_resize)
        return tokens + pos[:, None].to(x.dtype)

    def _attention_pool(self, x: torch.Tensor, pos_resize: str = "size") -> torch.Tensor:
        """CLIP's attention pool with every location as a query: (B, C, h, w) -> (B, 1 + h*w, D), token 0 global.

        pos_resize: how the positional embedding reaches (h, w), as in POS_RESIZE.
        """
        pool = self.visual.attnpool
        tokens = self._pool_tokens(x, pos_resize)
        out, _ = F.multi_head_attention_forward(
            query=tokens, key=tokens, value=tokens, embed_dim_to_check=tokens.shape[-1],
            num_heads=pool.num_heads, q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
            v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
            in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
            use_separate_proj_weight=True, training=False, need_weights=False,
        )
        return out.transpose(0, 1)

    def global_attention_pool(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP's attention pool for its one global query, the mean token: (B, C, h, w) -> (B, D).

        Exactly equal to `_attention_pool(x)[:, 0]` in a folded form that never projects the h*w tokens: per head,
        q_h . (W_k,h t + b_k,h) = t . (W_k,h^T q_h) + const (the constant cancels in the softmax), and
        sum_t p_t (W_v,h t + b_v,h) = W_v,h (sum_t p_t t) + b_v,h. For RegionCLIP's 7x7 RoIs this does 1/20 of the
        multiply-adds.
        """
        pool = self.visual.attnpool
        tokens = self._pool_tokens(x).transpose(0, 1)  # (B, 1 + h*w, C)
        heads = pool.num_heads
        head_dim = pool.q_proj.out_features // heads
        query = pool.q_proj(tokens[:, 0]).reshape(len(tokens), heads, head_dim)  # (B, H, d)
        key_weight = pool.k_proj.weight.reshape(heads, head_dim, -1)  # (H, d, C)
        folded = torch.einsum("bhd,hdc->bhc", query * head_dim ** -0.5, key_weight)  # (B, H, C)
        attention = (folded @ tokens.transpose(1, 2)).softmax(dim=-1)  # (B, H, 1 + h*w)
        mixed = attention @ tokens  # (B, H, C)
        values = torch.einsum("bhc,hdc->bhd", mixed, pool.v_proj.weight.reshape(heads, head_dim, -1))
        return pool.c_proj(values.flatten(1) + pool.v_proj.bias)

    def _resnet_dense(self, images: torch.Tensor, mode: str) -> DenseFeatures:
        x = self._resnet_trunk(images)[-1]
        batch, _, h, w = x.shape
        pool = self.visual.attnpool
        tokens = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        if mode == "maskclip":  # value path only: no positional embedding, no query-key attention
            dense = pool.c_proj(pool.v_proj(tokens))
        else:
            dense = self._attention_pool(x)[:, 1:]
        keys = pool.k_proj(tokens)
        return DenseFeatures(
            features=dense.transpose(1, 2).reshape(batch, -1, h, w),
            keys=keys.transpose(1, 2).reshape(batch, -1, h, w),
        )
