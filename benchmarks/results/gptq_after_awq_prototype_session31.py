"""Prototype: GPTQ error feedback after AWQ's search (smooth + fitted grid), weights replaced in place by their
GPTQ-rounded values so the pass's own rounding recovers the same codes. MODE env: gptq | gptq_range | off."""
import os, sys, runpy, torch
import fx_passes.awq_calibration as ac
from custom_ops.linear.int4 import round_groups

MODE = os.environ.get("MODE", "gptq")
DAMP = float(os.environ.get("DAMP", "0.01"))
BLOCK = 128
orig = ac.search_parts

def gptq(x, w, group_size, smooth, grid):
    """w [N, K] float32 already divided by smooth; x rows already times smooth; grid [N, K/G, 2] (step, offset)."""
    n, k = w.shape
    H = (x.t() @ x) / x.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    w = w.clone(); w[:, dead] = 0
    H += DAMP * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True)
    step, off = grid[..., 0], grid[..., 1]
    Q = torch.zeros_like(w)
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        W1 = w[:, i1:i2].clone(); E1 = torch.zeros_like(W1); U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = (i1 + i) // group_size
            col = W1[:, i]
            q = torch.round((col - off[:, g]) / step[:, g]).clamp(0, 15) * step[:, g] + off[:, g]
            Q[:, i1 + i] = q
            err = (col - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None]
            E1[:, i] = err
        w[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q

def patched(x, weight, group_size, parts, rounding=ac.INT4_ROUNDING, fit=False):
    smooth, clip, grid, ratio = orig(x, weight, group_size, parts, rounding, fit)
    if MODE == "off":
        return smooth, clip, grid, ratio
    xf = x.float()
    start = 0
    new_grids = []
    for p, rows in enumerate(weight.split(parts)):
        s = smooth[p] if smooth is not None else None
        w = rows.detach().float() / (s if s is not None else 1)
        xs = xf * s if s is not None else xf
        if MODE == "gptq_range" or grid is None:
            c = None if clip is None else clip[start:start + rows.shape[0]]
            _, st, mn = round_groups(rows, group_size, s, torch.float32, c, True)
            g = torch.stack((st.float(), mn.float()), -1)
        else:
            g = grid[start:start + rows.shape[0]]
            # as stored: weight dtype
            g = torch.stack((g[..., 0].to(rows.dtype).float(), g[..., 1].to(rows.dtype).float()), -1)
        q = gptq(xs, w, group_size, s, g)
        new_grids.append(g)
        with torch.no_grad():
            rows.copy_((q * (s if s is not None else 1)).to(rows.dtype))
        start += rows.shape[0]
    if MODE == "gptq_range":
        return smooth, None, torch.cat(new_grids), ratio
    return smooth, clip, grid, ratio

ac.search_parts = patched
sys.argv = ["fp8_accuracy.py"] + sys.argv[1:]
runpy.run_path("/work/main/benchmarks/fp8_accuracy.py", run_name="__main__")
