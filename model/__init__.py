"""Flax NNX decoders (dense and mixture-of-experts). Knows nothing about training."""
from model.config import ConfigError, ModelConfig
from model.flops import ParamCount, count_params, training_flops_per_token
from model.transformer import Decoder
