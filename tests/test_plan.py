"""The planner: analytic memory against XLA's compiled plan, hand-computed 65B numbers,
throughput arithmetic, errors before anything runs, and the CLI's JSON and exit status.

The compiled comparisons go through the planner's own CPU variant (train/aot.py
compile_variant: float32 compute, `xla` attention for the GPU kernels, reduced depth) of tiny
configs shaped like the published ones (bfloat16, cuDNN attention, scanned layers, remat).
"""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from experiments import dense_65b, dense_65b_grpo, dense_65b_rlhf, mixtral_8x7b
from model import count_params
from model.config import ConfigError
from tests.util import run_config
from train import aot, memory, plan
from train.config import model_config
from train.context import Placement

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tiny(**sections):
  """A run config shaped like the published ones, small enough to compile in seconds."""
  c = run_config()
  c.model.update(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 mlp_dim=192, attention='cudnn', compute_dtype='bfloat16', scan_layers=True,
                 remat='full')
  c.data.seq_len = 256
  c.mesh.update(fsdp=8)
  c.train.update(global_batch=32, grad_accum=1)
  for section, values in sections.items():
    c[section].update(values)
  return c


def _check_against_compiled(c):
  c = aot.compile_variant(c, c.model.num_layers)
  assert (c.model.attention, c.model.compute_dtype) == ('xla', 'float32')
  est = memory.estimate(c, {'fsdp': c.mesh.fsdp, 'tensor': c.mesh.tensor})
  got = aot.compiled_memory(c)
  # Arguments are exact: sharded params + AdamW moments + the batch shard (+ step, count, RNG).
  assert 0 <= got.argument_bytes - (est.params + est.optimizer + est.batch) < 64
  rel = abs(est.total - got.total_bytes) / got.total_bytes
  print(f'analytic {est.total / 2**20:.2f} MiB, compiled {got.total_bytes / 2**20:.2f} MiB, '
        f'off by {rel:.1%} (tolerance {memory.TOLERANCE:.0%}); {got.compile_seconds:.0f} s compile')
  assert rel < memory.TOLERANCE


def test_analytic_memory_matches_compiled_plan():
  _check_against_compiled(_tiny())


@pytest.mark.slow
@pytest.mark.parametrize('name, sections', [
    ('no remat', dict(model=dict(remat='none'))),
    ('attn_proj, short', dict(model=dict(remat='attn_proj'), data=dict(seq_len=64),
                              train=dict(global_batch=16))),
    ('fsdp4 x tensor2, accumulation', dict(mesh=dict(fsdp=4, tensor=2), data=dict(seq_len=64),
                                           train=dict(global_batch=32, grad_accum=2))),
    ('moe capacity', dict(model=dict(num_experts=4, experts_per_token=2, dispatch='capacity'),
                          data=dict(seq_len=64), train=dict(global_batch=16))),
])
def test_analytic_memory_matches_compiled_plan_more(name, sections):
  _check_against_compiled(_tiny(**sections))


@pytest.mark.parametrize('remat', ['full', 'attn_proj', 'dots_no_batch', 'dots'])
def test_saved_activations_per_layer_are_what_jax_saves(remat):
  """memory.RESIDUALS against JAX's own list of what a remat'ed Block keeps for backward."""
  from flax import nnx
  from jax._src.ad_checkpoint import saved_residuals

  from model.transformer import REMAT_POLICIES, Block
  from tests.util import tiny_cfg
  b, t = 2, 16
  cfg = tiny_cfg(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48,
                 attention='xla', remat=remat)
  graphdef, params = nnx.split(Block(cfg, nnx.Rngs(0)))

  def block(params, x_btd):
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    return jnp.sum(nnx.merge(graphdef, params)(x_btd, positions, jnp.ones((b, t), jnp.int32))[0])

  residuals = saved_residuals(jax.checkpoint(block, policy=REMAT_POLICIES[remat]), params,
                              jnp.ones((b, t, 32)))
  activations = [aval for aval, source in residuals if 'argument params' not in source]
  got = sum(aval.size * aval.dtype.itemsize for aval in activations)
  shapes = memory.Shapes(Placement.abstract(run_config(), {}))
  inter = memory._layer_intermediates(cfg, shapes, b, t)
  assert got == sum(inter[kind] * count for kind, count in memory.RESIDUALS[remat].items())


def test_dense_65b_memory_by_hand():
  c = dense_65b.get_config()
  est = memory.estimate(c, {'fsdp': 256})
  total = count_params(model_config(c)).total
  norms = (2 * 80 + 1) * 8192  # Replicated: 1-D, 'norm' maps to no mesh axis.
  assert est.params == (total - norms) * 4 / 256 + norms * 4
  assert est.optimizer == 2 * est.params and est.grads == 2 * est.params  # grad_accum=16 > 1.
  assert est.activations == 80 * 4 * 2048 * 8192 * 2  # remat=full: each layer's bf16 input.
  # train/head_loss.py: chunks of 4 rows x 256 positions (<= 1,024 tokens), vocabulary whole.
  logits = 4 * 256 * 128_000
  head = 8192 * 128_000  # Gathered over fsdp for the matmul: 255/256 of it comes from others.
  # f32 logits, softmax, gradient + bf16 logits of a chunk; gathered f32 extra + its f32
  # gradient + bf16 copy; the f32 dW accumulator's own share; dh in f32.
  want_head = (logits * (3 * 4 + 2) + head * 255 // 256 * (4 + 4) + head * 2
               + head // 256 * 4 + 4 * 2048 * 8192 * 4)
  # Chunked, the head phase (12.4 GB) is no longer the peak: one layer's working set is.
  assert est.transient_phase == 'layer' and want_head < est.transient


def test_dropless_dispatch_counts_local_rows():
  """model/moe.py's dropless path sorts each device's own assignments (shard_map), so Mixtral as
  published fits; its buffers are the local rows plus the experts gathered but for the width."""
  c = mixtral_8x7b.get_config()
  sizes = {'fsdp': 128, 'tensor': 4}
  dropless = memory.estimate(c, sizes)
  local_rows = 1 * 32_768 * 2  # One sequence per device, top-2.
  f_local = 14_336 // 4
  expert_buffers = local_rows * (2 * 4096 + 3 * f_local) * 2 + 3 * 8 * 4096 * f_local * 2
  assert dropless.transient >= expert_buffers
  assert dropless.total < 80 * memory.GIB
  plan.check_fits(plan.plan(c))  # Does not raise.


def test_throughput_and_implied_mfu():
  c = dense_65b.get_config()
  p = plan.plan(c, mfu=0.5, wall_clock_days=42)
  cluster = 256 * 312e12
  assert p['tokens_per_sec'] == pytest.approx(0.5 * cluster / p['flops_per_token'])
  assert p['days_to_train'] == pytest.approx(p['total_tokens'] / p['tokens_per_sec'] / 86400)
  # The MFU a wall clock implies, at the wall clock the stated MFU predicts, is that MFU.
  again = plan.plan(c, mfu=0.5, wall_clock_days=p['days_to_train'])
  assert again['mfu_implied_by_wall_clock'] == pytest.approx(0.5)
  assert p['mfu_implied_by_wall_clock'] == pytest.approx(0.5 * p['days_to_train'] / 42)
  assert p['fits'] is True and p['params_total'] == 66_858_524_672


def test_errors_name_the_config_key():
  c = dense_65b.get_config()
  c.train.global_batch = 16_384 + 16  # Micro-batch 1,025: not divisible by fsdp=256.
  with pytest.raises(ConfigError, match='train.global_batch'):
    plan.plan(c)
  c = dense_65b.get_config()
  c.optim.warmup_steps = c.train.steps + 1
  with pytest.raises(ConfigError, match='optim.warmup_steps'):
    plan.plan(c)
  c = dense_65b.get_config()
  c.hardware.device_memory_gb = 20.0
  p = plan.plan(c)
  assert p['fits'] is False
  with pytest.raises(ConfigError, match='hardware.device_memory_gb=20'):
    plan.check_fits(p)
  with pytest.raises(ConfigError, match='--devices'):
    plan.plan(_tiny(mesh=dict(fsdp=-1)))
  with pytest.raises(ConfigError, match='--mfu'):
    plan.plan(dense_65b.get_config(), mfu=1.5)


def test_compiled_section_extrapolates_in_depth():
  calls = []

  def fake_run(config, devices):
    calls.append((config.model.num_layers, config.model.attention, config.model.scan_layers))
    layers = config.model.num_layers
    return aot.CompiledMemory(num_layers=layers, argument_bytes=10 * 2**30 + layers * 2**30,
                              output_bytes=2**20, alias_bytes=2**20, temp_bytes=3 * 2**30,
                              compile_seconds=1.0)

  out = plan.compiled_section(dense_65b.get_config(), 256, ('1', '3'), run=fake_run)
  assert calls == [(1, 'xla', True), (3, 'xla', True)]  # Scanned like the config, xla attention.
  assert out['compiled_per_layer_gib'] == 1.0
  assert out['compiled_total_gib'] == 14 + 79  # 14 GiB at one layer, +1 GiB per further layer.
  assert out['compiled_compute_dtype'] == 'float32'
  assert out['analytic_over_compiled'] == pytest.approx(
      out['analytic_of_compiled_variant_gib'] / out['compiled_total_gib'], abs=1e-3)


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'train.plan', *args], cwd=REPO, text=True,
                        capture_output=True, timeout=300)


def test_cli_json_and_exit_status():
  out = _cli('--config', str(REPO / 'experiments/tiny_dense.py'), '--devices', '8', '--json',
             '--config.hardware.peak_tflops=1', '--wall_clock_days=1')
  assert out.returncode == 0, out.stderr[-2000:]
  p = json.loads(out.stdout)
  assert p['devices'] == 8 and p['mesh'] == 'fsdp=8' and p['tokens_per_step'] == 16 * 128
  assert p['fits'] is None  # tiny_dense names no device memory.
  assert {'mem_total_gib', 'flops_per_token', 'mfu_implied_by_wall_clock'} <= set(p)
  out = _cli('--config', str(REPO / 'experiments/dense_65b.py'),
             '--config.hardware.device_memory_gb=20')
  assert out.returncode == 1
  assert '[memory per device, analytic (GiB)]' in out.stdout and 'fits' in out.stdout
  assert 'error: hardware.device_memory_gb=20' in out.stderr
  out = _cli('--config', str(REPO / 'experiments/dense_65b_grpo.py'), '--config.train.global_batch=512')
  assert out.returncode == 1 and 'rl_kv_cache_gib' in out.stdout
  assert 'error: hardware.device_memory_gb=80' in out.stderr and 'ppo.rollout_slots=4096' in out.stderr
  out = _cli('--config', str(REPO / 'experiments/dense_65b.py'), '--config.train.global_batch=100')
  assert out.returncode == 1 and 'train.global_batch' in out.stderr and not out.stdout


GIB = memory.GIB


def test_rl_kv_cache_by_hand():
  """slots x (prompt + new) x layers x (k, v) x kv heads x head dim x bf16, rows over the batch
  shards and kv heads over mesh.tensor (replicated where tensor does not divide them)."""
  c = _tiny(mesh=dict(fsdp=2, tensor=4), model=dict(num_kv_heads=4, num_heads=8))
  cfg = model_config(c)
  kv = lambda sizes: memory.kv_cache(c, sizes, cfg, 32, 24 + 8)
  assert kv({'fsdp': 2, 'tensor': 4}) == 32 / 2 * 32 * 2 * 2 * (4 / 4) * 8 * 2
  assert kv({'fsdp': 8}) == 32 / 8 * 32 * 2 * 2 * 4 * 8 * 2
  c.model.num_kv_heads = 2  # 2 kv heads over tensor=4: replicated, as logical_to_spec drops it.
  got = memory.kv_cache(c, {'fsdp': 2, 'tensor': 4}, model_config(c), 32, 32)
  assert got == 32 / 2 * 32 * 2 * 2 * 2 * 8 * 2


def test_dense_65b_rl_stages_by_hand():
  """Both 65B RL configs plan from shapes alone (no array is allocated); GRPO has no reward or
  value model; the reference is the policy's params, on the host for PPO (ref_on_host)."""
  live = len(jax.live_arrays())
  ppo, grpo = plan.plan(dense_65b_rlhf.get_config()), plan.plan(dense_65b_grpo.get_config())
  assert len(jax.live_arrays()) == live
  mha = 80 * 2 * 64 * 128 * 2  # Bytes of k and v per token, all layers, bf16; 256 devices.
  assert grpo['rl_kv_cache_gib'] == 256 * 16 * (512 + 512) * mha / 256 / GIB == 40.0
  assert grpo['rl_rollouts_per_iteration'] == grpo['rl_rollout_slots'] == 4096
  assert ppo['rl_kv_cache_gib'] == round(512 * (1024 + 512) * mha / 256 / GIB, 2) == 7.5
  assert not {'rl_reward_model_gib', 'rl_value_model_gib'} & set(grpo)
  assert grpo['rl_reference_gib'] == grpo['mem_params_gib'] and grpo['rl_reference_host_gib'] == 0
  assert ppo['rl_reference_gib'] == 0 and ppo['rl_reference_host_gib'] == ppo['mem_params_gib']
  # The reward model: the policy's trunk (no output table) + w_d over fsdp=32 + a bias, float32;
  # 'reward_model' is unset, which a note says.
  total, d = ppo['params_total'], 8192
  norms = (2 * 80 + 1) * d
  rm = (total - 128_000 * d - norms) * 4 / 256 + norms * 4 + d * 4 / 32 + 4
  assert ppo['rl_reward_model_gib'] == round(rm / GIB, 2) and 'ppo.reward_model' in ppo['rl_notes'][0]
  # The critic (from the RM): params, AdamW, gradients, each layer's input for 2 rollouts a device.
  assert ppo['rl_value_model_gib'] == pytest.approx((4 * rm + 80 * 2 * 1536 * d * 2) / GIB, abs=0.01)
  assert ppo['fits'] and grpo['fits']
  assert not [w for w in ppo['warnings'] + grpo['warnings'] if 'decoder update step' in w]
  # An ensemble of three reward models (each sized as the first): three times the RM.
  c = dense_65b_rlhf.get_config()
  c.ppo.reward_ensemble = 'gs://b/rm1,gs://b/rm2'
  three = plan.plan(c)
  assert three['rl_reward_model_gib'] == pytest.approx(3 * rm / GIB, abs=0.01)
  assert three['rl_total_gib'] == pytest.approx(ppo['rl_total_gib'] + 2 * rm / GIB, abs=0.02)
  # PPO with a verifiable reward: no reward model, the same critic (the policy's trunk), no note.
  c = dense_65b_rlhf.get_config()
  c.ppo.update(reward='gsm8k', critic_init='policy')
  rlvr = plan.plan(c)
  assert rlvr['rl_reward_model_gib'] == 0 and not rlvr['rl_notes']
  assert rlvr['rl_value_model_gib'] == ppo['rl_value_model_gib']
  assert rlvr['rl_total_gib'] == pytest.approx(ppo['rl_total_gib'] - ppo['rl_reward_model_gib'],
                                               abs=0.02)


def test_rl_not_fitting_names_the_knobs(tmp_path):
  c = dense_65b_grpo.get_config()
  c.train.global_batch = 512  # 8,192 rollouts at once: an 80 GiB cache a device.
  p = plan.plan(c)
  assert p['rl_kv_cache_gib'] == 80.0 and p['fits'] is False
  with pytest.raises(ConfigError, match=r'Try: ppo.rollout_slots=4096 \(-40.0 GiB\); '
                     r'ppo.ref_on_host=True \(-0.98 GiB\); grpo.num_generations below 16'):
    plan.check_fits(p)
  c.ppo.update(rollout_slots=4096, ref_on_host=True)
  p = plan.plan(c)
  assert p['rl_kv_cache_gib'] == 40.0 and p['rl_reference_gib'] == 0 and p['fits']
  plan.check_fits(p)
  # A reward model run of half the depth is read from its workdir's config.json.
  rm = dense_65b_rlhf.get_config('rm')
  rm.model.num_layers = 40
  (tmp_path / 'checkpoints').mkdir()
  (tmp_path / 'config.json').write_text(rm.to_json())
  c = dense_65b_rlhf.get_config()
  c.ppo.reward_model = str(tmp_path)
  half, full = plan.plan(c), plan.plan(dense_65b_rlhf.get_config())
  assert not half['rl_notes'] and half['rl_reward_model_gib'] < 0.6 * full['rl_reward_model_gib']
