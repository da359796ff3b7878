"""The open-vocabulary models users would pick instead of ovdense, as Hugging Face transformers builds them, for
`bench_speed.py` to time:

  GroundingDINO-T  Swin-T + BERT-base, 6 + 6 deformable encoder/decoder layers, 900 queries, 4 feature levels
                   (`IDEA-Research/grounding-dino-tiny`), the whole prompt "cls1 . cls2 . ... ." in one pass
  OWLv2 B/16       ViT-B/16 at 960x960 and the CLIP text encoder, one 16-token query per class
                   (`google/owlv2-base-patch16-ensemble`)
  CLIPSeg          ViT-B/16 at 352x352 (position embeddings interpolated from 224), the CLIP text encoder and the
                   rd64 decoder (`CIDAS/clipseg-rd64-refined`), one pass per prompt: the image repeated per class

Each is built offline from its config with random weights (time does not depend on them); token ids stand in for
the tokenizers (same lengths, and BERT's special ids, which GroundingDINO reads to mask attention per phrase).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

BERT_CLS, BERT_SEP, BERT_DOT = 101, 102, 1012  # bert-base-uncased
CLIP_BOS, CLIP_EOS = 49406, 49407


class Peer(NamedTuple):
    """A peer model ready to time: `run()` is one whole inference."""
    name: str
    input: str  # what it runs on, e.g. "1088x800, 20 classes, 46 tokens"
    run: Callable[[], Any]  # one whole inference on prepared tensors
    model: torch.nn.Module


def _hf(*names: str) -> list:
    """The named transformers classes, with transformers' warnings silenced; ImportError if any is missing."""
    try:
        import transformers
        classes = [getattr(transformers, name) for name in names]
    except (ImportError, AttributeError) as error:
        raise ImportError(f"the Hugging Face peers need transformers with {', '.join(names)} ({error})") from error
    transformers.logging.set_verbosity_error()
    return classes


def _peer(name: str, described: str, model: torch.nn.Module, inputs: dict, device: str) -> Peer:
    """`model` in eval mode on `device`, and a call of it on `inputs` under no_grad."""
    model = model.eval().to(device)
    inputs = {key: value.to(device) for key, value in inputs.items()}

    def run():
        with torch.no_grad():
            return model(**inputs)

    return Peer(name, described, run, model)


def _word_ids(classes: list[str], first: int) -> list[list[int]]:
    """One made-up token id per word of each class name, the same id for the same word."""
    vocabulary = {word: first + i for i, word in enumerate(sorted({w for c in classes for w in c.lower().split()}))}
    return [[vocabulary[w] for w in c.lower().split()] for c in classes]


def _clip_queries(classes: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of shape (len(classes), length): <bos> words <eos>, padded."""
    ids = torch.zeros(len(classes), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, words in enumerate(_word_ids(classes, 1000)):
        tokens = [CLIP_BOS, *words, CLIP_EOS]
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    return ids, mask


def grounding_dino_tiny(height: int, width: int, classes: list[str], device: str = "cpu") -> Peer:
    """GroundingDINO-T on a (height, width) image and the prompt "cls1 . cls2 . ... .", as bert-base-uncased
    tokenizes it (one id per word)."""
    config_class, model_class = _hf("GroundingDinoConfig", "GroundingDinoForObjectDetection")
    torch.manual_seed(0)
    config = config_class()  # the defaults are grounding-dino-tiny's: Swin-T (96, [2, 2, 6, 2]) and BERT-base
    ids = [BERT_CLS, *(i for words in _word_ids(classes, 2000) for i in (*words, BERT_DOT)), BERT_SEP]
    input_ids = torch.tensor([ids])
    inputs = {"pixel_values": torch.randn(1, 3, height, width),
              "pixel_mask": torch.ones(1, height, width, dtype=torch.long),
              "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "token_type_ids": torch.zeros_like(input_ids)}
    return _peer("GroundingDINO-T", f"{width}x{height}, {len(classes)} classes, {len(ids)} tokens",
                 model_class(config), inputs, device)


def owlv2_base16(classes: list[str], device: str = "cpu") -> Peer:
    """OWLv2 B/16 on a 960x960 image and one query per class, padded to 16 tokens as its processor does."""
    config_class, model_class = _hf("Owlv2Config", "Owlv2ForObjectDetection")
    torch.manual_seed(0)
    config = config_class(vision_config={"image_size": 960, "patch_size": 16})
    input_ids, attention_mask = _clip_queries(classes, config.text_config.max_position_embeddings)
    inputs = {"pixel_values": torch.randn(1, 3, 960, 960), "input_ids": input_ids, "attention_mask": attention_mask}
    return _peer("OWLv2 B/16", f"960x960, {len(classes)} queries of {input_ids.shape[1]} tokens",
                 model_class(config), inputs, device)


def clipseg(classes: list[str], device: str = "cpu") -> Peer:
    """CLIPSeg rd64-refined on a 352x352 image: a batch of one (image, prompt) pair per class, prompts padded to
    77 tokens as its model card does (padding="max_length")."""
    config_class, model_class = _hf("CLIPSegConfig", "CLIPSegForImageSegmentation")
    torch.manual_seed(0)
    config = config_class(vision_config={"patch_size": 16}, use_complex_transposed_convolution=True)
    input_ids, attention_mask = _clip_queries(classes, config.text_config.max_position_embeddings)
    image = torch.randn(1, 3, 352, 352)
    inputs = {"pixel_values": image.expand(len(classes), -1, -1, -1).contiguous(), "input_ids": input_ids,
              "attention_mask": attention_mask}
    return _peer("CLIPSeg", f"352x352, {len(classes)} prompts of {input_ids.shape[1]} tokens, one pass each",
                 model_class(config), inputs, device)
