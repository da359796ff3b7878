"""DenseCLIP (Rao et al., CVPR 2022): language-guided fine-tuning of a CLIP image encoder for segmentation.

The image encoder (ResNet or ViT, from CLIP) is fine-tuned; the text encoder stays frozen and reads
the class names after learnable context tokens (CoOp). Vision-to-language prompting: after the text
encoder ('post', the paper's choice) a small transformer decoder lets the class embeddings attend to
the image's visual context, t <- t + gamma * decoder(t, [global, dense]) with gamma initialised at 1e-4;
before it ('pre'), the context tokens themselves are decoded from the visual context per image. The
pixel-text score map (K channels) is concatenated to a backbone level, a Semantic FPN decodes, and an
auxiliary cross-entropy on score_map / tau (0.07) supervises the score map directly.
With `language_guidance=False` the same network without text is the paper's baseline (CLIP init + FPN).

It computes what the authors' code (raoyongming/DenseCLIP, segmentation/denseclip) computes, module names
included (`ovdense.convert.denseclip` reads their checkpoints): positional embeddings resized bilinearly (to
the training grid once, then to each input's), ViT blocks [3, 5, 7, 11] made strides 4-32 by fpn1-fpn4 (each
starting with GroupNorm), 8 context tokens before 5 name tokens, a 3-layer pre-norm context decoder, mmseg's FPN
and FPNHead. Where the official code has a quirk (the ViT's class embedding added twice, mmseg's loss averaged
over ignored pixels too) the official behaviour is an option, off for new training.

The FPN head classifies into the K training classes. At inference a vocabulary is mapped onto them by
name (`inference='head'`, classes outside training are never predicted) or scored open-vocabulary by
the score map of any names (`inference='score_map'`).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from ..backbones import CLIPBackbone
from ..data.datasets import IGNORE_INDEX
from ..errors import InputError
from ..presets import Protocol
from .base import DenseMethod

UNKNOWN_CLASS_LOGIT = -1e4  # the head's logit for a name outside its training classes: never the argmax
TEXT_TOWER = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")  # CLIP's
logger = logging.getLogger(__name__)


def _name_key(name: str) -> str:
    """A class name without case and spaces."""
    return "".join(name.split()).lower()


def _name_lookup(class_names: list[str]) -> dict[str, int]:
    """Class index by exact name, and by `_name_key` where that is unambiguous: the dataset list 'chestofdrawers'
    (ovdense's ade150, SCLIP's) reaches the head's 'chest of drawers' (mmseg's, which DenseCLIP was trained on)."""
    keys = [_name_key(name) for name in class_names]
    lookup = {key: i for i, key in enumerate(keys) if keys.count(key) == 1}
    return {**lookup, **{name: i for i, name in enumerate(class_names)}}


# ------------------------------------------------------------------------------------- prompting
class ContextPromptEncoder(nn.Module):
    """CoOp on a frozen CLIP text tower: [SOT] + `context_tokens` learned embeddings + name tokens + [EOT].

    name_length: tokens kept per class name, with its start and end tokens (5 in the paper).
    """

    def __init__(self, backbone: CLIPBackbone, context_tokens: int = 8, name_length: int = 5):
        super().__init__()
        self.backbone = [backbone]  # a list: the frozen CLIP is registered once, by the owning model
        self.name_length = name_length
        width = backbone.model.token_embedding.weight.shape[1]
        self.contexts = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, context_tokens, width)))

    def tokenize(self, names: list[str]) -> torch.Tensor:
        """(K,) names -> (K, name_length) token ids; a name that does not fit is an error."""
        backbone = self.backbone[0]
        tokens = backbone.tokenize(names)
        too_long = [n for n, t in zip(names, tokens) if int(t.argmax()) >= self.name_length]
        if too_long:
            raise ValueError(f"class names {too_long[:3]} are longer than the {self.name_length - 2} word tokens "
                             "this DenseCLIP reads (name_length); shorten them")
        return tokens[:, :self.name_length]

    def forward(self, tokens: torch.Tensor, contexts: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (K, L), contexts (B, n, width) (default: the learned ones) -> text embeddings (B, K, D)."""
        backbone = self.backbone[0]
        contexts = self.contexts if contexts is None else contexts
        words = backbone.model.token_embedding(tokens.to(backbone.device))  # (K, L, width)
        batch, classes = len(contexts), words.shape[0]
        words = words[None].expand(batch, -1, -1, -1)
        contexts = contexts[:, None].expand(-1, classes, -1, -1).to(words.dtype)
        x = torch.cat([words[:, :, :1], contexts, words[:, :, 1:]], dim=2).flatten(0, 1)
        eot = (tokens.argmax(dim=-1) + contexts.shape[2]).to(words.device).repeat(batch)
        return backbone.encode_token_embeddings(x, eot).view(batch, classes, -1)


class _Attention(nn.Module):
    """DenseCLIP's `Attention`: queries (B, N, dim) attend to memory (B, M, dim); q/k/v projections without bias,
    then `proj` and dropout -> (B, N, dim)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q, k, v = (proj(t).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for proj, t in ((self.q_proj, x), (self.k_proj, memory), (self.v_proj, memory)))
        return self.proj_drop(self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)))


class _DecoderLayer(nn.Module):
    """DenseCLIP's `TransformerDecoderLayer` (pre-norm): self-attention, cross-attention to memory, MLP (GELU)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.self_attn, self.cross_attn = _Attention(dim, heads, dropout), _Attention(dim, heads, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.self_attn(y, y)
        x = x + self.cross_attn(self.norm2(x), memory)
        return x + self.dropout(self.mlp(self.norm3(x)))


class ContextDecoder(nn.Module):
    """DenseCLIP's `ContextDecoder`: queries (B, K, query_dim) attend to visual context (B, N, visual_dim) ->
    (B, K, out_dim). Linear weights start truncated-normal (std 0.02), biases 0."""

    def __init__(self, query_dim: int, visual_dim: int, out_dim: int, width: int = 256, heads: int = 4,
                 layers: int = 3, dropout: float = 0.1):
        super().__init__()
        self.memory_proj = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, width), nn.LayerNorm(width))
        self.text_proj = nn.Sequential(nn.LayerNorm(query_dim), nn.Linear(query_dim, width))
        self.decoder = nn.ModuleList(_DecoderLayer(width, heads, dropout) for _ in range(layers))
        self.out_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out_dim))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, queries: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        memory = self.memory_proj(visual)
        x = self.text_proj(queries)
        for layer in self.decoder:
            x = layer(x, memory)
        return self.out_proj(x)


# ----------------------------------------------------------------------------------- Semantic FPN
def _conv_module(in_channels: int, out_channels: int) -> nn.Sequential:
    """mmcv's ConvModule as FPNHead builds it: 3x3 conv (no bias), BatchNorm, ReLU; Kaiming-normal (fan_out)."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_channels), activate=nn.ReLU(inplace=True)))


class SemanticFPN(nn.Module):
    """mmseg's FPN neck (1x1 laterals, nearest top-down, 3x3 outputs; torchvision's FeaturePyramidNetwork computes
    the same) + FPNHead (Kirillov et al.): levels (B, C_i, h_i, w_i) with strides doubling from the finest ->
    logits (B, classes, h_0, w_0). Level i passes max(1, i) conv modules, each followed by a 2x bilinear upsampling
    when i > 0; the levels are summed (bilinear, align_corners=False), then dropout and a 1x1 classifier.
    Initialised as mmseg: Xavier-uniform neck, Kaiming scale heads, classifier normal (std 0.01)."""

    def __init__(self, in_channels: list[int], classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.neck = FeaturePyramidNetwork(in_channels, channels)
        for module in self.neck.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.scale_heads = nn.ModuleList()
        for i in range(len(in_channels)):
            blocks = []
            for _ in range(max(1, i)):
                blocks.append(_conv_module(channels, channels))
                if i > 0:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*blocks))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        pyramid = list(self.neck(OrderedDict((str(i), x) for i, x in enumerate(levels))).values())
        out = self.scale_heads[0](pyramid[0])
        for head, x in zip(self.scale_heads[1:], pyramid[1:]):
            out = out + F.interpolate(head(x), size=out.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv_seg(self.dropout(out))


PYRAMID_LAYOUTS = ("official", "grid")


class ViTPyramid(nn.Module):
    """DenseCLIP's fpn1-fpn4 (CLIPVisionTransformer): four same-stride ViT maps (B, width, h, w) -> four levels, each
    op starting with GroupNorm(1, width). Patch 16: 4x up (ConvT, BN, GELU, ConvT), 2x up (ConvT), as is, 2x
    max-pool: strides 4, 8, 16 and 32 pixels. Patch 8, layout 'official': 2x up (ConvT), as is, 2x and 4x max-pool,
    strides 4-32 again; layout 'grid': patch 16's ops whatever the patch (strides 2-16 for patch 8: finer maps for
    small images, ovdense's choice for its 96 px synthetic world).

    grid_level: the level at the patch grid's stride; min_patches: the fewest patches a side the pooling needs.
    """

    def __init__(self, width: int, patch: int, layout: str = "official"):
        super().__init__()
        def norm():
            return nn.GroupNorm(1, width)

        def up():
            return nn.ConvTranspose2d(width, width, 2, 2)
        if patch == 8 and layout == "official":
            ops = [nn.Sequential(norm(), up()), norm(), nn.Sequential(norm(), nn.MaxPool2d(2)),
                   nn.Sequential(norm(), nn.MaxPool2d(4))]
            self.grid_level, self.min_patches = 1, 4
        else:
            ops = [nn.Sequential(norm(), up(), nn.BatchNorm2d(width), nn.GELU(), up()), nn.Sequential(norm(), up()),
                   norm(), nn.Sequential(norm(), nn.MaxPool2d(2))]
            self.grid_level, self.min_patches = 2, 2
        self.ops = nn.ModuleList(ops)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [op(x) for op, x in zip(self.ops, maps)]


# ------------------------------------------------------------------------------------------ model
@dataclass
class PromptedText:
    """What DenseCLIP.embed_text gives the predictor: the queries' tokens and their training-class index (-1: none)."""

    tokens: torch.Tensor
    head_index: torch.Tensor

    def to(self, device) -> "PromptedText":
        return PromptedText(self.tokens.to(device), self.head_index.to(device))


class DenseCLIP(DenseMethod):
    """DenseCLIP (or, with language_guidance=False, its CLIP + Semantic FPN baseline) over a CLIP backbone, which it
    owns: its image tower is fine-tuned in place (and, with train_size, its positional embedding resized).

    class_names: the K training classes. prompting: 'post' or 'pre' (vision-to-language prompting).
    levels: backbone levels fed to the FPN (ResNet stages 0..3; ViT blocks, 4 of them: [3, 5, 7, 11] for 12 blocks,
        the blocks ending the 2nd, 3rd, 4th and 6th sixth of any depth).
    score_level: the level the score map is concatenated to (default: 3 for ResNet, the patch grid's for ViT: 2 with
        patch 16, as the paper).
    pyramid: ViT only, how blocks become levels: 'official' (the authors' fpn1-fpn4 for the patch size) or 'grid'
        (patch 16's ops for any patch), see ViTPyramid.
    train_size: the side of the training crops: the positional embeddings are resized bilinearly to their grid once,
        here, as the official code does when it loads CLIP (None: keep CLIP's grid). At every forward that grid is
        resized bilinearly to the input's (both towers' official behaviour).
    class_embedding_twice: ViT only: add class_embedding to the class token twice, as the official ViT does; its
        released checkpoints need it (a quirk: new training keeps the default False).
    loss_average: 'valid' averages each cross-entropy over the labelled pixels (PyTorch's); 'all' over all pixels,
        ignored ones counting 0 (mmseg < 0.23, which the official models were trained with).
    text_tower_in_file: `save` writes the frozen text tower too, so the file needs no CLIP download (converted
        official models, whose files hold it).
    """

    name = "denseclip"
    scores = "logits"

    def __init__(self, backbone: CLIPBackbone, class_names: list[str], language_guidance: bool = True,
                 prompting: str = "post", context_tokens: int = 8, name_length: int = 5, decoder_width: int = 256,
                 decoder_heads: int = 4, decoder_layers: int = 3, fpn_channels: int = 256, tau: float = 0.07,
                 aux_weight: float = 0.4, gamma_init: float = 1e-4, levels: list[int] | None = None,
                 score_level: int | None = None, inference: str = "head", train_size: int | None = None,
                 class_embedding_twice: bool = False, loss_average: str = "valid", text_tower_in_file: bool = False,
                 pyramid: str = "official"):
        super().__init__(backbone)
        if prompting not in ("post", "pre") or inference not in ("head", "score_map"):
            raise ValueError("prompting is 'post' or 'pre'; inference is 'head' or 'score_map'")
        if loss_average not in ("valid", "all") or pyramid not in PYRAMID_LAYOUTS:
            raise ValueError("loss_average is 'valid' or 'all'; pyramid is 'official' or 'grid'")
        if not class_names or len(set(class_names)) != len(class_names):
            raise ValueError("DenseCLIP needs a non-empty list of distinct training class names")
        if inference == "score_map" and not language_guidance:
            raise ValueError("the baseline has no score map; use inference='head'")
        vit = backbone.arch == "vit"
        if class_embedding_twice and not vit:
            raise ValueError("class_embedding_twice applies to ViT backbones only")
        if vit:
            depth = len(backbone.visual.transformer.resblocks)
            levels = [(depth * k + 3) // 6 - 1 for k in (2, 3, 4, 6)] if levels is None else levels
            self.pyramid = ViTPyramid(backbone.visual.conv1.out_channels, backbone.stride, pyramid)
            score_level = self.pyramid.grid_level if score_level is None else score_level
            self.min_crop_patches = self.pyramid.min_patches
        else:
            levels = [0, 1, 2, 3] if levels is None else levels
            self.pyramid = nn.Identity()
            score_level = 3 if score_level is None else score_level
        self.config = {"class_names": list(class_names), "language_guidance": language_guidance,
                       "prompting": prompting, "context_tokens": context_tokens, "name_length": name_length,
                       "decoder_width": decoder_width, "decoder_heads": decoder_heads,
                       "decoder_layers": decoder_layers, "fpn_channels": fpn_channels, "tau": tau,
                       "aux_weight": aux_weight, "gamma_init": gamma_init, "levels": levels,
                       "score_level": score_level, "inference": inference, "train_size": train_size,
                       "class_embedding_twice": class_embedding_twice, "loss_average": loss_average,
                       "text_tower_in_file": text_tower_in_file, "pyramid": pyramid}
        self.class_names, self.language_guidance, self.prompting = list(class_names), language_guidance, prompting
        self.levels, self.score_level, self.tau, self.aux_weight = levels, score_level, tau, aux_weight
        self.inference, self.class_embedding_twice, self.loss_average = inference, class_embedding_twice, loss_average
        self._head_index = _name_lookup(self.class_names)
        if train_size is not None:
            backbone.resize_position_grid(train_size, how="bilinear")
        backbone.requires_grad_(False)
        backbone.visual.requires_grad_(True)  # the image encoder is fine-tuned, the text encoder frozen

        with torch.no_grad():  # the sizes of the levels, from a probe image (eval mode: BN statistics untouched)
            was_training = backbone.training
            probe = torch.zeros(1, 3, 64, 64, device=backbone.device)
            maps, _, dense = backbone.eval().image_pyramid(probe, levels)
            backbone.train(was_training)
        channels = [m.shape[1] for m in maps]
        embed_dim = dense.shape[1]
        classes = len(class_names)
        if language_guidance:
            self.prompt = ContextPromptEncoder(backbone, context_tokens, name_length)
            token_width = self.prompt.contexts.shape[-1]
            if prompting == "post":
                self.context_decoder = ContextDecoder(embed_dim, embed_dim, embed_dim, decoder_width, decoder_heads,
                                                      decoder_layers)
                self.gamma = nn.Parameter(torch.full((embed_dim,), gamma_init))
            else:
                self.context_decoder = ContextDecoder(token_width, embed_dim, token_width, decoder_width,
                                                      decoder_heads, decoder_layers)
            self.register_buffer("class_tokens", self.prompt.tokenize(class_names), persistent=False)
            channels[score_level] += classes
        self.decoder = SemanticFPN(channels, classes, fpn_channels)

    @property
    def saved_prefixes(self) -> tuple[str, ...]:
        """The frozen text tower, when the file is to hold it (text_tower_in_file)."""
        return tuple(f"backbone.model.{part}" for part in TEXT_TOWER) if self.config["text_tower_in_file"] else ()

    def train(self, mode: bool = True) -> "DenseCLIP":
        super().train(mode)
        if self.language_guidance:  # the frozen text tower stays in eval mode
            for name, module in self.backbone.model.named_children():
                if name != "visual":
                    module.eval()
        return self

    # --------------------------------------------------------------------------------- forward
    def encode_image(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {'level0'..'level3': maps, 'global': (B, D), 'dense': (B, D, h, w)}."""
        maps, global_embedding, dense = self.backbone.image_pyramid(images, self.levels, pos_resize="bilinear",
                                                                    class_embedding_twice=self.class_embedding_twice)
        out = {f"level{i}": m.float() for i, m in enumerate(maps)}
        return {**out, "global": global_embedding.float(), "dense": dense.float()}

    def text_embeddings(self, tokens: torch.Tensor, image: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class tokens (K, L) -> (B, K, D), prompted by each image's visual context [global, dense]."""
        dense = image["dense"]
        visual = torch.cat([image["global"][:, None], dense.flatten(2).transpose(1, 2)], dim=1)  # (B, 1 + h*w, D)
        if self.prompting == "pre":
            queries = self.prompt.contexts.expand(len(dense), -1, -1)
            return self.prompt(tokens, queries + self.context_decoder(queries, visual)).float()
        text = self.prompt(tokens).float().expand(len(dense), -1, -1)
        return text + self.gamma * self.context_decoder(text, visual)

    def score_map(self, image: dict[str, torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        """Cosine of dense embeddings (B, D, h, w) with prompted texts (B, K, D) -> (B, K, h, w)."""
        return torch.einsum("bdhw,bkd->bkhw", F.normalize(image["dense"], dim=1), F.normalize(text, dim=-1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {'logits': (B, K, H/4', W/4') over the training classes, 'score_map': (B, K, h, w)}."""
        image = self.encode_image(images)
        levels = self.pyramid([image[f"level{i}"] for i in range(len(self.levels))])
        out = {}
        if self.language_guidance:
            out["score_map"] = self.score_map(image, self.text_embeddings(self.class_tokens, image))
            levels[self.score_level] = torch.cat([levels[self.score_level], out["score_map"]], dim=1)
        out["logits"] = self.decoder(levels)
        return out

    def losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy of the FPN logits and (weighted `aux_weight`: the official identity head) of score_map / tau,
        both resized bilinearly to the labels (B, H, W), 255 ignored, averaged as `loss_average` says."""
        out = self(images)
        size = labels.shape[-2:]
        up = F.interpolate(out["logits"], size=size, mode="bilinear", align_corners=False)
        losses = {"decode_loss": self._cross_entropy(up, labels)}
        if self.language_guidance:
            scores = F.interpolate(out["score_map"] / self.tau, size=size, mode="bilinear", align_corners=False)
            losses["aux_loss"] = self.aux_weight * self._cross_entropy(scores, labels)
        losses["loss"] = sum(losses.values())
        return losses

    def _cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) logits, (B, H, W) labels -> the mean cross-entropy over the valid pixels or all of them."""
        if self.loss_average == "valid":
            return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / labels.numel()

    # ------------------------------------------------------------------------------- inference
    def embed_text(self, queries: list[str], templates=None, cache=None) -> PromptedText:
        """Queries -> their tokens and training-class indices (templates and cache do not apply: prompts are learned).

        A query names a training class exactly or up to case and spaces (see `_name_lookup`)."""
        index = torch.tensor([self._head_index.get(q, self._head_index.get(_name_key(q), -1)) for q in queries])
        if self.inference == "head":
            if (index < 0).all():
                raise InputError(f"none of {queries[:5]} is a class this DenseCLIP was trained on "
                                 f"({', '.join(self.class_names[:10])}...); use inference='score_map' for new names")
            if (index < 0).any():
                unknown = [q for q, i in zip(queries, index) if i < 0]
                logger.warning(f"DenseCLIP's head never predicts classes outside its training set: {unknown[:5]}")
            tokens = self.class_tokens if self.language_guidance else torch.zeros(0, dtype=torch.long)
        else:
            tokens = self.prompt.tokenize(queries)
        return PromptedText(tokens, index)

    @torch.no_grad()
    def embed_crops(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.encode_image(crops)

    @torch.no_grad()
    def crop_logits(self, embedded: dict[str, torch.Tensor], text: PromptedText, protocol: Protocol | None = None
                    ) -> torch.Tensor:
        """Class logits (B, Q, h, w): the head's logits gathered by name, or score_map / tau of the queries."""
        if self.inference == "score_map":
            return self.score_map(embedded, self.text_embeddings(text.tokens, embedded)) / self.tau
        levels = self.pyramid([embedded[f"level{i}"] for i in range(len(self.levels))])
        if self.language_guidance:
            scores = self.score_map(embedded, self.text_embeddings(self.class_tokens, embedded))
            levels[self.score_level] = torch.cat([levels[self.score_level], scores], dim=1)
        logits = self.decoder(levels)
        picked = logits[:, text.head_index.clamp_min(0)]
        # a finite floor, not -inf: PAMR and window merging average logits, and 0 x -inf would be NaN everywhere
        return picked.masked_fill((text.head_index < 0)[None, :, None, None], UNKNOWN_CLASS_LOGIT)
