"""Text generation from a meshlm checkpoint: a Python API for notebooks and a CLI.

    python -m train.generate --checkpoint DIR --prompt "What is 2 + 3?" [--chat]
        [--config experiments/X.py] [--max_new_tokens 64] [--temperature 0.8 --top_k 50
        --top_p 0.95] [--stop '\\n'] [--seed 0]

    gen = Generator.from_checkpoint('/tmp/run')      # or Generator(cfg, params, tokenizer, mesh)
    [c] = gen.generate(['What is 2 + 3?'], chat=True, max_new_tokens=16)
    c.text, c.token_ids, c.logprobs, c.finish_reason

DIR: any checkpoint path of train/workdir.py. Continuous batching (model/decode.py) over max_batch
slots (rounded up to a multiple of the batch shards), admitting `admit_rows` prompts at a time;
prompt and new lengths are bucketed to powers of two (>= `min_bucket`), one compilation per bucket.
Sequences stop at EOS (`chat`: also `<|end|>`), `max_new_tokens`, or a stop string (checked on the
host every `stop_check_every` tokens; tokens kept up to the one completing it, text cut before it).
"""

import argparse
import dataclasses
import functools
import json
import math
import sys

import jax
import numpy as np

from data.chat import ChatTemplate
from model import decode
from model.config import ConfigError, ModelConfig
from model.sharding import make_rules, use_rules
from train import compilation_cache
from train import state as state_lib
from train import workdir as workdir_lib
from train.context import Placement
from train.mesh import batch_shards, make_mesh


@dataclasses.dataclass
class Completion:
  text: str  # Decoded completion, cut before the first stop string; no EOS / end marker.
  token_ids: list[int]  # Generated ids, up to the stop token (EOS, <|end|>) or stop string.
  logprobs: list[float]  # log p(token | prefix) of each generated id under the model.
  finish_reason: str  # 'eos', 'stop' (a stop string) or 'length'.
  prompt_tokens: int


@dataclasses.dataclass
class Rollout:
  """Token-level result of a batch (numpy): the buffer of model/decode.py and its layout."""
  tokens_bs: np.ndarray
  logprobs_bs: np.ndarray
  lengths_b: np.ndarray
  num_new_b: np.ndarray
  prompt_len: int
  finish_b: list[str]

  def layout(self) -> dict:
    return decode.sequence_layout(self.tokens_bs, self.lengths_b, self.num_new_b, self.prompt_len)

  def completion_ids(self, i: int) -> list[int]:
    p = self.prompt_len
    return [int(x) for x in self.tokens_bs[i, p:p + self.num_new_b[i]]]

  def rows(self, rows_k) -> 'Rollout':
    """Rows `rows_k` (indices) as a Rollout."""
    return Rollout(self.tokens_bs[rows_k], self.logprobs_bs[rows_k], self.lengths_b[rows_k],
                   self.num_new_b[rows_k], self.prompt_len, [self.finish_b[i] for i in rows_k])


def concat(rollouts: list[Rollout], pad_id: int) -> Rollout:
  """The rows of `rollouts` (same new-token bucket) in one, prompts left-padded with `pad_id`
  to the widest prompt bucket."""
  p = max(r.prompt_len for r in rollouts)
  widen = lambda x, r, fill: np.pad(x, ((0, 0), (p - r.prompt_len, 0)), constant_values=fill)
  return Rollout(np.concatenate([widen(r.tokens_bs, r, pad_id) for r in rollouts]),
                 np.concatenate([widen(r.logprobs_bs, r, 0.0) for r in rollouts]),
                 np.concatenate([r.lengths_b for r in rollouts]),
                 np.concatenate([r.num_new_b for r in rollouts]), p,
                 [f for r in rollouts for f in r.finish_b])


def bucket(n: int, minimum: int) -> int:
  """The smallest power of two >= max(n, minimum)."""
  n = max(int(n), int(minimum), 1)
  return 1 << (n - 1).bit_length()


class Generator:
  """Jitted, mesh-sharded generation for one model; `params` may be replaced per call (RLHF)."""

  def __init__(self, cfg: ModelConfig, params, tokenizer, mesh=None, rules=None, *,
               max_batch: int = 32, min_bucket: int = 16, stop_check_every: int = 16,
               admit_rows: int | None = None):
    self.cfg, self.tokenizer = cfg, tokenizer
    self.mesh = mesh if mesh is not None else make_mesh({'fsdp': -1})
    self.rules = make_rules() if rules is None else rules
    self.placement = Placement(self.mesh, self.rules)
    dec_cfg = decode.decoding_config(cfg)
    self.mdef, abstract = state_lib.model_def(dec_cfg)
    shardings = self.placement.param_shardings(self.mdef, abstract)
    self.params = None if params is None else jax.device_put(params, shardings)
    self.max_batch, self.min_bucket, self.stop_check_every = max_batch, min_bucket, stop_check_every
    self.batch_shards = batch_shards(self.mesh, self.rules)
    self.slots = self._batch_bucket(max_batch)
    self.admit_rows = admit_rows or max(1, self.slots // 8)
    self._start = jax.jit(lambda b, n, g, tokens_mp, lengths_m: decode.start(
        dec_cfg, b, tokens_mp, lengths_m, n, g), static_argnums=(0, 1, 2))
    self._fns = {}

  @classmethod
  def of(cls, run: workdir_lib.Run, **kw) -> 'Generator':
    """The Generator of a loaded run (train/workdir.py load_run); `kw`: of __init__."""
    return cls(run.cfg, run.params, run.tokenizer, run.mesh, run.rules, **kw)

  @classmethod
  def from_checkpoint(cls, checkpoint: str, config=None, *, mesh=None, **kw) -> 'Generator':
    """`config`: a ConfigDict, a path to an experiment file, or None (workdir/config.json)."""
    return cls.of(workdir_lib.load_run(checkpoint, config, mesh=mesh), **kw)

  def _compiled(self, sampling: decode.Sampling):
    """The jitted decoding loop of one sampling setting (jit's own cache handles shapes)."""
    if sampling not in self._fns:
      run = functools.partial(decode.run, rows=self.admit_rows, sampling=sampling)
      self._fns[sampling] = jax.jit(
          lambda params, state, steps, num, max_new, eos_e, rng, static: run(
              self.mdef.build(params), state, steps, num, max_new, static=static, rng=rng,
              eos_ids_e=eos_e), donate_argnums=1, static_argnames='static')
    return self._fns[sampling]

  def prompt_ids(self, prompts: list, chat: bool) -> list[list[int]]:
    if chat:
      template = ChatTemplate(self.tokenizer)
      return [list(template.encode([{'role': 'user', 'content': p}], generation_prompt=True)[0])
              for p in prompts]
    return [[self.tokenizer.bos_id] + self.tokenizer.encode(p) for p in prompts]

  def stop_ids(self, chat: bool) -> list[int]:
    return [self.tokenizer.eos_id] + ([self.tokenizer.special_id('<|end|>')] if chat else [])

  def generate(self, prompts: list[str], *, max_new_tokens: int = 128, chat: bool = False,
               **kw) -> list[Completion]:
    """Completions of text prompts (`chat`: as user turns); `kw`: `generate_ids`'s keywords."""
    return self.complete(self.prompt_ids(prompts, chat), max_new_tokens=max_new_tokens,
                         stop_ids=self.stop_ids(chat), **kw)

  def complete(self, ids: list[list[int]], *, stop: list[str] | tuple = (), progress=None,
               **kw) -> list[Completion]:
    """Completions of token prompts (`progress`: a tqdm bar, or None; `kw`: of `generate_ids`)."""
    rollout = self.generate_ids(ids, stop=stop, **kw)
    out, p = [], rollout.prompt_len
    for j in range(len(rollout.finish_b)):
      token_ids = rollout.completion_ids(j)
      text = self.tokenizer.decode(token_ids)  # Kept up to its first stop string.
      out.append(Completion(
          text=text[:min([text.find(s) for s in stop if s and s in text], default=len(text))],
          token_ids=token_ids,
          logprobs=[float(x) for x in rollout.logprobs_bs[j, p:p + len(token_ids)]],
          finish_reason=rollout.finish_b[j], prompt_tokens=int(rollout.lengths_b[j])))
    if progress is not None:
      progress.update(len(out))
    return out

  def generate_ids(self, prompts: list[list[int]], *, max_new_tokens: int,
                   sampling: decode.Sampling = decode.Sampling(), stop: list[str] | tuple = (),
                   stop_ids: list[int] | None = None, seed: int = 0, params=None,
                   static: bool = False, samples: int = 1) -> Rollout:
    """Token prompts -> Rollout: `samples` rows per prompt (each prefilled once, sampled with
    the keys of as many repeated prompts), prompts in the order given. With `static`, prompts are
    admitted only when every slot is free: static batching by the same engine, for comparison."""
    if not prompts:
      raise ValueError('train/generate.py: no prompts')
    if max_new_tokens < 1:
      raise ValueError(f'train/generate.py: max_new_tokens must be >= 1, got {max_new_tokens}')
    params = self.params if params is None else params
    if params is None:
      raise ValueError('train/generate.py: this Generator has no params; pass params=')
    if samples > self.slots:  # A group is admitted whole: more samples than slots are rows.
      prompts, samples = [x for x in prompts for _ in range(samples)], 1
    m, slots, pad = len(prompts), self.slots, self.tokenizer.pad_id
    n = m * samples
    p, new = (bucket(x, self.min_bucket) for x in (max(map(len, prompts)), max_new_tokens))
    m_pad = bucket(m, max(1, slots // samples))  # Prompt rows past m are never admitted.
    tokens_mp, lengths_m = decode.left_pad(list(prompts) + [prompts[0]] * (m_pad - m), p, pad)
    eos_e = np.asarray(stop_ids if stop_ids is not None else [self.tokenizer.eos_id], np.int32)
    run = self._compiled(sampling)
    steps = self.stop_check_every if stop else 1 << 30
    with jax.set_mesh(self.mesh), use_rules(self.rules):
      state = self._start(slots, new, samples, tokens_mp, lengths_m)
      while True:
        state = run(params, state, np.int32(steps), np.int32(n), np.int32(max_new_tokens), eos_e,
                    jax.random.PRNGKey(seed), static=static)
        host = jax.device_get({k: state[k] for k in ('tokens_nn', 'num_new_b', 'seq_b', 'done_b',
                                                     'queued')})
        live_b = ~host['done_b']
        hit_b = live_b & [bool(stop) and self._has_stop(
            host['tokens_nn'][i, :host['num_new_b'][b]], stop) for b, i in enumerate(host['seq_b'])]
        if host['queued'] == n and not (live_b & ~hit_b).any():
          break
        if hit_b.any():  # A stop string: done now, the tokens past it are dropped below.
          state['done_b'] = jax.device_put(host['done_b'] | hit_b, state['done_b'].sharding)
    tokens_nn, logprobs_nn, num_new_n = (np.array(state[k])[:n]
                                         for k in ('tokens_nn', 'logprobs_nn', 'num_new_n'))
    stopped = np.array([bool(stop) and self._has_stop(t[:k], stop)
                        for t, k in zip(tokens_nn, num_new_n)], bool)
    for i in np.nonzero(stopped)[0]:  # Keep the tokens up to the one completing a stop string.
      ids = tokens_nn[i, :num_new_n[i]]
      num_new_n[i] = next(k for k in range(1, len(ids) + 1) if self._has_stop(ids[:k], stop))
      tokens_nn[i, num_new_n[i]:], logprobs_nn[i, num_new_n[i]:] = pad, 0.0
    eos_seen = np.isin(tokens_nn[np.arange(n), np.maximum(num_new_n, 1) - 1], eos_e)
    finish = ['stop' if stopped[i] else 'eos' if eos_seen[i] else 'length' for i in range(n)]
    tokens_nn[np.arange(new)[None] >= num_new_n[:, None]] = pad
    return Rollout(np.concatenate([np.repeat(tokens_mp[:m], samples, 0), tokens_nn], 1),
                   np.concatenate([np.zeros((n, p), np.float32), logprobs_nn], 1),
                   np.repeat(lengths_m[:m], samples), num_new_n, p, finish)

  def _batch_bucket(self, n: int) -> int:
    return math.lcm(bucket(n, 1), self.batch_shards)

  def _has_stop(self, ids, stop) -> bool:
    text = self.tokenizer.decode(ids)
    return any(s and s in text for s in stop)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m train.generate', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True)
  parser.add_argument('--prompt', action='append', required=True, help='repeat for a batch')
  parser.add_argument('--config', default='', help='experiment file (default: workdir/config.json)')
  parser.add_argument('--chat', action='store_true', help='wrap each prompt as a user turn')
  parser.add_argument('--max_new_tokens', type=int, default=64)
  parser.add_argument('--temperature', type=float, default=0.0)
  parser.add_argument('--top_k', type=int, default=0)
  parser.add_argument('--top_p', type=float, default=1.0)
  parser.add_argument('--stop', action='append', default=[])
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', action='store_true', help='one JSON object per completion')
  args = parser.parse_args(argv)
  compilation_cache.enable()
  try:
    sampling = decode.Sampling(args.temperature, args.top_k, args.top_p)
    gen = Generator.from_checkpoint(args.checkpoint, args.config or None)
    stop = [s.encode().decode('unicode_escape') for s in args.stop]
    out = gen.generate(args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling,
                       stop=stop, chat=args.chat, seed=args.seed)
  except (ConfigError, FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for prompt, c in zip(args.prompt, out):
    if args.json:
      print(json.dumps({'prompt': prompt, **dataclasses.asdict(c)}))
    else:
      print(f'{prompt}{c.text}\n  [{c.finish_reason}, {len(c.token_ids)} tokens, '
            f'logprob {sum(c.logprobs):.3f}]')
  return 0


if __name__ == '__main__':
  sys.exit(main())
