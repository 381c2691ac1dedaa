"""Driver around MaxText 0.2.5's own train_compile helpers (deviceless TPU AOT).

Same steps as maxtext.trainers.pre_train.train_compile.main (non-DiLoCo path),
plus: timing, full memory_analysis / cost_analysis printout, MaxText's own
analytic TFLOP estimate, and collective counts parsed from compiled.as_text().

Usage: python aot_driver.py OUT_PREFIX [maxtext config yml] key=value ...
Writes OUT_PREFIX.json (numbers) and OUT_PREFIX.hlo.txt (compiled HLO text).
"""

import json
import os
import re
import sys
import time

import jax
from flax.core.spmd import logical_axis_rules as axis_rules

from maxtext.configs import pyconfig
from maxtext.trainers.pre_train import train
from maxtext.trainers.pre_train import train_compile as tc
from maxtext.utils import maxtext_utils
from maxtext.utils import sharding

GiB = 1024**3

COLL_OPS = [
    "all-gather",
    "all-gather-start",
    "reduce-scatter",
    "all-reduce",
    "all-reduce-start",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
    "collective-permute-start",
    "collective-broadcast",
]
DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
    "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}
ARR_RE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
INSTR_RE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.+?)\s+(?P<op>"
    + "|".join(re.escape(o) for o in sorted(COLL_OPS, key=len, reverse=True))
    + r")\("
)


def arrays(type_str):
  out = []
  for dt, dims in ARR_RE.findall(type_str):
    if dt not in DTYPE_BYTES:
      continue
    n = 1
    for d in dims.split(","):
      if d:
        n *= int(d)
    out.append(n * DTYPE_BYTES[dt])
  return out


def count_collectives(hlo_text):
  """Static count (each HLO instruction once, loop bodies not multiplied)."""
  res = {}
  for line in hlo_text.splitlines():
    m = INSTR_RE.match(line)
    if not m:
      continue
    op, typ = m.group("op"), m.group("type")
    arrs = arrays(typ)
    kind = op.replace("-start", "")
    if op in ("all-gather-start", "collective-permute-start"):
      # async start returns (operand(s), result(s), [context]); take result half
      nbytes = arrs[1] if len(arrs) >= 2 else sum(arrs)
    else:
      nbytes = sum(arrs)
    r = res.setdefault(kind, {"count": 0, "output_bytes": 0, "by_opcode": {}})
    r["count"] += 1
    r["output_bytes"] += nbytes
    r["by_opcode"][op] = r["by_opcode"].get(op, 0) + 1
  return res


def main(argv):
  out_prefix = argv[1]
  mt_argv = [argv[0]] + argv[2:]
  jax.config.update("jax_default_prng_impl", "unsafe_rbg")
  os.environ["LIBTPU_INIT_ARGS"] = (
      os.environ.get("LIBTPU_INIT_ARGS", "") + " --xla_tpu_spmd_rng_bit_generator_unsafe=true"
  )
  t0 = time.time()
  config = pyconfig.initialize(mt_argv)
  tc.validate_config(config)
  topology_mesh = tc.get_topology_mesh(config)
  print("mesh:", dict(topology_mesh.shape), "devices:", topology_mesh.devices.size, flush=True)
  print("device kind:", topology_mesh.devices.flat[0].device_kind, flush=True)
  (shaped_train_args, shaped_train_kwargs, state_mesh_shardings, _, model) = tc.get_shaped_inputs(
      topology_mesh, config
  )
  params_shardings, state_mesh_shardings = sharding.maybe_update_params_sharding_with_opt(config, state_mesh_shardings)
  input_state_mesh_shardings = sharding.build_zero1_input_state_mesh_shardings(
      config, state_mesh_shardings, params_shardings
  )
  data_sharding = sharding.get_input_data_sharding(config, topology_mesh)
  (func, in_shard, out_shard, static_argnums, donate_argnums) = maxtext_utils.get_functional_train_with_signature(
      train.train_step, data_sharding, input_state_mesh_shardings, model, config, params_shardings
  )
  t1 = time.time()
  print(f"setup (config+abstract state) s: {t1 - t0:.1f}", flush=True)

  # lower + compile, as tc.jit_and_compile, but timed separately
  import contextlib
  from maxtext.utils import max_utils

  with jax.set_mesh(topology_mesh), contextlib.nullcontext(), axis_rules(config.logical_axis_rules):
    jitted = jax.jit(
        func,
        in_shardings=in_shard,
        out_shardings=out_shard,
        static_argnums=static_argnums,
        donate_argnums=donate_argnums,
    )
    lowered = jitted.lower(*shaped_train_args, **shaped_train_kwargs)
  t2 = time.time()
  print(f"lower s: {t2 - t1:.1f}", flush=True)
  compiler_options = max_utils.parse_libtpu_flags_to_dict(config.compile_xla_flags)
  compiled = lowered.compile(compiler_options=compiler_options)
  t3 = time.time()
  print(f"compile s: {t3 - t2:.1f}", flush=True)

  ma = compiled.memory_analysis()
  mem = {}
  for k in dir(ma):
    if k.endswith("_in_bytes"):
      mem[k] = int(getattr(ma, k))
  print("memory_analysis:", ma, flush=True)
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0]
  ca = {k: float(v) for k, v in ca.items()}
  print("cost_analysis flops:", ca.get("flops"), "bytes accessed:", ca.get("bytes accessed"), flush=True)

  hlo = compiled.as_text()
  with open(out_prefix + ".hlo.txt", "w") as f:
    f.write(hlo)
  colls = count_collectives(hlo)
  n_while = len(re.findall(r"\swhile\(", hlo))

  try:
    tflops_est, learnable_tflops, attn_tflops = maxtext_utils.calculate_tflops_training_per_device(config, log=False)
  except TypeError:
    tflops_est, learnable_tflops, attn_tflops = maxtext_utils.calculate_tflops_training_per_device(config)
  except Exception as e:  # pylint: disable=broad-except
    print("tflops estimate failed:", e)
    tflops_est = learnable_tflops = attn_tflops = None

  total = mem["argument_size_in_bytes"] + mem["output_size_in_bytes"] - mem["alias_size_in_bytes"] + mem[
      "temp_size_in_bytes"
  ]
  result = {
      "versions": {
          "jax": jax.__version__,
          "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
      },
      "config": {
          "compile_topology": config.compile_topology,
          "num_devices": int(topology_mesh.devices.size),
          "mesh": {k: int(v) for k, v in topology_mesh.shape.items()},
          "per_device_batch_size": config.per_device_batch_size,
          "gradient_accumulation_steps": config.gradient_accumulation_steps,
          "micro_batch_size_to_train_on": config.micro_batch_size_to_train_on,
          "global_batch_size_to_train_on": config.global_batch_size_to_train_on,
          "max_target_length": config.max_target_length,
          "emb_dim": config.emb_dim,
          "num_decoder_layers": config.num_decoder_layers,
          "num_query_heads": config.num_query_heads,
          "num_kv_heads": config.num_kv_heads,
          "mlp_dim": config.mlp_dim,
          "vocab_size": config.vocab_size,
          "num_experts": config.num_experts,
          "num_experts_per_tok": config.num_experts_per_tok,
          "attention": config.attention,
          "remat_policy": config.remat_policy,
          "scan_layers": config.scan_layers,
          "dtype": str(config.dtype),
          "weight_dtype": str(config.weight_dtype),
          "opt_type": str(config.opt_type),
          "megablox": config.megablox,
          "sparse_matmul": config.sparse_matmul,
          "capacity_factor": config.capacity_factor,
      },
      "seconds": {"setup": t1 - t0, "lower": t2 - t1, "compile": t3 - t2},
      "memory_bytes": mem,
      "memory_gib": {k: v / GiB for k, v in mem.items()},
      "total_gib_arg_plus_out_minus_alias_plus_temp": total / GiB,
      "cost_analysis": ca,
      "maxtext_analytic_tflops_per_device_per_step": {
          "total": tflops_est,
          "learnable_weight": learnable_tflops,
          "attention": attn_tflops,
      },
      "collectives_static": colls,
      "hlo_while_loops": n_while,
      "hlo_text_chars": len(hlo),
  }
  with open(out_prefix + ".json", "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps({k: result[k] for k in ("seconds", "memory_gib", "total_gib_arg_plus_out_minus_alias_plus_temp",
                                           "maxtext_analytic_tflops_per_device_per_step", "collectives_static")},
                   indent=1))
  print("flops:", ca.get("flops"), "bytes accessed:", ca.get("bytes accessed"))
  print("DONE", flush=True)


if __name__ == "__main__":
  main(sys.argv)
