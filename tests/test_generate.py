"""KV-cache decoding (model/decode.py, Decoder.extend) and the Generator (train/generate.py).

Cached logits are compared with a full forward pass of each row laid out differently (right-
padded, no cache), on an 8-device CPU mesh; sampled tokens' log-probs with log_softmax of a full
forward; batching, buckets, stop strings and the CLI through the Generator.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from data import corpus
from data import tokenizer as tokenizer_lib
from model import decode
from model.transformer import CACHE_AXES, init_cache
from model.sharding import logical_to_spec
from train import generate as gen_lib
from train import state as state_lib
from train import workdir as workdir_lib
from tests.util import mesh, tiny_cfg

PROMPTS = [[5, 17, 33, 8, 21, 60, 2], [44, 9], [71, 3, 12, 90]]


def placed(cfg, m, seed=0):
  mdef, abstract = state_lib.model_def(cfg)
  params = state_lib.init_params(cfg, jax.random.PRNGKey(seed))
  return mdef, jax.device_put(params, state_lib.param_shardings(mdef, abstract, m))


def right_padded_forward(mdef, params, rows, length):
  """Logits of each row alone: tokens at columns 0.., padding (segment 0) after; no cache."""
  tokens = np.zeros((len(rows), length), np.int32)
  segs = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)], segs[i, :len(r)] = r, 1
  pos = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
  fwd = jax.jit(lambda p, t, q, s: mdef.build(p)(t, q, s)[0])
  return np.asarray(fwd(params, tokens, pos, segs))


def cached_greedy(cfg, mdef, params, prompts, steps, prompt_len=8):
  """Prefill + `steps - 1` one-token steps by hand; logits [b, steps, v] and tokens [b, steps]."""
  tokens_bp, lengths_b = decode.left_pad(prompts, prompt_len)

  @jax.jit
  def run(params, tokens_bp, lengths_b):
    model = mdef.build(params)
    b = tokens_bp.shape[0]
    pos_bp, seg_bp = decode.prompt_layout(lengths_b, prompt_len)
    cache = init_cache(cfg, b, prompt_len + steps)
    h, cache = model.extend(tokens_bp, pos_bp, seg_bp, cache, 0)
    logits = [model.logits(h[:, -1:])[:, 0]]
    toks = [jnp.argmax(logits[-1], -1).astype(jnp.int32)]
    for i in range(steps - 1):
      h, cache = model.extend(toks[-1][:, None], (lengths_b + i)[:, None],
                              jnp.ones((b, 1), jnp.int32), cache, prompt_len + i)
      logits.append(model.logits(h)[:, 0])
      toks.append(jnp.argmax(logits[-1], -1).astype(jnp.int32))
    return jnp.stack(logits, 1), jnp.stack(toks, 1), cache

  return run(params, tokens_bp, lengths_b)


def check_cached_equals_full(cfg, m, steps=5, full_cfg=None):
  """Cached greedy decoding with decode.decoding_config(cfg) vs a full forward pass of each
  row with `full_cfg` (default: the same decoding config); returns the cached logits."""
  dec_cfg = decode.decoding_config(cfg)
  mdef, params = placed(dec_cfg, m)
  full_mdef, _ = placed(full_cfg or dec_cfg, m)
  with jax.set_mesh(m):
    logits_bsv, toks_bs, cache = cached_greedy(dec_cfg, mdef, params, PROMPTS, steps)
    rows = [p + [int(t) for t in toks_bs[i, :-1]] for i, p in enumerate(PROMPTS)]
    full = right_padded_forward(full_mdef, params, rows, 16)
  # The cache holds kv heads (GQA: 2, not 4) and is sharded like the activations.
  assert cache['k'].shape[-2] == cfg.num_kv_heads != cfg.num_heads
  want = NamedSharding(m, logical_to_spec(CACHE_AXES, cache['k'].shape, m))
  assert cache['k'].sharding.is_equivalent_to(want, cache['k'].ndim)
  for i, p in enumerate(PROMPTS):
    want = full[i, len(p) - 1:len(p) - 1 + steps]
    np.testing.assert_allclose(np.asarray(logits_bsv[i]), want, atol=2e-5, rtol=1e-5)
  return logits_bsv


def test_cached_decoding_equals_full_forward_dense_sharded():
  check_cached_equals_full(tiny_cfg(), mesh(data=2, fsdp=2, tensor=2))


def test_cached_decoding_equals_full_forward_unrolled_layers():
  check_cached_equals_full(tiny_cfg(scan_layers=False, num_layers=3), mesh(fsdp=4))


MOE = dict(num_experts=4, experts_per_token=2, moe_every=2, num_layers=4)


def test_cached_decoding_equals_full_forward_moe_capacity_sharded():
  # moe_every=2 interleaves dense and MoE layers (a stacked Unit of two blocks); experts,
  # batch and heads are all sharded. capacity_factor=1 drops assignments in a full pass (and
  # in a prefill, where the left padding comes first): decoding raises it to e / k = 2, so the
  # cached logits equal a full pass with dropless dispatch.
  cfg = tiny_cfg(capacity_factor=1.0, **MOE)
  assert decode.decoding_config(cfg).capacity_factor == 2.0
  m = mesh(data=2, expert=2, tensor=2)
  check_cached_equals_full(cfg, m, full_cfg=dataclasses.replace(cfg, dispatch='dropless'))
  # The training config itself drops assignments of these left-padded prompts: the check
  # above is not vacuous.
  mdef, params = placed(cfg, m)
  with jax.set_mesh(m):
    _, aux = jax.jit(lambda p, t: mdef.build(p)(t))(params, decode.left_pad(PROMPTS, 8)[0])
  assert float(aux['dropped_fraction']) > 0


def test_cached_decoding_equals_full_forward_moe_dropless():
  cfg = tiny_cfg(dispatch='dropless', **MOE)
  assert decode.decoding_config(cfg) is cfg
  check_cached_equals_full(cfg, mesh(data=2, fsdp=2, tensor=2))


def test_sampled_logprobs_equal_full_forward_and_eos_stops_rows(tok):
  cfg = tiny_cfg(vocab_size=400)
  m = mesh(fsdp=2, data=2)
  mdef, params = placed(cfg, m, seed=1)
  sampling = decode.Sampling(temperature=1.0, top_k=40, top_p=0.95)
  gen = gen_lib.Generator(cfg, params, tok, m, max_batch=2, min_bucket=8)

  def run(params, eos_e):
    return gen.generate_ids(PROMPTS, max_new_tokens=12, sampling=sampling, stop_ids=eos_e, seed=3)

  free = run(params, [])
  eos = int(free.tokens_bs[0, 8 + 3])  # Row 0's 4th token becomes EOS.
  s = run(params, [eos])
  np.testing.assert_array_equal(free.num_new_b, 12)
  n0 = int(s.num_new_b[0])
  first = int(np.argmax(free.tokens_bs[0, 8:] == eos)) + 1
  assert n0 == first <= 4 and s.finish_b[0] == 'eos'
  # Same RNG stream: rows agree with the free run up to their stop.
  np.testing.assert_array_equal(s.tokens_bs[0, :8 + n0], free.tokens_bs[0, :8 + n0])
  assert np.all(s.tokens_bs[0, 8 + n0:] == 0)
  assert np.all(s.logprobs_bs[0, 8 + n0:] == 0)
  for state in (free, s):
    lay = state.layout()
    with jax.set_mesh(m):
      logits = jax.jit(lambda p: mdef.build(p)(lay['tokens'], lay['positions'],
                                               lay['segment_ids'])[0])(params)
    logp = jax.nn.log_softmax(np.asarray(logits)[:, :-1], -1)
    want = np.take_along_axis(np.asarray(logp), lay['tokens'][:, 1:, None], -1)[..., 0]
    mask = lay['response_mask'][:, 1:]
    got = state.logprobs_bs[:, 1:]
    np.testing.assert_allclose(got * mask, want * mask, atol=2e-5)
    assert np.all(got[mask == 0] == 0)


# Mixed lengths, more prompts than the 4 slots of a Generator(max_batch=2) on a 4-way batch.
MIXED = [[5, 17, 33, 8, 21, 60, 2, 9, 14, 3, 77], [44], [71, 3, 12, 90], [6, 6, 1, 80, 13, 2],
         [30, 31], [99, 5, 41, 7, 7, 7, 62, 19, 25], [8, 11, 4]]
SHARDED = dict(data=2, fsdp=2, tensor=2)


def full_forward_greedy(mdef, params, prompts, steps):
  """Greedy tokens [n, steps] and their log-probs by a full forward pass per step, no cache."""
  rows = [list(p) for p in prompts]
  logps = []
  for _ in range(steps):
    logits = right_padded_forward(mdef, params, rows, 32)
    last = np.stack([logits[i, len(r) - 1] for i, r in enumerate(rows)])
    logp = np.asarray(jax.nn.log_softmax(last, -1))
    nxt = np.argmax(last, -1)
    logps.append(logp[np.arange(len(rows)), nxt])
    rows = [r + [int(t)] for r, t in zip(rows, nxt)]
  return np.array([r[len(p):] for r, p in zip(rows, prompts)]), np.stack(logps, 1)


def test_continuous_batching_greedy_equals_full_forward_sharded(tok):
  cfg = tiny_cfg(vocab_size=400)
  m = mesh(**SHARDED)
  mdef, params = placed(cfg, m, seed=2)
  gen = gen_lib.Generator(cfg, params, tok, m, max_batch=2, min_bucket=8)
  assert gen.slots == 4 < len(MIXED)
  with jax.set_mesh(m):
    want_tokens, want_logp = full_forward_greedy(mdef, params, MIXED, 6)
  for static in (False, True):
    out = gen.generate_ids(MIXED, max_new_tokens=6, stop_ids=[], static=static)
    assert out.prompt_len == 16 and out.finish_b == ['length'] * len(MIXED)
    np.testing.assert_array_equal(out.tokens_bs[:, 16:22], want_tokens)
    np.testing.assert_allclose(out.logprobs_bs[:, 16:22], want_logp, atol=2e-5)


def test_admission_order_does_not_change_sampled_tokens(tok):
  # EOS taken from a free run stops sequences at different steps, so slots free up and are
  # refilled at different times in each engine: continuous and static over 4 slots, and
  # continuous over 8 slots (every prompt admitted at once).
  cfg = tiny_cfg(vocab_size=400)
  m = mesh(**SHARDED)
  _, params = placed(cfg, m, seed=3)
  sampling = decode.Sampling(temperature=1.0, top_k=50)
  gens = [gen_lib.Generator(cfg, params, tok, m, max_batch=b, min_bucket=8) for b in (2, 8)]
  free = gens[0].generate_ids(MIXED, max_new_tokens=10, sampling=sampling, stop_ids=[], seed=5)
  eos = int(np.bincount(free.tokens_bs[:, 16:26].ravel()).argmax())  # The most frequent token.
  runs = [g.generate_ids(MIXED, max_new_tokens=10, sampling=sampling, stop_ids=[eos], seed=5,
                         static=static) for g, static in ((gens[0], False), (gens[0], True),
                                                           (gens[1], False))]
  for i, p in enumerate(MIXED):
    new = list(free.tokens_bs[i, 16:26])
    k = new.index(eos) + 1 if eos in new else 10
    for r in runs:
      assert r.completion_ids(i) == new[:k]
      assert r.finish_b[i] == ('eos' if eos in new else 'length')
      np.testing.assert_allclose(r.logprobs_bs[i, 16:16 + k], free.logprobs_bs[i, 16:16 + k],
                                 atol=1e-5)
  assert len({int(n) for n in runs[0].num_new_b}) > 2  # Stops at several different steps.


def test_samples_per_prompt_equal_repeated_prompts(tok):
  # A prompt sampled g times is prefilled once and copied into g slots; each row draws with the
  # keys of the matching row of the repeated prompt list, so tokens and log-probs are the same
  # (4 slots: groups of 2 admitted whole as slots free up, continuous and static).
  cfg = tiny_cfg(vocab_size=400)
  m = mesh(**SHARDED)
  _, params = placed(cfg, m, seed=3)
  gen = gen_lib.Generator(cfg, params, tok, m, max_batch=2, min_bucket=8)
  sampling = decode.Sampling(temperature=1.0)
  kw = dict(max_new_tokens=10, sampling=sampling, stop_ids=list(range(3, 400, 9)), seed=1)
  want = gen.generate_ids([p for p in MIXED for _ in range(2)], **kw)
  for static in (False, True):
    got = gen.generate_ids(MIXED, samples=2, static=static, **kw)
    assert got.finish_b == want.finish_b and len(got.finish_b) == 2 * len(MIXED)
    np.testing.assert_array_equal(got.tokens_bs, want.tokens_bs)
    np.testing.assert_array_equal(got.lengths_b, want.lengths_b)
    np.testing.assert_allclose(got.logprobs_bs, want.logprobs_bs, atol=1e-5)
  assert len({int(n) for n in want.num_new_b}) > 2  # Stops at several different steps.
  assert len({tuple(want.completion_ids(i)) for i in range(len(want.finish_b))}) > len(MIXED)
  wide = gen.generate_ids(MIXED[:2], samples=5, **kw)  # More samples than slots: plain rows.
  rows = gen.generate_ids([p for p in MIXED[:2] for _ in range(5)], **kw)
  np.testing.assert_array_equal(wide.tokens_bs, rows.tokens_bs)


def test_sampling_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  key = jax.random.PRNGKey(0)
  assert int(decode.sample_tokens(logits, key, decode.Sampling())[0]) == 0  # Greedy.
  top2 = decode.filter_logits(logits, decode.Sampling(1.0, top_k=2))
  assert np.isfinite(np.asarray(top2)).sum() == 2
  # Nucleus 0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it: two kept.
  nucleus = decode.filter_logits(logits, decode.Sampling(1.0, top_p=0.7))
  np.testing.assert_array_equal(np.isfinite(np.asarray(nucleus[0])), [1, 1, 0, 0])
  tiny_p = decode.filter_logits(logits, decode.Sampling(1.0, top_p=1e-6))
  np.testing.assert_array_equal(np.isfinite(np.asarray(tiny_p[0])), [1, 0, 0, 0])
  # Temperature 2 on the filtered set: frequencies follow softmax(logits / 2) renormalised.
  keys = jax.random.split(key, 20000)
  draws = jax.vmap(lambda k: decode.sample_tokens(logits, k, decode.Sampling(2.0, top_k=3)))(keys)
  freq = np.bincount(np.asarray(draws)[:, 0], minlength=4) / 20000
  want = np.sqrt([0.5, 0.3, 0.15, 0.0])
  np.testing.assert_allclose(freq, want / want.sum(), atol=0.015)
  with pytest.raises(ValueError, match='top_p'):
    decode.Sampling(1.0, top_p=0.0)


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return tokenizer_lib.train(corpus.documents(seed=0, num_docs=300), 400, 'unigram',
                             tmp_path_factory.mktemp('tok') / 'tok')


@pytest.fixture(scope='module')
def generator(tok):
  cfg = tiny_cfg(vocab_size=400)
  params = state_lib.init_params(cfg, jax.random.PRNGKey(0))
  return gen_lib.Generator(cfg, params, tok, mesh(data=2, fsdp=4), max_batch=4, min_bucket=8,
                           stop_check_every=4)


def test_generator_batches_buckets_and_stop_strings(generator):
  prompts = ['What is 3 + 4?', 'The capital of Peru is', 'Count from 2 to 5.']
  batch = generator.generate(prompts, max_new_tokens=10)
  start = generator._compiled(decode.Sampling())  # The jitted decoding loop.
  compiled = start._cache_size()
  # Alone (other batch and prompt sizes, same buckets): the same greedy completions.
  for p, c in zip(prompts, batch):
    [alone] = generator.generate([p], max_new_tokens=10)
    assert alone.token_ids == c.token_ids and alone.text == c.text
    np.testing.assert_allclose(alone.logprobs, c.logprobs, atol=1e-5)
    assert c.finish_reason in ('eos', 'length') and len(c.token_ids) <= 10
  assert start._cache_size() == compiled  # No recompilation for other lengths in the buckets.
  # A stop string taken from the middle of the first completion cuts it there.
  text = batch[0].text
  stop = text[len(text) // 2:len(text) // 2 + 2]
  assert stop.strip(), f'completion too short to test stop strings: {text!r}'
  [cut] = generator.generate(prompts[:1], max_new_tokens=10, stop=[stop])
  assert cut.finish_reason == 'stop' and cut.text == text[:text.find(stop)]
  assert cut.token_ids == batch[0].token_ids[:len(cut.token_ids)]
  # The ids end with the token that completes the stop string (later ones are dropped).
  tok = generator.tokenizer
  assert stop in tok.decode(cut.token_ids) and stop not in tok.decode(cut.token_ids[:-1])
  assert len(cut.logprobs) == len(cut.token_ids)
  # Chat prompts end with the assistant marker.
  [ids] = generator.prompt_ids(['hi'], chat=True)
  assert ids[-1] == generator.tokenizer.special_id('<|assistant|>')


def test_stop_strings_with_more_prompts_than_slots(generator):
  prompts = [f'Item {i}: the {w} is' for i, w in enumerate('red blue green cat dog sun'.split())] * 2
  assert len(prompts) > generator.slots
  free = generator.generate(prompts, max_new_tokens=12)
  text = free[0].text
  stop = text[len(text) // 2]
  cut = generator.generate(prompts, max_new_tokens=12, stop=[stop])
  assert cut[0].finish_reason == 'stop'
  for f, c in zip(free, cut):
    if stop in f.text:  # Cut before the stop string, ids up to the token that completes it.
      assert c.finish_reason == 'stop' and c.text == f.text[:f.text.find(stop)]
      assert c.token_ids == f.token_ids[:len(c.token_ids)] and len(c.logprobs) == len(c.token_ids)
    else:
      assert (c.token_ids, c.finish_reason) == (f.token_ids, f.finish_reason)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory, tok):
  """A workdir with a random tiny model's checkpoint and config.json."""
  from train import checkpoint as ckpt_lib
  from train.config import defaults
  workdir = tmp_path_factory.mktemp('run')
  config = defaults()
  config.model.update(vocab_size=400, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      mlp_dim=64)
  config.mesh.update(fsdp=-1)
  config.data.update(tokenizer=str(tok.path), seq_len=64, embedded_docs=200, embedded_eval_docs=40)
  config.train.update(eval_batches=2)
  cfg = tiny_cfg(vocab_size=400)
  params = state_lib.init_params(cfg, jax.random.PRNGKey(0))
  saver = ckpt_lib.Checkpointer(str(workdir / 'checkpoints'))
  saver.save(7, {'step': jnp.int32(7), 'params': params}, {}, force=True)
  saver.close()
  workdir_lib.write_config(config, str(workdir))
  return workdir, cfg, params


def test_generate_cli_on_a_checkpoint(tiny_run, tok, capsys):
  workdir, cfg, params = tiny_run
  rc = gen_lib.main(['--checkpoint', str(workdir), '--prompt', 'What is 3 + 4?', '--prompt',
                     'Hello', '--max_new_tokens', '6', '--json'])
  assert rc == 0
  lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  assert [x['prompt'] for x in lines] == ['What is 3 + 4?', 'Hello']
  assert all(1 <= len(x['token_ids']) <= 6 and len(x['logprobs']) == len(x['token_ids'])
             for x in lines)
  # The same model in Python gives the same completion.
  g = gen_lib.Generator(cfg, params, tok, mesh(fsdp=8))
  assert g.generate(['Hello'], max_new_tokens=6)[0].token_ids == lines[1]['token_ids']
  assert gen_lib.main(['--checkpoint', str(workdir / 'nope'), '--prompt', 'x']) == 2


def test_rows_of_rollouts_of_two_prompt_buckets_concatenate(generator):
  short = generator.generate_ids([[5, 17, 33], [44, 9]], max_new_tokens=6, seed=1,
                                 sampling=decode.Sampling(1.0))
  long = generator.generate_ids([list(range(3, 15))], max_new_tokens=6)
  assert (short.prompt_len, long.prompt_len) == (8, 16)
  both = gen_lib.concat([short.rows([1]), long.rows([0])], generator.tokenizer.pad_id)
  assert both.prompt_len == 16 and both.finish_b == [short.finish_b[1], long.finish_b[0]]
  assert both.completion_ids(0) == short.completion_ids(1)
  assert both.completion_ids(1) == long.completion_ids(0)
  # The extra padding is invisible: each row's response log-probs under a forward pass of the
  # concatenated layout equal those of its own rollout's layout.
  def response_logprobs(rollout, i):
    lay = rollout.layout()
    logits, _ = generator.mdef.build(generator.params)(
        *(jnp.asarray(lay[k][i:i + 1]) for k in ('tokens', 'positions', 'segment_ids')))
    logp = np.asarray(jax.nn.log_softmax(logits[0, :-1]))
    cols = np.nonzero(lay['response_mask'][i, 1:])[0]
    return logp[cols, rollout.tokens_bs[i, cols + 1]]
  np.testing.assert_allclose(response_logprobs(both, 0), response_logprobs(short, 1), atol=1e-5)
  np.testing.assert_allclose(response_logprobs(both, 1), response_logprobs(long, 0), atol=1e-5)


def test_model_lm_loglikelihood_matches_a_forward_pass(generator):
  from train.eval.model_lm import MeshLM
  lm = MeshLM(generator, max_length=32, batch_size=4)
  requests = [('The capital of Peru is', ' Lima'), ('What is 3 + 4?', ' 7'),
              ('Counting by 2 from 4: 4, 6,', ' 8, 10'), ('x ' * 40, 'y')]  # The last is cut.
  batch = lm.loglikelihood(requests)
  alone = [lm.loglikelihood([r])[0] for r in requests]
  np.testing.assert_allclose(batch, alone, atol=1e-4)
  tok = generator.tokenizer
  for (ctx, cont), got in zip(requests[:3], batch):
    ids = [tok.bos_id] + tok.encode(ctx + cont)
    n = len(ids) - 1 - len(tok.encode(ctx))
    logits = generator.mdef.build(generator.params)(jnp.asarray([ids]))[0]
    logp = np.asarray(jax.nn.log_softmax(logits[0, :-1]))
    want = sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1 - n, len(ids) - 1))
    np.testing.assert_allclose(got, want, atol=1e-4)
  [[a, b]] = lm.generate(['Count from 2 to 5.'], max_new_tokens=4, stop=['\n\n'],
                         temperature=1.0, num_samples=2)
  assert isinstance(a, str) and isinstance(b, str)


def test_eval_cli_limit_2_on_a_tiny_checkpoint(tiny_run, shared_data, tmp_path, capsys):
  from train.eval import __main__ as eval_main
  workdir, _, _ = tiny_run
  out = tmp_path / 'results.json'
  rc = eval_main.main(['--checkpoint', str(workdir), '--tasks', 'mmlu,gsm8k,humaneval,loss',
                       '--limit', '2', '--mmlu_subjects', 'abstract_algebra,anatomy',
                       '--max_new_tokens', '8', '--data_dir', str(shared_data), '--out', str(out)])
  assert rc == 0
  printed = capsys.readouterr().out
  assert 'mmlu' in printed and 'gsm8k' in printed and 'humaneval' in printed and 'loss:' in printed
  results = {r['task']: r for r in json.loads(out.read_text())['results']}
  assert results['mmlu']['count'] == 4 and set(results['mmlu']['per_subject']) == {
      'abstract_algebra', 'anatomy'}
  assert results['gsm8k']['count'] == 2 and results['humaneval']['num_problems'] == 2
  assert 0 <= results['mmlu']['metrics']['accuracy'] <= 1
  # A random model over a 400-token vocabulary: loss near log(400) = 6.0.
  assert 5.0 < results['loss']['metrics']['loss'] < 7.5 and results['loss']['count'] > 0
