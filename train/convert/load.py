"""`load_checkpoint(DIR)`: a meshlm checkpoint (trained, or imported from Hugging Face) as a
function from int32 token ids [batch, length] to float32 logits [batch, length, vocab].

    model = load_checkpoint('/tmp/mistral')   # a workdir, checkpoints/ or checkpoints/<step>
    logits_btv = model(np.array([[1, 415, 2936]], np.int32))
    model.cfg, model.params, model.tokenizer  # tokenizer: None when the run has none

Params are restored as for `--config.train.init_from` and sharded over `mesh` (default: all
devices on the fsdp axis). Every row is one sequence starting at position 0 (no padding).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from data.tokenizer import Tokenizer
from model.config import ModelConfig
from model.sharding import use_rules
from train import checkpoint as ckpt_lib
from train import state as state_lib
from train import workdir as workdir_lib
from train.context import Placement
from train.convert.exporter import locate
from train.mesh import make_mesh


@dataclasses.dataclass
class LoadedModel:
  config: object  # The run's ml_collections config.
  cfg: ModelConfig
  params: dict
  mesh: object
  rules: dict
  tokenizer: object  # data.tokenizer.Tokenizer, or None.
  step: int
  _forward: object = None

  def __call__(self, tokens_bt) -> jax.Array:
    tokens_bt = np.asarray(tokens_bt)
    if tokens_bt.ndim != 2 or not np.issubdtype(tokens_bt.dtype, np.integer):
      raise ValueError(f'load_checkpoint model: expected integer token ids [batch, length], got '
                       f'{tokens_bt.dtype}{list(tokens_bt.shape)}')
    if tokens_bt.size and (tokens_bt.min() < 0 or tokens_bt.max() >= self.cfg.vocab_size):
      raise ValueError(f'load_checkpoint model: token ids must be in [0, {self.cfg.vocab_size}) '
                       f'(model.vocab_size), got [{tokens_bt.min()}, {tokens_bt.max()}]')
    with jax.set_mesh(self.mesh), use_rules(self.rules):
      return self._forward(self.params, jnp.asarray(tokens_bt, jnp.int32))


def load_checkpoint(directory: str, config=None, *, mesh=None) -> LoadedModel:
  """`config`: a ConfigDict, an experiment file, or None (the workdir's config.json)."""
  config, cfg, root, step, workdir = locate(directory, config)
  placement = Placement.of(config, make_mesh({'fsdp': -1}) if mesh is None else mesh)
  mdef, abstract = state_lib.model_def(cfg)
  params = ckpt_lib.restore_params(root, abstract, placement.param_shardings(mdef, abstract), step)

  @jax.jit
  def forward(params, tokens_bt):
    logits_btv, _ = mdef.build(params)(tokens_bt)
    return logits_btv.astype(jnp.float32)

  tok = workdir_lib.tokenizer_path(config, workdir)
  tokenizer = Tokenizer(tok) if tok and os.path.isfile(tok) else None
  return LoadedModel(config, cfg, params, placement.mesh, placement.rules, tokenizer, step, forward)
