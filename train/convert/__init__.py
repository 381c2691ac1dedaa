"""Hugging Face checkpoints <-> meshlm checkpoints (Llama-family dense, Mistral, Mixtral).

    python -m train.convert from-hf HF_DIR OUT_DIR  # then train.init_from=OUT_DIR/checkpoints
    python -m train.convert to-hf CKPT_DIR OUT_DIR [--config X.py] [--dtype bfloat16]
    from train.convert import load_checkpoint           # token ids -> float32 logits

docs/convert.md describes the layouts, what is refused, and the memory used.
"""

from train.convert.exporter import to_hf
from train.convert.hf_layout import ConvertError
from train.convert.importer import from_hf
from train.convert.load import LoadedModel, load_checkpoint

__all__ = ['ConvertError', 'LoadedModel', 'from_hf', 'load_checkpoint', 'to_hf']
