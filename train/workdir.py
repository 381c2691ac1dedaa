"""The run directory: what a run leaves in its workdir and how every tool finds it again.

    WORKDIR/config.json      the run's config (written by the train loop, every stage, convert)
    WORKDIR/checkpoints/N/   orbax checkpoints (train/checkpoint.py)
    WORKDIR/tokenizer/*.model  the tokenizer the run trained, when it trained one

A checkpoint path given to a tool (generate, eval, convert, `train.init_from`) may be the
workdir, its `checkpoints/` folder or one `checkpoints/<step>`. The loop, generate, eval,
convert and the post-training stages all read runs through this module.
"""

import dataclasses
import glob
import json
import os

import ml_collections
from orbax.checkpoint import utils as ocp_utils

from data import pipeline
from data.tokenizer import Tokenizer
from model.config import ConfigError, ModelConfig
from train import checkpoint as ckpt_lib
from train import config as config_lib
from train import context as context_lib
from train import state as state_lib


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  cfg: ModelConfig
  params: object
  tokenizer: object
  mesh: object
  rules: dict
  workdir: str
  step: int


def resolve_checkpoint(path: str) -> tuple[str, int | None, str]:
  """(checkpoints folder, step or None: the latest, workdir) of a checkpoint path (module doc)."""
  path = os.path.abspath(path)
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(path):
    root = os.path.dirname(path)
    return root, int(base), os.path.dirname(root)
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return os.path.join(path, 'checkpoints'), None, path
  if os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path)):
    return path, None, os.path.dirname(path)
  raise FileNotFoundError(f'--checkpoint {path}: not a workdir with checkpoints/, a checkpoints '
                          f'folder, or a checkpoints/<step> folder')


def run_workdir(path: str) -> str:
  """The workdir of any checkpoint path (see resolve_checkpoint)."""
  return resolve_checkpoint(path)[2]


def load_config(config, workdir: str, fallback=None) -> ml_collections.ConfigDict:
  """`config` (a ConfigDict or an experiment file), else workdir/config.json, else `fallback`."""
  if isinstance(config, ml_collections.ConfigDict):
    return config
  if config:
    return config_lib.load_experiment(config)
  path = os.path.join(workdir, 'config.json')
  if fallback and not os.path.isfile(path):
    return load_config(fallback, workdir)
  if not os.path.isfile(path):
    raise ConfigError(f'{workdir} has no config.json: pass --config with the experiment file '
                      f'the run was trained with')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def write_config(config, workdir: str) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  with open(path + '.tmp', 'w') as f:
    f.write(config.to_json(indent=1))
  os.replace(path + '.tmp', path)
  return path


def cached_tokenizer(workdir: str) -> str | None:
  """The one tokenizer model a run trained and cached in workdir/tokenizer/, else None."""
  cached = glob.glob(os.path.join(workdir, 'tokenizer', '*.model'))
  return cached[0] if len(cached) == 1 else None


def tokenizer_path(config, workdir: str) -> str | None:
  """config.data.tokenizer, else the one model cached in workdir/tokenizer/, else None."""
  return config.data.tokenizer or cached_tokenizer(workdir)


def load_tokenizer(config, workdir: str):
  """The run's tokenizer (`tokenizer_path`), else the pipeline's train-or-load (of its cache)."""
  if path := tokenizer_path(config, workdir):
    return Tokenizer(path)
  return pipeline.load_tokenizer(config.data, vocab_size=config.model.vocab_size, workdir=workdir)


def inherited_tokenizer(config) -> str:
  """A stage's tokenizer: data.tokenizer, else the `train.init_from` run's (its config or cache)."""
  if config.data.tokenizer:
    return config.data.tokenizer
  workdir = run_workdir(config.train.init_from)
  has_config = os.path.isfile(os.path.join(workdir, 'config.json'))
  path = (has_config and load_config(None, workdir).data.tokenizer) or cached_tokenizer(workdir)
  if not path:
    raise FileNotFoundError(
        f'train.init_from={config.train.init_from}: cannot tell its tokenizer (no config.json '
        f'naming one, and not one *.model in {workdir}/tokenizer); set '
        f'--config.data.tokenizer=PATH.model')
  return path


def latest_step(root: str) -> int | None:
  """The newest finalized step in checkpoints folder `root`, or None."""
  return max(ocp_utils.checkpoint_steps(root), default=None)


def restore_params(checkpoint: str, cfg: ModelConfig, placement, model_cls=None):
  """The params of a checkpoint path as `model_cls` (default Decoder) of `cfg`, by a Placement."""
  mdef, abstract = state_lib.model_def(cfg, *(() if model_cls is None else (model_cls,)))
  root, step, _ = resolve_checkpoint(checkpoint)
  return ckpt_lib.restore_params(root, abstract, placement.param_shardings(mdef, abstract), step)


def load_run(checkpoint: str, config=None, *, fallback=None, mesh=None, model_cls=None) -> Run:
  """Config, model config, params (sharded on `mesh`, default config.mesh), tokenizer of a run;
  the config is `config`, else workdir/config.json, else `fallback` (load_config's kinds)."""
  root, step, workdir = resolve_checkpoint(checkpoint)
  config = load_config(config, workdir, fallback)
  cfg = config_lib.model_config(config)
  placement = context_lib.Placement.of(config, mesh)
  params = restore_params(checkpoint, cfg, placement, model_cls)
  step = latest_step(root) if step is None else step
  return Run(config, cfg, params, load_tokenizer(config, workdir), placement.mesh,
             placement.rules, workdir, int(step))
