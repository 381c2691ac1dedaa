"""What the post-training stages share: the config of a stage continuing an earlier run, and
loading models from earlier stages onto the run's placement (train/context.py).

Every stage uses the tokenizer of the model it starts from: `data.tokenizer` if set, else the
one of the `train.init_from` run (train/workdir.py `inherited_tokenizer`). The stage's
config.json (written by the loop) has that tokenizer path filled in, so
`python -m train.generate --checkpoint <its workdir>` and the next stage find everything.
"""

import ml_collections

from model.heads import trunk_config
from train import workdir as workdir_lib


def stage_config(config) -> ml_collections.ConfigDict:
  """A copy of `config` with data.tokenizer filled in from the init_from run."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.tokenizer = workdir_lib.inherited_tokenizer(config)
  return config


def trunk_and_head(checkpoint: str, cfg, placement, fresh):
  """ScalarModel params: the `decoder` trunk from an LM checkpoint (without its output table),
  the head of `fresh` (freshly initialised ScalarModel params)."""
  trunk = workdir_lib.restore_params(checkpoint, trunk_config(cfg), placement)
  return {'decoder': trunk, 'head': fresh['head']}
