"""Hugging Face folder -> meshlm run folder (`python -m train.convert from-hf HF_DIR OUT_DIR`).

OUT_DIR gets config.json (train/config.py defaults, `model` from the HF config.json, data.seq_len =
max_position_embeddings, data.tokenizer = the copied one), checkpoints/0/ (for train.init_from) and
tokenizer/tokenizer.model if HF_DIR has one; about one tensor in memory at a time (docs/convert.md).
"""

import json
import logging
import os
import shutil

import jax
import numpy as np

from data.tokenizer import Tokenizer
from model.config import ModelConfig
from train import workdir as workdir_lib
from train.config import defaults
from train.state import model_def
from train.convert import hf_layout, safetensors_io, store
from train.convert.hf_layout import ConvertError

log = logging.getLogger('meshlm.convert')


def from_hf(hf_dir: str, out_dir: str, *, param_dtype: str | None = None,
            compute_dtype: str | None = None, allow_sliding_window: bool = False,
            chunk_bytes: int = store.CHUNK_BYTES) -> str:
  """Converts; returns the checkpoints folder (the value for --config.train.init_from)."""
  hf_dir, out_dir = os.path.abspath(hf_dir), os.path.abspath(out_dir)
  source = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(source):
    raise ConvertError(f'{hf_dir}: no config.json (expected a Hugging Face model folder)')
  with open(source) as f:
    hf = json.load(f)
  kwargs, seq_len = hf_layout.model_kwargs(hf, source, allow_sliding_window=allow_sliding_window)
  tensors = safetensors_io.open_folder(hf_dir)
  param_dtype = param_dtype or hf_layout.hf_dtype(hf)
  if not param_dtype:  # The tensors' one float dtype.
    floats = sorted({str(d) for d in (f.dtype(name) for name, f in tensors.items())
                     if d.kind == 'f' or str(d) == 'bfloat16'})
    if len(floats) != 1:
      raise ConvertError(f'config.json declares no dtype and the tensors have {floats}: pass '
                         '--param_dtype')
    param_dtype = floats[0]
  kwargs.update(param_dtype=param_dtype, compute_dtype=compute_dtype or param_dtype)
  cfg = ModelConfig(**kwargs)
  cfg.validate()
  plan = _plan(cfg, tensors, hf_dir)
  spm = os.path.join(hf_dir, 'tokenizer.model')
  if os.path.isfile(spm) and (pieces := Tokenizer(spm).vocab_size) > cfg.vocab_size:
    raise ConvertError(f'{spm} has {pieces} pieces, more than vocab_size={cfg.vocab_size} in '
                       f'{source}: not this model\'s tokenizer?')

  root = os.path.join(out_dir, 'checkpoints')
  if os.path.exists(root):
    raise FileExistsError(f'{root} exists; convert into a new folder')
  scratch = os.path.join(out_dir, '.scratch')
  os.makedirs(scratch, exist_ok=True)
  try:
    params, stacked = _allocate(cfg, scratch)
    _fill(plan, tensors, params, np.dtype(cfg.weight_dtype))
    log.info('writing the checkpoint to %s', root)
    store.save_params(root, params, stacked, chunk_bytes=chunk_bytes)
    del params
  finally:
    shutil.rmtree(scratch, ignore_errors=True)

  config = defaults()
  config.model.update(kwargs)
  config.data.seq_len = int(seq_len)
  if os.path.isfile(spm):
    config.data.tokenizer = os.path.join(out_dir, 'tokenizer', 'tokenizer.model')
    os.makedirs(os.path.dirname(config.data.tokenizer), exist_ok=True)
    shutil.copyfile(spm, config.data.tokenizer)
  else:
    log.warning('%s has no tokenizer.model (SentencePiece): train.generate / train.eval / runs '
                'need --config.data.tokenizer=PATH.model', hf_dir)
  workdir_lib.write_config(config, out_dir)
  return root


def _plan(cfg: ModelConfig, tensors: dict, hf_dir: str) -> dict[str, list]:
  """{tensor name: its Links}; every expected tensor present, none left over, shapes right."""
  plan = {}
  for link in hf_layout.links(cfg, hf_layout.expert_layout(tensors)):
    plan.setdefault(link.hf_name, []).append(link)
  if missing := [name for name in plan if name not in tensors]:
    raise ConvertError(f'{hf_dir}: {len(missing)} tensor(s) that config.json implies are missing, '
                       f'e.g. {", ".join(missing[:4])}')
  extra = [n for n in tensors if n not in plan and not n.endswith(hf_layout.IGNORED_SUFFIXES)]
  if cfg.tie_embeddings:  # Some tied checkpoints also store the head; the table serves as it.
    extra = [n for n in extra if n != 'lm_head.weight']
  if extra:
    raise ConvertError(f'{hf_dir}: {len(extra)} tensor(s) that meshlm has no place for (a feature '
                       f'config.json does not declare?), e.g. {", ".join(sorted(extra)[:4])}')
  for name, group in plan.items():
    shape = tensors[name].shape(name)
    if shape != group[0].hf_shape:
      raise ConvertError(f'{tensors[name].path}: tensor {name} has shape {list(shape)}; '
                         f'config.json implies {list(group[0].hf_shape)}')
  return plan


def _allocate(cfg: ModelConfig, scratch: str):
  """Zero memmaps on disk for every param, and each one's count of stacked (layer, expert) axes."""
  _, abstract = model_def(cfg)
  keys = lambda kp: tuple(k.key for k in kp)
  params = jax.tree_util.tree_map_with_path(
      lambda kp, x: np.memmap(os.path.join(scratch, '.'.join(keys(kp))), dtype=np.dtype(x.dtype),
                              mode='w+', shape=x.shape), abstract)
  stacked = jax.tree_util.tree_map_with_path(
      lambda kp, _: (keys(kp)[0] == 'layers') + keys(kp)[-1].endswith(('_edf', '_efd')), abstract)
  return params, stacked


def _fill(plan: dict, tensors: dict, params: dict, dtype: np.dtype) -> None:
  files = sorted({f.path: f for f in tensors.values()}.values(), key=lambda f: f.path)
  for i, f in enumerate(files):
    log.info('reading %s (%d/%d)', os.path.basename(f.path), i + 1, len(files))
    for name in f.names():
      if tensors.get(name) is not f or name not in plan:
        continue
      value = f.get(name)
      for link in plan[name]:
        target = hf_layout.leaf(params, link.path)
        slot_shape = target.shape[len(link.index):]
        target[link.index] = hf_layout.to_meshlm(link, value, slot_shape).astype(dtype, copy=False)
      del value
    for leaf in jax.tree.leaves(params):
      leaf.flush()
