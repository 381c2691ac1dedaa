"""Hugging Face checkpoints <-> meshlm checkpoints (Llama-family dense, Mistral, Mixtral).

    python -m train.convert from-hf HF_DIR OUT_DIR  # then train.init_from=OUT_DIR/checkpoints
    python -m train.convert to-hf CKPT_DIR OUT_DIR [--config X.py] [--dtype bfloat16]
        [--max_shard_size 5GB]
    from train.convert import load_checkpoint           # token ids -> float32 logits, for notebooks

hf_layout.py: config.json and tensor-name mapping; safetensors_io.py: lazy reads, streaming
writes; store.py: orbax writes from memmaps, tensorstore slice reads; importer.py, exporter.py,
load.py: the three entry points. docs/convert.md describes layouts and memory.
"""

from train.convert.exporter import to_hf
from train.convert.hf_layout import ConvertError
from train.convert.importer import from_hf
from train.convert.load import LoadedModel, load_checkpoint

__all__ = ['ConvertError', 'LoadedModel', 'from_hf', 'load_checkpoint', 'to_hf']
