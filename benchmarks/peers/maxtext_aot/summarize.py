"""Print markdown summary rows from out/*.json (run with any python3)."""
import json, sys
G = 2**30
for tag in sys.argv[1:]:
  d = json.load(open(f"out/{tag}.json"))
  m = d["memory_bytes"]
  ca = d["cost_analysis"]
  print(f"### {tag}")
  print(f"- mesh (non-1 axes): { {k: v for k, v in d['config']['mesh'].items() if v != 1} }, devices {d['config']['num_devices']}")
  print(f"- micro batch (global seqs per microbatch) {d['config']['micro_batch_size_to_train_on']}, global batch {d['config']['global_batch_size_to_train_on']}, GA {d['config']['gradient_accumulation_steps']}, seq {d['config']['max_target_length']}, scan_layers {d['config']['scan_layers']}, layers {d['config']['num_decoder_layers']}")
  print(f"- per-chip memory GiB: argument {m['argument_size_in_bytes']/G:.3f}, output {m['output_size_in_bytes']/G:.3f}, alias {m['alias_size_in_bytes']/G:.3f}, temp {m['temp_size_in_bytes']/G:.3f}, "
        f"**total (arg+out-alias+temp) {(m['argument_size_in_bytes']+m['output_size_in_bytes']-m['alias_size_in_bytes']+m['temp_size_in_bytes'])/G:.3f}**, "
        f"generated code {m['generated_code_size_in_bytes']/G:.3f}, XLA peak_memory_in_bytes {m.get('peak_memory_in_bytes',0)/G:.3f}")
  print(f"- cost_analysis (raw, per chip): flops {ca['flops']:.4e}, bytes accessed {ca['bytes accessed']:.4e}")
  a = d["maxtext_analytic_tflops_per_device_per_step"]
  print(f"- MaxText analytic estimate (calculate_tflops_training_per_device, no remat recompute): {a['total']*1e12:.4e} FLOP/chip/step (weights {a['learnable_weight']*1e12:.4e}, attention {a['attention']*1e12:.4e})")
  cs = d["collectives_static"]
  print("- collectives (static HLO instruction count; output GiB per instruction summed once): " + ", ".join(
      f"{k} {v['count']} ({v['output_bytes']/G:.3f} GiB)" for k, v in sorted(cs.items())) + f"; while loops in HLO: {d['hlo_while_loops']}")
  s = d["seconds"]
  print(f"- seconds: setup {s['setup']:.1f}, lower {s['lower']:.1f}, **compile {s['compile']:.1f}**")
  print()
