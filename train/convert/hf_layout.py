"""The Hugging Face layout of Llama, Mistral and Mixtral checkpoints, and how it maps to meshlm.

config.json <-> ModelConfig: a missing key means what it means to transformers (DEFAULTS, per model
type); Mixtral imports use dispatch='dropless'. A key that changes the model's function in a way
meshlm does not implement is a ConvertError naming it.

Tensors (`links`): a Hugging Face linear layer W [out, in] is meshlm's slice W^T reshaped, one
slice [layer] (and [layer, expert]) of a stacked parameter; Mixtral experts are read in the
published (w1/w2/w3) or transformers' fused gate_up layout, written in the first (docs/convert.md).
"""

import dataclasses

from model.config import ConfigError, ModelConfig

MODEL_TYPES = ('llama', 'mistral', 'mixtral')
DTYPE_NAMES = {'float32': 'float32', 'float': 'float32', 'bfloat16': 'bfloat16',
               'float16': 'float16', 'half': 'float16'}
IGNORED_SUFFIXES = ('.rotary_emb.inv_freq',)  # Buffers some old checkpoints saved.
# transformers' defaults for keys a config.json may leave out (its config classes, v5.23).
DEFAULTS = {
    'llama': dict(num_key_value_heads=None, max_position_embeddings=2048, rms_norm_eps=1e-6,
                  rope_theta=10_000.0, sliding_window=None),
    'mistral': dict(num_key_value_heads=8, max_position_embeddings=131_072, rms_norm_eps=1e-6,
                    rope_theta=10_000.0, sliding_window=4096),
    'mixtral': dict(num_key_value_heads=8, max_position_embeddings=131_072, rms_norm_eps=1e-5,
                    rope_theta=1_000_000.0, sliding_window=None, num_local_experts=8,
                    num_experts_per_tok=2),
}


class ConvertError(ValueError):
  """A checkpoint or config that cannot be converted; the message names the file and key."""


@dataclasses.dataclass(frozen=True)
class Link:
  """One Hugging Face tensor and the meshlm slice `path`[`index`] it fills, reshaped: `kind` 'copy'
  (as is) or 'linear' (last two axes swapped; `rows`: the fused gate_up tensor's out-axis rows)."""
  hf_name: str
  hf_shape: tuple[int, ...]
  path: tuple[str, ...]
  index: tuple[int, ...]
  kind: str
  rows: tuple[int, int] | None = None


def _reject(source: str, key: str, value, why: str):
  raise ConvertError(f'{source}: {key}={value!r} is not supported: {why}')


def model_kwargs(hf: dict, source: str = 'config.json', *,
                 allow_sliding_window: bool = False) -> tuple[dict, int]:
  """(ModelConfig keyword arguments, max_position_embeddings) of a Hugging Face config dict."""
  get = lambda key, default=None: default if hf.get(key) is None else hf[key]

  def need(key):
    if hf.get(key) is None:
      raise ConvertError(f'{source}: missing key {key!r}')
    return int(hf[key])

  model_type = hf.get('model_type')
  if model_type not in MODEL_TYPES:
    _reject(source, 'model_type', model_type, f'only {", ".join(MODEL_TYPES)} are converted')
  if get('hidden_act', 'silu') != 'silu':
    _reject(source, 'hidden_act', hf['hidden_act'], 'meshlm MLPs are SwiGLU (silu)')
  for key in ('attention_bias', 'mlp_bias'):
    if get(key, False):
      _reject(source, key, hf[key], 'meshlm projections have no bias')
  if hf.get('quantization_config'):
    _reject(source, 'quantization_config', '...', 'dequantise the checkpoint first')
  scaling, rope = hf.get('rope_scaling'), hf.get('rope_parameters') or {}
  if scaling and scaling.get('rope_type', scaling.get('type', 'default')) != 'default':
    _reject(source, 'rope_scaling', scaling, 'meshlm implements plain RoPE only')
  if rope.get('rope_type', 'default') != 'default':
    _reject(source, 'rope_parameters.rope_type', rope['rope_type'],
            'meshlm implements plain RoPE only')
  for key, factor in (('partial_rotary_factor', hf.get('partial_rotary_factor')),
                      ('rope_parameters.partial_rotary_factor', rope.get('partial_rotary_factor'))):
    if factor is not None and factor != 1.0:
      _reject(source, key, factor, 'meshlm rotates the whole head dimension')
  layer_types = hf.get('layer_types') or []
  if any(t != 'full_attention' for t in layer_types):
    _reject(source, 'layer_types', sorted(set(layer_types)), 'meshlm layers all use full attention')
  default = DEFAULTS[model_type]
  seq_len = int(get('max_position_embeddings', default['max_position_embeddings']))
  window = hf.get('sliding_window', default['sliding_window'])
  if window is not None and window < seq_len and not allow_sliding_window:
    _reject(source, 'sliding_window', window,
            f'meshlm attends over the whole context (max_position_embeddings={seq_len}); the model '
            f'is only the same for sequences of at most {window} tokens. Pass '
            '--allow_sliding_window to convert anyway')
  d, n = need('hidden_size'), need('num_attention_heads')
  kw = dict(
      vocab_size=need('vocab_size'), d_model=d, num_layers=need('num_hidden_layers'), num_heads=n,
      num_kv_heads=int(get('num_key_value_heads', default['num_key_value_heads'] or n)),
      head_dim=int(get('head_dim', d // n)), mlp_dim=need('intermediate_size'),
      rope_theta=float(rope.get('rope_theta', hf.get('rope_theta', default['rope_theta']))),
      norm_eps=float(get('rms_norm_eps', default['rms_norm_eps'])),
      tie_embeddings=bool(get('tie_word_embeddings', False)))
  if model_type == 'mixtral':
    kw.update(num_experts=int(get('num_local_experts', default['num_local_experts'])),
              experts_per_token=int(get('num_experts_per_tok', default['num_experts_per_tok'])),
              moe_mlp_dim=kw['mlp_dim'], moe_every=1, dispatch='dropless',
              router_jitter=float(get('router_jitter_noise', 0.0)))
  try:
    ModelConfig(**kw).validate(prefix=f'{source} -> model')
  except ConfigError as e:
    raise ConvertError(str(e)) from e
  return kw, seq_len


def hf_dtype(hf: dict) -> str | None:
  """The dtype config.json declares (`dtype`, or `torch_dtype` of older files), as a name."""
  name = hf.get('dtype') or hf.get('torch_dtype')
  return DTYPE_NAMES.get(str(name).replace('torch.', '')) if name else None


def hf_config(cfg: ModelConfig, *, seq_len: int, dtype: str, bos_id: int = 1, eos_id: int = 2,
              source: str = 'model') -> dict:
  """config.json for a meshlm model: LlamaForCausalLM, or MixtralForCausalLM for MoE."""
  if cfg.is_moe and cfg.moe_every != 1:
    raise ConvertError(f'{source}.moe_every={cfg.moe_every}: Mixtral has experts in every layer; '
                       'interleaved dense/MoE layers have no Hugging Face equivalent here')
  hf = {
      'architectures': ['MixtralForCausalLM' if cfg.is_moe else 'LlamaForCausalLM'],
      'model_type': 'mixtral' if cfg.is_moe else 'llama',
      'vocab_size': cfg.vocab_size, 'hidden_size': cfg.d_model,
      'intermediate_size': cfg.expert_mlp_dim if cfg.is_moe else cfg.mlp_dim,
      'num_hidden_layers': cfg.num_layers, 'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads, 'head_dim': cfg.dim_per_head,
      'hidden_act': 'silu', 'max_position_embeddings': int(seq_len),
      'rms_norm_eps': cfg.norm_eps, 'rope_theta': cfg.rope_theta,
      'rope_parameters': {'rope_type': 'default', 'rope_theta': cfg.rope_theta},
      'tie_word_embeddings': cfg.tie_embeddings, 'attention_bias': False,
      'attention_dropout': 0.0, 'bos_token_id': bos_id, 'eos_token_id': eos_id,
      'dtype': dtype, 'torch_dtype': dtype, 'use_cache': True,
  }
  if cfg.is_moe:
    hf.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
              router_jitter_noise=cfg.router_jitter, sliding_window=None,
              output_router_logits=False)
  else:
    hf['mlp_bias'] = False
  return hf


def links(cfg: ModelConfig, experts: str = 'published') -> list[Link]:
  """Every tensor of `cfg`'s Hugging Face checkpoint in export order (layer by layer; a layer's
  experts all w1, then w2, then w3); `experts`: 'published' or 'fused' (dense models: ignored)."""
  d, n, k, h, v = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head, cfg.vocab_size
  out = [Link('model.embed_tokens.weight', (v, d), ('embed', 'table_vd'), (), 'copy')]
  for l in range(cfg.num_layers):
    p, at, mlp = f'model.layers.{l}.', ('layers', 'attn'), ('layers', 'mlp')
    out += [
        Link(p + 'input_layernorm.weight', (d,), ('layers', 'attn_norm', 'scale'), (l,), 'copy'),
        Link(p + 'self_attn.q_proj.weight', (n * h, d), at + ('q_dnh',), (l,), 'linear'),
        Link(p + 'self_attn.k_proj.weight', (k * h, d), at + ('k_dkh',), (l,), 'linear'),
        Link(p + 'self_attn.v_proj.weight', (k * h, d), at + ('v_dkh',), (l,), 'linear'),
        Link(p + 'self_attn.o_proj.weight', (d, n * h), at + ('o_nhd',), (l,), 'linear'),
        Link(p + 'post_attention_layernorm.weight', (d,), ('layers', 'mlp_norm', 'scale'), (l,),
             'copy'),
    ]
    if not cfg.is_moe:
      f = cfg.mlp_dim
      out += [Link(p + 'mlp.gate_proj.weight', (f, d), mlp + ('gate_df',), (l,), 'linear'),
              Link(p + 'mlp.up_proj.weight', (f, d), mlp + ('up_df',), (l,), 'linear'),
              Link(p + 'mlp.down_proj.weight', (d, f), mlp + ('down_fd',), (l,), 'linear')]
      continue
    e, f = cfg.num_experts, cfg.expert_mlp_dim
    if experts == 'fused':
      out += [
          Link(p + 'mlp.gate.weight', (e, d), mlp + ('router_de',), (l,), 'linear'),
          Link(p + 'mlp.experts.gate_up_proj', (e, 2 * f, d), mlp + ('gate_edf',), (l,), 'linear',
               (0, f)),
          Link(p + 'mlp.experts.gate_up_proj', (e, 2 * f, d), mlp + ('up_edf',), (l,), 'linear',
               (f, 2 * f)),
          Link(p + 'mlp.experts.down_proj', (e, d, f), mlp + ('down_efd',), (l,), 'linear')]
      continue
    moe = p + 'block_sparse_moe.'
    out.append(Link(moe + 'gate.weight', (e, d), mlp + ('router_de',), (l,), 'linear'))
    for w, name, shape in (('w1', 'gate_edf', (f, d)), ('w2', 'down_efd', (d, f)),
                           ('w3', 'up_edf', (f, d))):
      out += [Link(f'{moe}experts.{j}.{w}.weight', shape, mlp + (name,), (l, j), 'linear')
              for j in range(e)]
  out.append(Link('model.norm.weight', (d,), ('final_norm', 'scale'), (), 'copy'))
  if not cfg.tie_embeddings:
    out.append(Link('lm_head.weight', (v, d), ('head_dv',), (), 'linear'))
  return out


def expert_layout(names) -> str:
  """'fused' if the tensor names are transformers' fused expert layout, else 'published'."""
  return 'fused' if any('.mlp.experts.gate_up_proj' in name for name in names) else 'published'


def to_meshlm(link: Link, value, slice_shape):
  """The meshlm slice of one Hugging Face tensor (numpy in, numpy out; no copy for 'copy')."""
  if link.kind == 'copy':
    return value.reshape(slice_shape)
  if link.rows is not None:
    value = value[..., link.rows[0]:link.rows[1], :]
  return value.swapaxes(-1, -2).reshape(slice_shape)


def to_hf(link: Link, slice_value):
  """The Hugging Face tensor of one meshlm slice (published layout: no `rows`)."""
  if link.kind == 'copy':
    return slice_value.reshape(link.hf_shape)
  return slice_value.reshape(link.hf_shape[::-1]).T


def leaf(tree: dict, path: tuple[str, ...]):
  """The value at `path` of a nested dict (the parameter a Link fills)."""
  for key in path:
    tree = tree[key]
  return tree
