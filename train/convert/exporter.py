"""meshlm checkpoint -> Hugging Face folder (`python -m train.convert to-hf CKPT_DIR OUT_DIR`).

CKPT_DIR: a workdir, its `checkpoints/` or one `checkpoints/<step>`; the shape comes from
`--config`, else its config.json. OUT_DIR gets config.json (LlamaForCausalLM, or MixtralForCausalLM
for MoE), the weights (experts in the published w1/w2/w3 layout) as `model.safetensors` or shards of
at most `max_shard_bytes` with model.safetensors.index.json, and the run's tokenizer.model if any;
about one tensor is resident at a time (docs/convert.md, "Memory").
"""

import json
import logging
import os
import shutil

import jax.numpy as jnp
import numpy as np

from data.tokenizer import Tokenizer
from train import config as config_lib
from train import workdir as workdir_lib
from train.state import model_def
from train.convert import hf_layout, safetensors_io, store
from train.convert.hf_layout import ConvertError

log = logging.getLogger('meshlm.convert')


def locate(checkpoint: str, config=None):
  """(run config, ModelConfig, checkpoints folder, step, workdir) of a checkpoint path."""
  root, step, workdir = workdir_lib.resolve_checkpoint(checkpoint)
  config = workdir_lib.load_config(config, workdir)
  step = workdir_lib.latest_step(root) if step is None else step
  if step is None:
    raise FileNotFoundError(f'{root}: no finished checkpoint step')
  return config, config_lib.model_config(config), root, step, workdir


def to_hf(checkpoint: str, out_dir: str, *, config=None, dtype: str | None = None,
          max_shard_bytes: int = 5 * 10**9) -> str:
  """Exports; returns OUT_DIR."""
  config, cfg, root, step, workdir = locate(checkpoint, config)
  stored = store.StoredParams(root, step)
  tok = workdir_lib.tokenizer_path(config, workdir)
  dtype = dtype or str(stored.dtype(('embed', 'table_vd')))
  if dtype not in ('float32', 'bfloat16', 'float16'):
    raise ConvertError(f'--dtype {dtype!r}: use float32, bfloat16 or float16')
  out_dtype = np.dtype(jnp.dtype(dtype))
  spm = Tokenizer(tok) if tok else None
  special = {'bos_id': spm.bos_id, 'eos_id': spm.eos_id} if spm else {}
  hf = hf_layout.hf_config(cfg, seq_len=int(config.data.seq_len), dtype=dtype,
                           **special)  # Raises first if the model has no HF form.
  _, abstract = model_def(cfg)
  links = hf_layout.links(cfg)
  for link in {link.path: link for link in links}.values():
    want = tuple(hf_layout.leaf(abstract, link.path).shape)
    if stored.shape(link.path) != want:
      raise ConvertError(f'{stored.directory}: param {"/".join(link.path)} is '
                         f'{list(stored.shape(link.path))}, but the config ({workdir}) implies '
                         f'{list(want)}; pass the experiment file it was trained with (--config)')

  if old := [n for n in (os.listdir(out_dir) if os.path.isdir(out_dir) else [])
             if n.endswith('.safetensors') or n == 'config.json']:
    raise FileExistsError(f'{out_dir} already holds {old[0]}; export into a new folder')
  os.makedirs(out_dir, exist_ok=True)
  by_name = {link.hf_name: link for link in links}
  shards = safetensors_io.plan_shards(
      [(link.hf_name, out_dtype, link.hf_shape) for link in links], max_shard_bytes)
  weight_map = {}
  for i, shard in enumerate(shards):
    name = safetensors_io.shard_name(i, len(shards))
    log.info('writing %s (%d tensors)', name, len(shard))
    values = (hf_layout.to_hf(by_name[n], stored.read_slice(by_name[n].path, by_name[n].index))
              .astype(out_dtype, copy=False) for n, _, _ in shard)
    safetensors_io.write_file(os.path.join(out_dir, name), shard, values)
    weight_map.update({n: name for n, _, _ in shard})
  if len(shards) > 1:
    total = sum(safetensors_io.nbytes(dt, shape) for shard in shards for _, dt, shape in shard)
    safetensors_io.write_index(out_dir, weight_map, total)
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2)
  if tok:
    shutil.copyfile(tok, os.path.join(out_dir, 'tokenizer.model'))
  return out_dir
