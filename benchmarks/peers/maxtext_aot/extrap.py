"""Per-step FLOPs / bytes from unrolled reduced-depth compiles: f(L) = a + b*L (linear in depth)."""
import json, sys
def ld(t): return json.load(open(f"out/{t}.json"))["cost_analysis"]
def ext(t2, t4, L, ga):
  c2, c4 = ld(t2), ld(t4)
  out = {}
  for k in ("flops", "bytes accessed"):
    b = (c4[k] - c2[k]) / 2; a = c2[k] - 2 * b
    out[k] = dict(per_layer=b, non_layer=a, per_microbatch=a + L * b, per_step=ga * (a + L * b))
  return out
if __name__ == "__main__":
  print(json.dumps({"A (80 layers, GA=16)": ext("A_ga1_unroll_L2", "A_ga1_unroll_L4", 80, 16),
                    "B (32 layers, GA=1)": ext("B_unroll_L2", "B_unroll_L4", 32, 1)}, indent=1))
