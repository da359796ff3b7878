"""Token-level text features with each token's character span, for grounding (GLIP): a phrase's characters in a
caption name the tokens whose features a box must align with.

Two encoders share one interface (`tokenize`, `forward`, `width`, `heads`, `max_tokens`):
  CLIPTokenText  the open_clip text tower of the CLIP in use: its token features after ln_final (B, L, width)
  BertTokenText  a Hugging Face BERT (GLIP's `bert-base-uncased`, 256 tokens); needs `pip install transformers`
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError

Span = tuple[int, int]


def lowered_with_origin(text: str) -> tuple[str, list[int]]:
    """text.lower() and, for each of its characters, the index of the character of `text` it comes from (lower()
    can change the length: 'İ' becomes two characters)."""
    pieces = [(char.lower(), i) for i, char in enumerate(text)]
    return "".join(low for low, _ in pieces), [i for low, i in pieces for _ in low]


@dataclass
class TokenizedText:
    """ids (B, L) int64, mask (B, L) bool (real tokens, special ones included), offsets: per caption and token its
    character span [start, end) in the caption ((0, 0) for special and padding tokens)."""

    ids: torch.Tensor
    mask: torch.Tensor
    offsets: list[list[Span]]

    def to(self, device) -> "TokenizedText":
        return TokenizedText(self.ids.to(device), self.mask.to(device), self.offsets)


def too_long(text: str, tokens: int, limit: int, what: str) -> InputError:
    shown = text if len(text) <= 60 else text[:57] + "..."
    return InputError(f"the text {shown!r} is {tokens} tokens long; {what} takes at most {limit}: shorten it "
                      "(or split it into several captions)")


def _pad(rows: list[list[int]], offsets: list[list[Span]], pad_id: int) -> TokenizedText:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = True
    return TokenizedText(ids, mask, [o + [(0, 0)] * (length - len(o)) for o in offsets])


class CLIPTokenText(nn.Module):
    """The open_clip text tower's per-token features (causal attention, ln_final applied): (B, L, width).

    clip: an `ovdense.backbones.CLIPBackbone` with a text tower. Tokens carry their word's character span (open_clip's
    byte-level BPE splits words found by its regular expression on the lower-cased text, so every piece of a word
    gets the word's span).
    """

    def __init__(self, clip):
        super().__init__()
        if clip.model is None or not hasattr(clip.model, "token_embedding"):
            raise InputError(f"{clip.name} has no open_clip text transformer to give token features")
        self.clip = clip
        self.tokenizer = clip.tokenizer

    @property
    def width(self) -> int:
        return self.clip.model.token_embedding.weight.shape[1]

    @property
    def heads(self) -> int:
        """The attention heads of the text transformer's layers."""
        return self.clip.model.transformer.resblocks[0].attn.num_heads

    def trainable(self, flag: bool) -> None:
        """Train (or freeze) the text tower only; the image tower shares `clip` and keeps its own setting."""
        m = self.clip.model
        for part in (m.token_embedding, m.transformer, m.ln_final):
            part.requires_grad_(flag)
        m.positional_embedding.requires_grad_(flag)

    @property
    def max_tokens(self) -> int:
        return int(self.clip.model.positional_embedding.shape[0])

    def token_spans(self, text: str) -> tuple[list[int], list[Span]]:
        """A caption's BPE token ids (no start / end tokens) and their character spans."""
        tok = self.tokenizer
        lowered, origin = lowered_with_origin(text)
        ids, spans = [], []
        for match in tok.pat.finditer(lowered):
            word = "".join(tok.byte_encoder[b] for b in match.group().encode("utf-8"))
            for piece in tok.bpe(word).split(" "):
                ids.append(tok.encoder[piece])
                spans.append((origin[match.start()], origin[match.end() - 1] + 1))
        return ids, spans

    def count_tokens(self, text: str) -> int:
        return len(self.token_spans(text)[0])

    def tokenize(self, texts: list[str], truncate: bool = False) -> TokenizedText:
        """Captions -> TokenizedText with <start> and <end> tokens; a caption over `max_tokens` is an InputError unless
        `truncate`."""
        tok, rows, offsets = self.tokenizer, [], []
        for text in texts:
            ids, spans = self.token_spans(text)
            if len(ids) + 2 > self.max_tokens:
                if not truncate:
                    raise too_long(text, len(ids) + 2, self.max_tokens, f"the text encoder of {self.clip.name}")
                ids, spans = ids[:self.max_tokens - 2], spans[:self.max_tokens - 2]
            rows.append([tok.sot_token_id, *ids, tok.eot_token_id])
            offsets.append([(0, 0), *spans, (0, 0)])
        return _pad(rows, offsets, 0)

    def forward(self, text: TokenizedText) -> torch.Tensor:
        """-> (B, L, width) token features."""
        m = self.clip.model
        ids = text.ids.to(self.clip.device)
        length = ids.shape[1]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(ids).to(cast) + m.positional_embedding[:length].to(cast)
        return m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:length, :length])).float()


def _bert_missing(source: str, pretrained: bool, error: Exception) -> str:
    """What to do when BERT's files are not at `source` (a Hugging Face name or a folder)."""
    folder = Path(source).is_dir() or Path(source).is_absolute() or source.startswith((".", "~"))
    repo = "bert-base-uncased" if folder else source
    files = "" if pretrained else " config.json vocab.txt tokenizer.json tokenizer_config.json"
    return (f"cannot load BERT's tokenizer and config{' and weights' if pretrained else ''} from {source!r} "
            f"({str(error).splitlines()[0].strip()}); get them with `huggingface-cli download {repo}{files} "
            f"--local-dir {source if folder else repo}` (on any connected machine) and pass that folder")


class BertTokenText(nn.Module):
    """GLIP's language backbone (`bert_model.BertEncoder`): a Hugging Face BERT's last hidden states (B, L, 768 for
    `bert-base-uncased`), special tokens included, with the attention mask of the real tokens. GLIP averages the last
    N_LAYERS = 1 hidden states, which is the last one, and pads every caption to 256 tokens, which changes nothing for
    the real tokens (padding is masked); here captions are padded to the longest of the batch only.

    source: a model name (Hugging Face cache; offline it must already be there) or a local folder holding the
    tokenizer and config (and the weights when `pretrained`).
    """

    def __init__(self, source: str = "bert-base-uncased", max_tokens: int = 256, pretrained: bool = True):
        super().__init__()
        try:
            from transformers import AutoConfig, AutoModel, AutoTokenizer
        except ImportError as error:
            raise InputError("the BERT text encoder needs Hugging Face transformers: pip install 'ovdense[glip]'"
                             ) from error
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True)
            self.model = (AutoModel.from_pretrained(source, add_pooling_layer=False) if pretrained else
                          AutoModel.from_config(AutoConfig.from_pretrained(source), add_pooling_layer=False))
        except (OSError, ValueError) as error:
            raise InputError(_bert_missing(source, pretrained, error)) from error
        self._max_tokens = max_tokens

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @property
    def heads(self) -> int:
        """BERT's attention heads (GLIP's text layers in the head take BERT's config)."""
        return self.model.config.num_attention_heads

    def trainable(self, flag: bool) -> None:
        self.model.requires_grad_(flag)

    @property
    def max_tokens(self) -> int:
        return self._max_tokens

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.tokenize(text))

    def tokenize(self, texts: list[str], truncate: bool = False) -> TokenizedText:
        rows, offsets = [], []
        for text in texts:
            encoded = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
            ids, spans = encoded["input_ids"], [tuple(s) for s in encoded["offset_mapping"]]
            if len(ids) > self.max_tokens:
                if not truncate:
                    raise too_long(text, len(ids), self.max_tokens, "BERT")
                ids, spans = ids[:self.max_tokens - 1] + ids[-1:], spans[:self.max_tokens - 1] + [(0, 0)]
            rows.append(ids)
            offsets.append(spans)
        return _pad(rows, offsets, self.tokenizer.pad_token_id)

    def forward(self, text: TokenizedText) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = self.model(input_ids=text.ids.to(device), attention_mask=text.mask.to(device).long())
        return out.last_hidden_state.float()

