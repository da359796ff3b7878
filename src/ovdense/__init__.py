"""ovdense: open-vocabulary dense prediction with CLIP-family vision-language models."""
__version__ = "0.1.0"
