"""Hugging Face import/export (train/convert/) checked against transformers itself.

Tiny random LlamaForCausalLM / MixtralForCausalLM models (float32, weights scaled so logits are
O(1) and a wrong mapping shows) are saved by transformers (sharded and single-file; Mixtral also
in transformers' fused expert layout), imported, and their logits compared with transformers'
on an 8-device CPU mesh; exports are reloaded by transformers and compared again, and their
tensors compared with the originals bit for bit. Needs the `parity` extra (torch, transformers,
safetensors); skipped without it.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
safetensors_torch = pytest.importorskip('safetensors.torch')

from model.config import ModelConfig  # noqa: E402
from train import config as config_lib  # noqa: E402
from train import state as state_lib  # noqa: E402
from train.checkpoint import Checkpointer  # noqa: E402
from train.convert import ConvertError, from_hf, load_checkpoint, to_hf  # noqa: E402
from train.convert import hf_layout, safetensors_io  # noqa: E402
from train.convert.__main__ import main as convert_main  # noqa: E402
from train.workdir import write_config  # noqa: E402

TOL = 1e-4
SMALL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)


def _randomise(model, seed):
  """Weights ~ N(0, 1/fan_in) and norm scales ~ 1 + N(0, 0.1): logits of order 1."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
  return model.eval()


def _llama(tied: bool):
  cfg = transformers.LlamaConfig(**SMALL, intermediate_size=64,
                                 num_key_value_heads=4 if tied else 2, tie_word_embeddings=tied,
                                 rope_theta=500_000.0, rms_norm_eps=1e-5)
  return _randomise(transformers.LlamaForCausalLM(cfg), seed=1 if tied else 0)


def _mixtral():
  cfg = transformers.MixtralConfig(**SMALL, intermediate_size=48, num_key_value_heads=2,
                                   num_local_experts=4, num_experts_per_tok=2, rope_theta=10_000.0)
  return _randomise(transformers.MixtralForCausalLM(cfg), seed=2)


# name -> (builder, save_pretrained keyword arguments)
CASES = {
    'llama_gqa_sharded': (lambda: _llama(tied=False), dict(max_shard_size='20KB')),
    'llama_tied_mha': (lambda: _llama(tied=True), {}),
    'mixtral': (_mixtral, dict(max_shard_size='60KB')),
    'mixtral_fused': (_mixtral, dict(save_original_format=False)),
}


@pytest.fixture(scope='module')
def hf_models(tmp_path_factory):
  """{case: (model, saved folder)}, built once per module."""
  root = tmp_path_factory.mktemp('hf')
  out = {}
  for name, (build, save_kw) in CASES.items():
    model = build()
    model.save_pretrained(root / name, **save_kw)
    out[name] = (model, str(root / name))
  return out


def _tokens(vocab: int, seed: int = 0):
  return np.random.default_rng(seed).integers(0, vocab, (2, 13)).astype(np.int32)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _hf_tensors(folder):
  """All tensors of a folder, read with the safetensors package."""
  out = {}
  for path in {f.path for f in safetensors_io.open_folder(folder).values()}:
    out.update({k: v.numpy() for k, v in safetensors_torch.load_file(path).items()})
  return out


def test_names_and_sharding_of_saved_folders(hf_models):
  """The fixtures exercise what they claim: several shards with an index, one file, both
  Mixtral expert layouts."""
  names = {case: set(safetensors_io.open_folder(path)) for case, (_, path) in hf_models.items()}
  assert os.path.isfile(os.path.join(hf_models['llama_gqa_sharded'][1], safetensors_io.INDEX))
  assert os.path.isfile(os.path.join(hf_models['llama_tied_mha'][1], safetensors_io.SINGLE))
  assert 'lm_head.weight' not in names['llama_tied_mha']
  assert hf_layout.expert_layout(names['mixtral']) == 'published'
  assert 'model.layers.1.block_sparse_moe.experts.3.w2.weight' in names['mixtral']
  assert hf_layout.expert_layout(names['mixtral_fused']) == 'fused'


@pytest.mark.parametrize('case', list(CASES))
def test_import_matches_transformers(hf_models, case, tmp_path):
  model, hf_dir = hf_models[case]
  out = tmp_path / 'meshlm'
  if case == 'mixtral':  # The CLI once; the others through the function.
    assert convert_main(['from-hf', hf_dir, str(out)]) == 0
  else:
    from_hf(hf_dir, str(out))
  loaded = load_checkpoint(str(out))
  hf_cfg = model.config
  assert loaded.cfg.num_kv_heads == hf_cfg.num_key_value_heads
  assert loaded.cfg.rope_theta == hf_cfg.rope_parameters['rope_theta']
  assert loaded.cfg.norm_eps == hf_cfg.rms_norm_eps
  assert loaded.cfg.tie_embeddings == hf_cfg.tie_word_embeddings
  assert loaded.cfg.num_experts == getattr(hf_cfg, 'num_local_experts', 0)
  assert int(loaded.config.data.seq_len) == hf_cfg.max_position_embeddings
  tokens = _tokens(hf_cfg.vocab_size)
  ref = _hf_logits(model, tokens)
  got = np.asarray(loaded(tokens))
  assert got.dtype == np.float32 and got.shape == ref.shape
  assert np.abs(ref).max() > 1.0  # A meaningful comparison.
  diff = float(np.abs(got - ref).max())
  print(f'{case}: max |meshlm - transformers| = {diff:.3g}')
  assert diff < TOL


@pytest.mark.parametrize('case', ['llama_gqa_sharded', 'mixtral_fused'])
def test_export_round_trip(hf_models, case, tmp_path):
  """HF -> meshlm -> HF: the same tensors bit for bit (published layout), transformers loads
  it and computes the same logits; HF -> meshlm -> HF -> meshlm: the same params."""
  model, hf_dir = hf_models[case]
  from_hf(hf_dir, str(tmp_path / 'a'))
  assert convert_main(['to-hf', str(tmp_path / 'a'), str(tmp_path / 'hf'),
                       '--max_shard_size', '30KB']) == 0
  exported = _hf_tensors(str(tmp_path / 'hf'))
  shards = {f.path for f in safetensors_io.open_folder(str(tmp_path / 'hf')).values()}
  assert len(shards) > 1
  original, _ = hf_models['mixtral' if case == 'mixtral_fused' else case]
  expected = {k: v.detach().numpy() for k, v in original.state_dict().items()}
  if case == 'mixtral_fused':  # The export writes the published layout; compare with that.
    expected = _hf_tensors(hf_models['mixtral'][1])
  expected = {k: v for k, v in expected.items() if not (original.config.tie_word_embeddings
                                                        and k == 'lm_head.weight')}
  assert sorted(exported) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)

  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'hf'),
                                                               dtype=torch.float32).eval()
  tokens = _tokens(model.config.vocab_size, seed=1)
  diff = float(np.abs(_hf_logits(reloaded, tokens) - _hf_logits(model, tokens)).max())
  print(f'{case}: max |reloaded export - original| = {diff:.3g}')
  assert diff < TOL

  from_hf(str(tmp_path / 'hf'), str(tmp_path / 'b'))
  a, b = load_checkpoint(str(tmp_path / 'a')), load_checkpoint(str(tmp_path / 'b'))
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               a.params, b.params)


def test_export_of_a_meshlm_checkpoint(tmp_path):
  """A model meshlm trained (saved by the training loop's Checkpointer, with optimizer-like
  extra state): MoE, tied embeddings, head_dim != d_model / num_heads. transformers' logits
  of the export equal meshlm's."""
  config = config_lib.defaults()
  config.model.update(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, mlp_dim=40, rope_theta=20_000.0, norm_eps=1e-5,
                      tie_embeddings=True, num_experts=4, experts_per_token=2, dispatch='dropless')
  config.data.seq_len = 32
  cfg = config_lib.model_config(config)
  params = state_lib.init_params(cfg, jax.random.PRNGKey(3))
  ckpt = Checkpointer(str(tmp_path / 'run' / 'checkpoints'))
  ckpt.save(7, {'step': np.int32(7), 'params': params, 'rng': jax.random.PRNGKey(0)}, {'pos': 1},
            force=True)
  ckpt.close()
  write_config(config, str(tmp_path / 'run'))
  to_hf(str(tmp_path / 'run'), str(tmp_path / 'hf'))
  hf_config = json.load(open(tmp_path / 'hf' / 'config.json'))
  assert hf_config['model_type'] == 'mixtral' and hf_config['head_dim'] == 16
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'hf'),
                                                               dtype=torch.float32).eval()
  tokens = _tokens(61, seed=2)
  ref = np.asarray(load_checkpoint(str(tmp_path / 'run'))(tokens))
  assert np.abs(ref).max() > 1.0
  diff = float(np.abs(_hf_logits(reloaded, tokens) - ref).max())
  print(f'meshlm checkpoint export: max |transformers - meshlm| = {diff:.3g}')
  assert diff < TOL


def test_router_weights_match_transformers():
  """HF: softmax over all experts, top-k, renormalise; meshlm: top-k logits, softmax over
  them. Same experts, same order, same weights."""
  from flax import nnx
  from model.moe import MoeBlock
  hf_cfg = transformers.MixtralConfig(hidden_size=16, num_local_experts=8, num_experts_per_tok=2)
  router = transformers.models.mixtral.modeling_mixtral.MixtralTopKRouter(hf_cfg)
  cfg = ModelConfig(vocab_size=8, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2,
                    mlp_dim=8, num_experts=8, experts_per_token=2)
  block = MoeBlock(cfg, nnx.Rngs(0))
  x = np.random.default_rng(0).standard_normal((1, 256, 16)).astype(np.float32)
  with torch.no_grad():
    router.weight.copy_(torch.tensor(np.asarray(block.router_de[...]).T))
    _, hf_weights, hf_experts = router(torch.tensor(x[0]))
  _, experts, weights = block.route(x)
  np.testing.assert_array_equal(np.asarray(experts[0]), hf_experts.numpy())
  np.testing.assert_allclose(np.asarray(weights[0]), hf_weights.numpy(), atol=1e-6)


def test_tokenizer_travels_with_the_model(tmp_path):
  """HF tokenizer.model -> OUT/tokenizer/ and config.data.tokenizer (what train.generate,
  train.eval and runs read) -> back into the export, with its BOS/EOS ids in config.json; a
  tokenizer larger than the model's vocabulary is refused before anything is written."""
  from data import corpus
  from data import tokenizer as tokenizer_lib
  tok = tokenizer_lib.train(corpus.documents(seed=0, num_docs=300), 400, 'unigram',
                            tmp_path / 'spm' / 'tok')
  cfg = transformers.LlamaConfig(**dict(SMALL, vocab_size=tok.vocab_size), intermediate_size=64)
  transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / 'hf')
  shutil.copyfile(tok.path, tmp_path / 'hf' / 'tokenizer.model')
  from_hf(str(tmp_path / 'hf'), str(tmp_path / 'meshlm'))
  loaded = load_checkpoint(str(tmp_path / 'meshlm'))
  assert loaded.config.data.tokenizer == str(tmp_path / 'meshlm' / 'tokenizer' / 'tokenizer.model')
  assert loaded.tokenizer.encode('one two') == tok.encode('one two')
  to_hf(str(tmp_path / 'meshlm'), str(tmp_path / 'back'))
  assert (tmp_path / 'back' / 'tokenizer.model').read_bytes() == open(tok.path, 'rb').read()
  hf = json.load(open(tmp_path / 'back' / 'config.json'))
  assert (hf['bos_token_id'], hf['eos_token_id']) == (tok.bos_id, tok.eos_id)

  small = tmp_path / 'small'
  transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, intermediate_size=64)
                                ).save_pretrained(small)
  shutil.copyfile(tok.path, small / 'tokenizer.model')
  with pytest.raises(ConvertError, match=f'{tok.vocab_size} pieces, more than vocab_size=97'):
    from_hf(str(small), str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('key, value', [
    ('rope_scaling', {'rope_type': 'llama3', 'factor': 8.0}),
    ('rope_parameters', {'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 4.0}),
    ('attention_bias', True),
    ('mlp_bias', True),
    ('hidden_act', 'gelu'),
    ('sliding_window', 16),
    ('model_type', 'qwen2'),
])
def test_unsupported_config_key_is_named(hf_models, tmp_path, key, value, capsys):
  folder = tmp_path / 'hf'
  shutil.copytree(hf_models['llama_tied_mha'][1], folder)
  hf = json.load(open(folder / 'config.json'))
  hf[key] = value
  json.dump(hf, open(folder / 'config.json', 'w'))
  with pytest.raises(ConvertError, match=f'config.json: {key.split(".")[0]}'):
    from_hf(str(folder), str(tmp_path / 'out'))
  assert convert_main(['from-hf', str(folder), str(tmp_path / 'out')]) == 2
  assert key in capsys.readouterr().err
  assert not (tmp_path / 'out' / 'checkpoints').exists()


def test_missing_or_misshapen_tensor_is_named(hf_models, tmp_path):
  model, _ = hf_models['llama_tied_mha']
  tensors = {k: v.detach().numpy() for k, v in model.state_dict().items() if k != 'lm_head.weight'}
  hf = json.load(open(os.path.join(hf_models['llama_tied_mha'][1], 'config.json')))

  def folder(name, tensors):
    path = tmp_path / name
    path.mkdir()
    json.dump(hf, open(path / 'config.json', 'w'))
    specs = [(k, v.dtype, v.shape) for k, v in tensors.items()]
    safetensors_io.write_file(str(path / 'model.safetensors'), specs, tensors.values())
    return str(path)

  gone = 'model.layers.1.self_attn.k_proj.weight'
  with pytest.raises(ConvertError, match=gone):
    from_hf(folder('missing', {k: v for k, v in tensors.items() if k != gone}),
            str(tmp_path / 'o1'))
  bad = dict(tensors, **{gone: tensors[gone][:, :-1].copy()})
  with pytest.raises(ConvertError, match=rf'{gone} has shape \[32, 31\]'):
    from_hf(folder('misshapen', bad), str(tmp_path / 'o2'))
  extra = dict(tensors, **{'model.layers.0.self_attn.q_proj.bias': np.zeros(32, np.float32)})
  with pytest.raises(ConvertError, match='q_proj.bias'):
    from_hf(folder('extra', extra), str(tmp_path / 'o3'))


def test_interleaved_moe_has_no_hf_form():
  cfg = ModelConfig(vocab_size=8, d_model=16, num_layers=2, num_heads=2, num_kv_heads=2,
                    mlp_dim=8, num_experts=4, moe_every=2)
  with pytest.raises(ConvertError, match='model.moe_every=2'):
    hf_layout.hf_config(cfg, seq_len=16, dtype='float32')


def test_safetensors_writer_is_read_by_the_reference_library(tmp_path):
  """bfloat16 / float16 / float32 tensors written here read back identically with the
  safetensors package (the path real bf16 checkpoints take)."""
  import ml_dtypes
  rng = np.random.default_rng(0)
  tensors = {'a': rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
             'b': rng.standard_normal((7,)).astype(np.float16),
             'c': rng.standard_normal((2, 3, 4)).astype(np.float32)}
  path = str(tmp_path / 'x.safetensors')
  safetensors_io.write_file(path, [(k, v.dtype, v.shape) for k, v in tensors.items()],
                            tensors.values())
  ref = safetensors_torch.load_file(path)
  np.testing.assert_array_equal(ref['a'].float().numpy(), tensors['a'].astype(np.float32))
  np.testing.assert_array_equal(ref['b'].numpy(), tensors['b'])
  np.testing.assert_array_equal(ref['c'].numpy(), tensors['c'])
  mine = safetensors_io.SafetensorsFile(path)
  for k, v in tensors.items():
    np.testing.assert_array_equal(mine.get(k), v)


def _rss_anon_mb() -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('RssAnon:'):
        return int(line.split()[1]) / 1024
  raise OSError('no RssAnon in /proc/self/status')


class _PeakAnon:
  """Peak anonymous (not file-backed) resident memory above the level at entry, sampled."""

  def __enter__(self):
    import threading
    self.base, self.peak, self._stop = _rss_anon_mb(), 0.0, threading.Event()

    def sample():
      while not self._stop.is_set():
        self.peak = max(self.peak, _rss_anon_mb() - self.base)
        self._stop.wait(0.005)

    self._thread = threading.Thread(target=sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


@pytest.mark.slow
def test_memory_stays_below_the_model_size(tmp_path):
  """A 1.7 GB bfloat16 Mixtral-shaped checkpoint (random bits, incompressible) in 4 shards:
  import and export each hold far less than the model in anonymous memory (memory-mapped
  file pages are reclaimable and not counted)."""
  hf = dict(model_type='mixtral', vocab_size=32000, hidden_size=1024, intermediate_size=3584,
            num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
            num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
            rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, dtype='bfloat16')
  kwargs, _ = hf_layout.model_kwargs(hf)
  cfg = ModelConfig(**kwargs, param_dtype='bfloat16')
  links = hf_layout.links(cfg)
  src = tmp_path / 'hf'
  src.mkdir()
  json.dump(hf, open(src / 'config.json', 'w'))
  bf16 = safetensors_io.DTYPES['BF16']
  specs = [(link.hf_name, bf16, link.hf_shape) for link in links]
  rng = np.random.default_rng(0)

  def random_bits(shape):  # Finite bfloat16 values: sign, exponent 64..191, any mantissa.
    bits = rng.integers(0, 1 << 16, shape, dtype=np.uint16)
    return ((bits & 0x807F) | (((bits >> 7) & 0x7F) + 64 << 7).astype(np.uint16)).view(bf16)

  shards = safetensors_io.plan_shards(specs, 500 * 10**6)
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    name = safetensors_io.shard_name(i, len(shards))
    safetensors_io.write_file(str(src / name), shard, (random_bits(s) for _, _, s in shard))
    weight_map.update({n: name for n, _, _ in shard})
    total += sum(int(np.prod(s)) * 2 for _, _, s in shard)
  safetensors_io.write_index(str(src), weight_map, total)
  model_mb = total / 2**20

  with _PeakAnon() as imp:
    from_hf(str(src), str(tmp_path / 'meshlm'))
  with _PeakAnon() as exp:
    to_hf(str(tmp_path / 'meshlm'), str(tmp_path / 'back'), max_shard_bytes=500 * 10**6)
  print(f'model {model_mb:.0f} MiB in {len(shards)} shards; peak anonymous memory above the '
        f'start: import {imp.peak:.0f} MiB, export {exp.peak:.0f} MiB')
  assert imp.peak < model_mb / 3 and exp.peak < model_mb / 3
  back = safetensors_io.open_folder(str(tmp_path / 'back'))
  orig = safetensors_io.open_folder(str(src))
  for name in ('model.layers.7.block_sparse_moe.experts.5.w2.weight', 'lm_head.weight'):
    np.testing.assert_array_equal(back[name].get(name), orig[name].get(name))
