import sys
sys.path.insert(0, "tests/cuda")
import torch
import prefix_attention_gpu as G
K = G.Kernels("build/pa_test/libpa_test.so")
L, scale, q, k, v, dout, out, lse = G.timing_inputs(K, 32)
ws = torch.empty(K.lib.pa_workspace_bytes(K._args(q, k, v, L, [q], lse), 0), dtype=torch.uint8, device="cuda")
grads = [torch.empty_like(x) for x in (q, k, v)]
for _ in range(3):
    K.forward(q, k, v, L, scale)
    K.backward(q, k, v, out, dout, lse, L, scale, ws=ws, grads=grads)
torch.cuda.synchronize()
print("done")
