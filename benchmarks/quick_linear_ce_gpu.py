"""Quick GPU check of linear_cross_entropy (bf16): fused vs reference vs the bare
GEMMs, time (CUDA events, median of 5) and peak extra memory, plus accuracy
against an fp32 reference. Produced benchmarks/results/gpu-h100-linear-ce-quick.json;
`python -m fusedloss.bench --preset gpu` is the full benchmark."""
import json

import torch

import fusedloss
from fusedloss import reference
def timeit(fn, reps=5):
    fn(); torch.cuda.synchronize()
    ts=[]
    for _ in range(reps):
        s=torch.cuda.Event(enable_timing=True); e=torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    ts.sort(); return ts[len(ts)//2]
for (n,d,v) in [(8192,4096,128256),(8192,2304,256000)]:
    x=(torch.randn(n,d,device='cuda')).bfloat16().requires_grad_()
    w=(torch.randn(v,d,device='cuda')/d**0.5).bfloat16().requires_grad_()
    t=torch.randint(0,v,(n,),device='cuda')
    def fused():
        x.grad=None; w.grad=None
        fusedloss.linear_cross_entropy(x,w,t).backward()
    def ref():
        x.grad=None; w.grad=None
        reference.linear_cross_entropy(x,w,t).backward()
    def gemms():
        l=x@w.T; gx=l@w; gw=l.T@x
    def fwd():
        with torch.no_grad(): fusedloss.linear_cross_entropy(x,w,t)
    row=dict(n=n,d=d,v=v)
    for name,fn in [('gemm3',gemms),('fused_fwd',fwd),('fused',fused),('reference',ref)]:
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(); base=torch.cuda.memory_allocated()
        try:
            row[name+'_ms']=timeit(fn); row[name+'_peak_extra_MiB']=(torch.cuda.max_memory_allocated()-base)/2**20
        except torch.OutOfMemoryError as e:
            row[name+'_ms']='OOM'
    # accuracy vs fp32 oracle on the fused result
    x.grad=None; w.grad=None
    l=fusedloss.linear_cross_entropy(x,w,t); l.backward(); gx,gw=x.grad.float(),w.grad.float()
    xo=x.detach().float().requires_grad_(); wo=w.detach().float().requires_grad_()
    lo=reference.linear_cross_entropy(xo,wo,t); lo.backward()
    row['loss_abs_err']=abs(l.item()-lo.item()); row['gx_max_err']=(gx-xo.grad).abs().max().item(); row['gw_max_err']=(gw-wo.grad).abs().max().item()
    print(json.dumps(row), flush=True)
    del x,w,t; torch.cuda.empty_cache()
