import sys, time, torch
torch.set_num_threads(1)
import minc_kernels as mk
from minc_kernels import _ext
_ext.load()
ns = torch.ops.minc_kernels if hasattr(torch.ops.minc_kernels, "ema_update_") else torch.ops.minc
op = ns.ema_update_.with_copy
st = [torch.zeros(4) for _ in range(62)]; so = [torch.ones(4) for _ in range(62)]
def best(f, n=5000, reps=5):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n): f()
        out.append((time.perf_counter() - t0) / n)
    return min(out) * 1e6
w = best(lambda: mk.ema_update_(st, so, 0.996)); o = best(lambda: op(st, so, 0.996, [], []))
f = best(lambda: mk.ema_update_(st, so, 0.996, backend="foreach"), n=2000)
print(sys.argv[1], "(b47008e ema.py+_ext.py+_C)" if "old" in sys.argv[1] else "(8d15811)", f"ema_update_ {w:.2f} us  op {o:.2f} us  python {w-o:.2f} us  foreach-backend {f:.2f} us")
