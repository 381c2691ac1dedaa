"""Flax NNX decoders (dense and mixture-of-experts). Knows nothing about training."""
from model.config import ConfigError, ModelConfig
