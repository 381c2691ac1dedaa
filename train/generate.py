"""Text generation from a meshlm checkpoint: a Python API for notebooks and a CLI.

    python -m train.generate --checkpoint DIR --prompt "What is 2 + 3?" [--chat]
        [--config experiments/X.py] [--max_new_tokens 64] [--temperature 0.8 --top_k 50
        --top_p 0.95] [--stop '\\n'] [--seed 0]

    gen = Generator.from_checkpoint('/tmp/run')      # or Generator(cfg, params, tokenizer, mesh)
    [c] = gen.generate(['What is 2 + 3?'], chat=True, max_new_tokens=16)
    c.text, c.token_ids, c.logprobs, c.finish_reason

DIR is a workdir, its `checkpoints/` folder or one `checkpoints/<step>` (train/workdir.py).
Decoding (model/decode.py) is jitted once per (batch, prompt, total length) bucket and sampling
setting: prompts are left-padded to a power of two (at least `min_bucket`), new tokens get a
power-of-two bucket too, and the batch is filled up to a power of two that the batch shards
divide. Rows stop at EOS (with `chat` also at `<|end|>`); stop strings are checked on the host
every `stop_check_every` tokens, and a stopped row keeps its tokens up to the one that completes
the stop string (the text is cut before it).
"""

import argparse
import dataclasses
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from data.chat import ChatTemplate
from model import decode
from model.config import ConfigError, ModelConfig
from model.sharding import logical_to_spec, make_rules, use_rules
from train import compilation_cache
from train import state as state_lib
from train import workdir as workdir_lib
from train.context import Placement
from train.mesh import batch_shards, make_mesh


@dataclasses.dataclass
class Completion:
  text: str  # Decoded completion, cut before the first stop string; no EOS / end marker.
  token_ids: list[int]  # Generated ids, the stop token (EOS / <|end|>) included if reached;
  # with a stop string, up to the token that completes it.
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


def bucket(n: int, minimum: int) -> int:
  """The smallest power of two >= max(n, minimum)."""
  n = max(int(n), int(minimum), 1)
  return 1 << (n - 1).bit_length()


class Generator:
  """Jitted, mesh-sharded generation for one model; `params` may be replaced per call (RLHF)."""

  def __init__(self, cfg: ModelConfig, params, tokenizer, mesh=None, rules=None, *,
               max_batch: int = 32, min_bucket: int = 16, stop_check_every: int = 16):
    self.cfg, self.tokenizer = cfg, tokenizer
    self.mesh = mesh if mesh is not None else make_mesh({'fsdp': -1})
    self.rules = make_rules() if rules is None else rules
    self.placement = Placement(self.mesh, self.rules)
    # The decoding config only differs for MoE (no dropped tokens); the params are the same.
    self.mdef, abstract = state_lib.model_def(decode.decoding_config(cfg))
    shardings = self.placement.param_shardings(self.mdef, abstract)
    self.params = None if params is None else jax.device_put(params, shardings)
    self.max_batch, self.min_bucket, self.stop_check_every = max_batch, min_bucket, stop_check_every
    self.batch_shards = batch_shards(self.mesh, self.rules)
    self._fns = {}

  @classmethod
  def from_checkpoint(cls, checkpoint: str, config=None, *, mesh=None, **kw) -> 'Generator':
    """`config`: a ConfigDict, a path to an experiment file, or None (workdir/config.json)."""
    run = workdir_lib.load_run(checkpoint, config, mesh=mesh)
    return cls(run.cfg, run.params, run.tokenizer, run.mesh, run.rules, **kw)

  # Jitted pieces, one pair per sampling setting (shapes are handled by jit's own cache).
  def _compiled(self, sampling: decode.Sampling):
    if sampling not in self._fns:
      mdef, pad = self.mdef, self.tokenizer.pad_id

      def start(params, tokens_bp, lengths_b, done_b, eos_e, rng, total_len):
        return decode.start(mdef.build(params), tokens_bp, lengths_b, total_len=total_len, rng=rng,
                            sampling=sampling, eos_ids_e=eos_e, done_b=done_b, pad_id=pad)

      def advance(params, state, limit, eos_e):
        return decode.advance(mdef.build(params), state, limit, sampling=sampling, eos_ids_e=eos_e,
                              pad_id=pad)

      self._fns[sampling] = (jax.jit(start, static_argnames='total_len'),
                             jax.jit(advance, donate_argnums=1))
    return self._fns[sampling]

  def prompt_ids(self, prompts: list, chat: bool) -> list[list[int]]:
    if chat:
      template = ChatTemplate(self.tokenizer)
      return [list(template.encode([{'role': 'user', 'content': p}], generation_prompt=True)[0])
              for p in prompts]
    return [[self.tokenizer.bos_id] + self.tokenizer.encode(p) for p in prompts]

  def stop_ids(self, chat: bool) -> list[int]:
    return [self.tokenizer.eos_id] + ([self.tokenizer.special_id('<|end|>')] if chat else [])

  def generate(self, prompts: list[str], *, max_new_tokens: int = 128,
               sampling: decode.Sampling = decode.Sampling(), stop: list[str] | tuple = (),
               chat: bool = False, seed: int = 0, params=None) -> list[Completion]:
    """Completions of text prompts (with `chat`, each is a user turn in the chat template)."""
    return self.complete(self.prompt_ids(prompts, chat), max_new_tokens=max_new_tokens,
                         sampling=sampling, stop=stop, stop_ids=self.stop_ids(chat), seed=seed,
                         params=params)

  def complete(self, ids: list[list[int]], *, max_new_tokens: int,
               sampling: decode.Sampling = decode.Sampling(), stop: list[str] | tuple = (),
               stop_ids: list[int] | None = None, seed: int = 0, params=None,
               progress=None) -> list[Completion]:
    """Completions of token prompts, `max_batch` at a time (`progress`: a tqdm bar, or None)."""
    out = []
    for i in range(0, len(ids), self.max_batch):
      rollout = self.generate_ids(ids[i:i + self.max_batch], max_new_tokens=max_new_tokens,
                                  sampling=sampling, stop=stop, stop_ids=stop_ids, seed=seed + i,
                                  params=params)
      for j in range(rollout.tokens_bs.shape[0]):
        token_ids = rollout.completion_ids(j)
        p = rollout.prompt_len
        out.append(Completion(
            text=self._text(token_ids, stop), token_ids=token_ids,
            logprobs=[float(x) for x in rollout.logprobs_bs[j, p:p + len(token_ids)]],
            finish_reason=rollout.finish_b[j], prompt_tokens=int(rollout.lengths_b[j])))
      if progress is not None:
        progress.update(rollout.tokens_bs.shape[0])
    return out

  def _text(self, token_ids: list[int], stop) -> str:
    """The decoded ids, cut before the first stop string."""
    text = self.tokenizer.decode(token_ids)
    return text[:min([text.find(s) for s in stop if s and s in text], default=len(text))]

  def generate_ids(self, prompts: list[list[int]], *, max_new_tokens: int,
                   sampling: decode.Sampling = decode.Sampling(), stop: list[str] | tuple = (),
                   stop_ids: list[int] | None = None, seed: int = 0, params=None) -> Rollout:
    """One batch of token prompts -> Rollout (rows in the order given, filler rows dropped)."""
    if not prompts:
      raise ValueError('train/generate.py: no prompts')
    if max_new_tokens < 1:
      raise ValueError(f'train/generate.py: max_new_tokens must be >= 1, got {max_new_tokens}')
    params = self.params if params is None else params
    if params is None:
      raise ValueError('train/generate.py: this Generator has no params; pass params=')
    n = len(prompts)
    b = self._batch_bucket(n)
    p = bucket(max(len(x) for x in prompts), self.min_bucket)
    total = p + bucket(max_new_tokens, self.min_bucket)
    prompts = list(prompts) + [prompts[0]] * (b - n)  # Filler rows, done from the start.
    tokens_bp, lengths_b = decode.left_pad(prompts, p, self.tokenizer.pad_id)
    done_b = np.arange(b) >= n
    eos_e = np.asarray(stop_ids if stop_ids is not None else [self.tokenizer.eos_id], np.int32)
    start, advance = self._compiled(sampling)
    data = NamedSharding(self.mesh, logical_to_spec(('batch', None), (b, p), self.mesh, self.rules))
    with jax.set_mesh(self.mesh), use_rules(self.rules):
      tokens_bp, lengths_b, done_b = jax.device_put(
          (tokens_bp, lengths_b, done_b), (data, self.placement.replicated, self.placement.replicated))
      state = start(params, tokens_bp, lengths_b, done_b, eos_e, jax.random.PRNGKey(seed),
                    total_len=total)
      stopped = np.zeros(b, bool)
      while True:
        step = int(state['step'])
        limit = min(step + self.stop_check_every, max_new_tokens) if stop else max_new_tokens
        state = advance(params, state, jnp.int32(limit), eos_e)
        done, step = np.array(state['done_b']), int(state['step'])
        if stop:
          newly = self._stop_strings(state, done, stop, p)
          if newly.any():
            stopped |= newly
            done |= newly
            state['done_b'] = jax.device_put(done, state['done_b'].sharding)
        if done.all() or step >= max_new_tokens:
          break
    tokens_bs = np.array(state['tokens_bs'])[:n]
    num_new_b = np.array(state['num_new_b'])[:n]
    logprobs_bs = np.array(state['logprobs_bs'])[:n]
    for i in np.nonzero(stopped[:n])[0]:  # Drop what was generated past the stop string.
      num_new_b[i] = self._stop_length(tokens_bs[i, p:p + num_new_b[i]], stop)
      tokens_bs[i, p + num_new_b[i]:] = self.tokenizer.pad_id
      logprobs_bs[i, p + num_new_b[i]:] = 0.0
    eos_seen = np.isin(tokens_bs[np.arange(n), p + np.maximum(num_new_b, 1) - 1], eos_e)
    finish = ['stop' if stopped[i] else 'eos' if eos_seen[i] else 'length' for i in range(n)]
    return Rollout(tokens_bs, logprobs_bs, np.asarray(lengths_b)[:n], num_new_b, p, finish)

  def _has_stop(self, ids, stop) -> bool:
    text = self.tokenizer.decode(ids)
    return any(s and s in text for s in stop)

  def _stop_length(self, ids, stop) -> int:
    """How many of `ids` it takes for the text to contain a stop string."""
    return next((k for k in range(1, len(ids) + 1) if self._has_stop(ids[:k], stop)), len(ids))

  def _stop_strings(self, state, done, stop, p) -> np.ndarray:
    """Rows not done whose new tokens contain a stop string."""
    tokens_bs, num_new_b = np.asarray(state['tokens_bs']), np.asarray(state['num_new_b'])
    return np.array([not done[i] and self._has_stop(tokens_bs[i, p:p + num_new_b[i]], stop)
                     for i in range(len(done))], bool)

  def _batch_bucket(self, n: int) -> int:
    b = bucket(n, 1)
    return b * self.batch_shards // math.gcd(b, self.batch_shards)


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
