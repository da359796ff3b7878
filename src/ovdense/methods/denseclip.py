"""DenseCLIP (Rao et al., CVPR 2022): language-guided fine-tuning of a CLIP image encoder for segmentation.

The image encoder (ResNet or ViT, from CLIP) is fine-tuned; the text encoder stays frozen and reads
the class names after learnable context tokens (CoOp). Vision-to-language prompting: after the text
encoder ('post', the paper's choice) a small transformer decoder lets the class embeddings attend to
the image's visual context, t <- t + gamma * decoder(t, [global, dense]) with gamma initialised at 1e-4;
before it ('pre'), the context tokens themselves are decoded from the visual context per image. The
pixel-text score map (K channels) is concatenated to a backbone level, a Semantic FPN decodes, and an
auxiliary cross-entropy on score_map / tau (0.07) supervises the score map directly.
With `language_guidance=False` the same network without text is the paper's baseline (CLIP init + FPN).

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
logger = logging.getLogger(__name__)


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
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q, k, v = (proj(t).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for proj, t in ((self.q, x), (self.k, memory), (self.v, memory)))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class _DecoderLayer(nn.Module):
    """Pre-norm transformer decoder layer: self-attention, cross-attention to memory, MLP."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.self_attn, self.cross_attn = _Attention(dim, heads, dropout), _Attention(dim, heads, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.self_attn(y, y)
        x = x + self.cross_attn(self.norm2(x), memory)
        return x + self.mlp(self.norm3(x))


class ContextDecoder(nn.Module):
    """Queries (B, K, query_dim) attend to visual context (B, N, visual_dim) -> (B, K, out_dim)."""

    def __init__(self, query_dim: int, visual_dim: int, out_dim: int, width: int = 256, heads: int = 4,
                 layers: int = 3, dropout: float = 0.1):
        super().__init__()
        self.memory_proj = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, width), nn.LayerNorm(width))
        self.query_proj = nn.Sequential(nn.LayerNorm(query_dim), nn.Linear(query_dim, width))
        self.layers = nn.ModuleList(_DecoderLayer(width, heads, dropout) for _ in range(layers))
        self.out_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out_dim))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, queries: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        memory = self.memory_proj(visual)
        x = self.query_proj(queries)
        for layer in self.layers:
            x = layer(x, memory)
        return self.out_proj(x)


# ----------------------------------------------------------------------------------- Semantic FPN
def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class SemanticFPN(nn.Module):
    """FPN neck (torchvision) + Semantic FPN head (Kirillov et al.): levels (B, C_i, h_i, w_i) with strides
    doubling from the finest -> logits (B, classes, h_0, w_0). Level i reaches the finest size through
    max(1, i) conv-BN-ReLU blocks, each followed by a 2x upsampling when i > 0; the levels are summed."""

    def __init__(self, in_channels: list[int], classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.neck = FeaturePyramidNetwork(in_channels, channels)
        self.scales = nn.ModuleList()
        for i in range(len(in_channels)):
            blocks = []
            for _ in range(max(1, i)):
                blocks.append(_conv_bn_relu(channels, channels))
                if i > 0:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scales.append(nn.Sequential(*blocks))
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, classes, 1))

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        pyramid = self.neck(OrderedDict((str(i), x) for i, x in enumerate(levels))).values()
        size = levels[0].shape[-2:]
        out = sum(F.interpolate(scale(x), size=size, mode="bilinear", align_corners=False)
                  for scale, x in zip(self.scales, pyramid))
        return self.classifier(out)


class ViTPyramid(nn.Module):
    """Turns four same-stride ViT maps into strides /4, /2, x1, x2 of the patch grid (4x up, 2x up, same, 2x down)."""

    def __init__(self, width: int):
        super().__init__()
        self.ops = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(width, width, 2, 2), nn.BatchNorm2d(width), nn.GELU(),
                          nn.ConvTranspose2d(width, width, 2, 2)),
            nn.ConvTranspose2d(width, width, 2, 2), nn.Identity(), nn.MaxPool2d(2)])

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
    """DenseCLIP (or, with language_guidance=False, its CLIP + Semantic FPN baseline) over a CLIP backbone.

    class_names: the K training classes. prompting: 'post' or 'pre' (vision-to-language prompting).
    levels: backbone levels fed to the FPN (ResNet stages 0..3; ViT blocks, 4 of them).
    score_level: the level the score map is concatenated to (3 for ResNet, 2 for ViT in the paper).
    """

    name = "denseclip"
    scores = "logits"
    min_crop_patches = 2  # the ViT pyramid's 2x2 max-pool needs two patches a side

    def __init__(self, backbone: CLIPBackbone, class_names: list[str], language_guidance: bool = True,
                 prompting: str = "post", context_tokens: int = 8, name_length: int = 5, decoder_width: int = 256,
                 decoder_heads: int = 4, decoder_layers: int = 3, fpn_channels: int = 256, tau: float = 0.07,
                 aux_weight: float = 0.4, gamma_init: float = 1e-4, levels: list[int] | None = None,
                 score_level: int | None = None, inference: str = "head"):
        super().__init__(backbone)
        if prompting not in ("post", "pre") or inference not in ("head", "score_map"):
            raise ValueError("prompting is 'post' or 'pre'; inference is 'head' or 'score_map'")
        if not class_names or len(set(class_names)) != len(class_names):
            raise ValueError("DenseCLIP needs a non-empty list of distinct training class names")
        if inference == "score_map" and not language_guidance:
            raise ValueError("the baseline has no score map; use inference='head'")
        vit = backbone.arch == "vit"
        if levels is None:
            depth = len(backbone.visual.transformer.resblocks) if vit else 4
            levels = [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1] if vit else [0, 1, 2, 3]
        score_level = (2 if vit else 3) if score_level is None else score_level
        self.config = {"class_names": list(class_names), "language_guidance": language_guidance,
                       "prompting": prompting, "context_tokens": context_tokens, "name_length": name_length,
                       "decoder_width": decoder_width, "decoder_heads": decoder_heads,
                       "decoder_layers": decoder_layers, "fpn_channels": fpn_channels, "tau": tau,
                       "aux_weight": aux_weight, "gamma_init": gamma_init, "levels": levels,
                       "score_level": score_level, "inference": inference}
        self.class_names, self.language_guidance, self.prompting = list(class_names), language_guidance, prompting
        self.levels, self.score_level, self.tau, self.aux_weight = levels, score_level, tau, aux_weight
        self.inference = inference
        backbone.requires_grad_(False)
        backbone.visual.requires_grad_(True)  # the image encoder is fine-tuned, the text encoder frozen

        with torch.no_grad():  # the sizes of the levels, from a probe image (eval mode: BN statistics untouched)
            was_training = backbone.training
            maps, _, dense = backbone.eval().image_pyramid(torch.zeros(1, 3, 64, 64, device=backbone.device), levels)
            backbone.train(was_training)
        channels = [m.shape[1] for m in maps]
        self.pyramid = ViTPyramid(channels[0]) if vit else nn.Identity()
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
        maps, global_embedding, dense = self.backbone.image_pyramid(images, self.levels)
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
        """Cross-entropy of the FPN logits and (weighted `aux_weight`) of score_map / tau; labels (B, H, W), 255 ignored."""
        out = self(images)
        size = labels.shape[-2:]
        up = F.interpolate(out["logits"], size=size, mode="bilinear", align_corners=False)
        losses = {"decode_loss": F.cross_entropy(up, labels, ignore_index=IGNORE_INDEX)}
        if self.language_guidance:
            scores = F.interpolate(out["score_map"] / self.tau, size=size, mode="bilinear", align_corners=False)
            losses["aux_loss"] = self.aux_weight * F.cross_entropy(scores, labels, ignore_index=IGNORE_INDEX)
        losses["loss"] = sum(losses.values())
        return losses

    # ------------------------------------------------------------------------------- inference
    def embed_text(self, queries: list[str], templates=None, cache=None) -> PromptedText:
        """Queries -> their tokens and training-class indices (templates and cache do not apply: prompts are learned)."""
        index = torch.tensor([self.class_names.index(q) if q in self.class_names else -1 for q in queries])
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
