"""AWQ's activation-aware scale search (Lin et al., 2023, as AutoAWQ runs it), over the captured graph.

A few input channels of each linear meet activations much larger than the rest; rounding their weights costs the
most. AWQ scales those weight columns up before rounding (W * s) and the activations down by the same factor
(x / s), so they keep more of the 4 bits. In `compiled_llm::int4_linear`'s terms the weight is quantized divided by
`smooth` = 1 / s and x is multiplied by `smooth` in the kernel, which leaves the graph's other ops as they were.

For each linear the pass rewrites:
- its inputs are recorded (fx_passes/calibration.py) while the graph, as the passes left it so far, runs over calibration
  text: the package's calibration.txt through the model's tokenizer, or random token ids without one;
- s = mean|x|^a / mean|W_normalized|^(1 - a), normalised by sqrt(max s * min s), for a in 0, 1/20, .., 19/20, and
  s = 1 (plain rounding) are ranked by the squared error of x W^T their rounded weight gives on the recorded rows;
- for the best three, each group's range is clipped to +-r max|W| for the r in 1, 0.95, .., 0.55 that gives the
  smallest squared error of the group's share of x W^T, per output channel and group (AWQ's clipping search: a
  group's few largest weights give up some accuracy so that the rest get finer steps);
- the scaling and clips with the smallest error win (plain rounding unclipped is among the ranked, so the search
  never does worse than it on the recorded rows);
- where asked (`fit`: quantize_int4.FIT_GRIDS, on by default), for int4_awq's offsets (w = q s + m), each group's s and
  m are then fitted by least squares to the same error, from the clipped range's grid (fit_grid: llama.cpp's k-quants
  fit theirs so): 15% less KL divergence from the float SmolLM2-135M (BENCHMARKS.md).
A fused weight's parts (q/k/v, gate/up) are searched one by one, each its own scaling: int4_linear multiplies x by
the part's row of `smooth`. One scaling for the fused weight, as AWQ folds it into the norm before, measured +12.5%
perplexity on SmolLM2-135M against +7.9% so (BENCHMARKS.md).
The smooths and clips found are stored under the cache directory, keyed by a fingerprint of every weight of the
graph, the calibration tokens, the format and this search's version, so a second compile of the same checkpoint skips
the forward and the search.

The search rounds weights through a `Rounding`, `rounding(w, group_size, smooth, clip)`: int4's
fake_quantize_with_offsets by default (what int4_awq stores), nvfp4.fake_quantize for NVFP4 (whose blocks of 16
columns are its groups, and whose clip bounds a block's max).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.fx
from tqdm.auto import tqdm

from custom_ops.linear.int4 import fake_quantize_with_offsets, round_groups
from fx_passes.calibration import cache_path, fingerprint, load_entry, recorded_inputs, store_entry

log = logging.getLogger("compiled_llm")

SEARCH_VERSION = "awq-search-6"  # part of the fingerprint: a changed search never reads an old result
GRID = 20
CLIPPED_CANDIDATES = 3
CLIP_RATIOS = [1 - i / 20 for i in range(10)]  # 1 (no clip) down to 0.55
LOSS_ROWS = 512  # recorded rows the error is measured on (the means use all of them)
FIT_STEPS = 4  # least-squares refits of a group's grid; 10 measured the same

# (weight [N, K], group size, smooth or None, clip [N, K / group size] or None) -> the weight rounded, float32 [N, K]
Rounding = Callable[[torch.Tensor, int, torch.Tensor | None, torch.Tensor | None], torch.Tensor]
INT4_ROUNDING = fake_quantize_with_offsets  # what int4_awq stores


def search_scales(x: torch.Tensor, weight: torch.Tensor, group_size: int,
                  rounding: Rounding = INT4_ROUNDING) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:  # fmt: skip
    """(smooth [K] float32 or None, clip [N, K / group_size] or None, the chosen rounding's error as a ratio to plain
    rounding's) for inputs x [T, K] and weight [N, K]. The grid's scalings are ranked by their error unclipped; the
    best CLIPPED_CANDIDATES of them (plain rounding among the ranked) get a clipping search each, and the one with the
    smallest error clipped wins. (Searching clips for the winner only, as AutoAWQ does, measured +12.1% perplexity on
    SmolLM2-135M against +10.6% so: BENCHMARKS.md.)"""
    w = weight.detach().float()
    n, k = w.shape
    rows = x[:: max(1, x.shape[0] // LOSS_ROWS)][:LOSS_ROWS]
    expected = rows @ w.t()

    def error(smooth: torch.Tensor | None, clip: torch.Tensor | None = None) -> float:
        rounded = rounding(w, group_size, smooth, clip)
        out = rows @ (rounded if smooth is None else rounded * smooth).t()
        return (out - expected).pow(2).mean().item()

    x_mean = x.abs().mean(dim=0)
    groups = w.abs().view(n, k // group_size, group_size)
    w_mean = (groups / groups.amax(dim=-1, keepdim=True).clamp(min=1e-8)).view(n, k).mean(dim=0)
    candidates = [(error(None), None)]
    for step in range(GRID):
        ratio = step / GRID
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        smooth = (s.max() * s.min()).sqrt() / s  # 1 / s, s normalised by sqrt(max s * min s)
        candidates.append((error(smooth), smooth))
    plain = candidates[0][0]
    ranked = sorted(candidates, key=lambda c: c[0])
    best = (*ranked[0], None)  # unclipped, in case no clipping measures better on these rows
    for _, smooth in ranked[:CLIPPED_CANDIDATES]:
        clip = search_clip(x, w, group_size, smooth, rounding)
        found = (error(smooth, clip), smooth, clip)
        if found[0] < best[0]:
            best = found
    return best[1], best[2], best[0] / plain if plain > 0 else 1.0


def search_clip(x: torch.Tensor, weight: torch.Tensor, group_size: int, smooth: torch.Tensor | None,
                rounding: Rounding = INT4_ROUNDING) -> torch.Tensor | None:  # fmt: skip
    """quantize_weight's `clip` [N, K / group_size] for inputs x [T, K] and weight [N, K] quantized divided by `smooth`:
    per output channel and group, the ratio of CLIP_RATIOS whose rounding changes the group's share of x W^T the
    least; None where no group measured better clipped. The mean square of x_g . d over the rows is d^T C_g d with
    C_g = x_g^T x_g / T, the group's second moments, computed once: a ratio costs N K G products, not T N K."""
    w, moments = _smoothed(x, weight, group_size, smooth)
    n, k = w.shape
    groups = k // group_size
    amax = w.view(n, groups, group_size).abs().amax(dim=-1)
    best_error = torch.full_like(amax, float("inf"))
    best = amax.clone()
    for ratio in CLIP_RATIOS:
        clip = amax * ratio
        change = (rounding(w, group_size, None, clip) - w).view(n, groups, group_size).transpose(0, 1)  # [g, N, G]
        error = (torch.bmm(change, moments) * change).sum(dim=-1).t()  # [N, g]
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better, clip, best)
    return None if torch.equal(best, amax) else best


def _smoothed(x: torch.Tensor, weight: torch.Tensor, group_size: int,
              smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(W / smooth [N, K] in float32, the second moments C_g = x_g^T x_g / T [K / G, G, G] of x * smooth's groups):
    the mean square of x_g . d over the rows is d^T C_g d, so an error costs N K G products, not T N K."""
    w = weight.detach().float()
    rows = x * smooth if smooth is not None else x
    if smooth is not None:
        w = w / smooth
    x_groups = rows.view(rows.shape[0], -1, group_size).transpose(0, 1)  # [g, T, G]
    return w, torch.bmm(x_groups.transpose(1, 2), x_groups) / rows.shape[0]


def fit_grid(x: torch.Tensor, weight: torch.Tensor, group_size: int, smooth: torch.Tensor | None,
             clip: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """Each group's scale s and offset m [N, K / group_size, 2] for int4's offsets (w = q s + m, q in 0..15), fitted
    to inputs x [T, K]: from the grid over the group's range (clipped to +-clip), round the codes, solve for the s and
    m that minimise the group's share of the squared error of x W^T with those codes (d^T C_g d, d = w - q s - m: a
    2 x 2 weighted least squares), round again on the new grid; FIT_STEPS times, each group keeping its grid of
    smallest error, so none does worse than its range's grid on these inputs."""
    w, moments = _smoothed(x, weight, group_size, smooth)
    n, k = w.shape
    groups = w.view(n, k // group_size, group_size)

    def rounded(clip=None, grid=None):  # int4's rounding in float32: (codes, s, m, the groups' errors)
        codes, step, offset = round_groups(w, group_size, None, torch.float32, clip, True, grid)
        change = groups - (codes * step[..., None] + offset[..., None])
        return codes, step, offset, (torch.einsum("ngj,gjk->ngk", change, moments) * change).sum(dim=-1)

    codes, step, offset, error = rounded(clip=clip)
    row_sums = moments.sum(dim=-1)  # C 1 [g, G]
    ones = row_sums.sum(dim=-1)  # 1^T C 1 [g]
    for _ in range(FIT_STEPS):
        weighted = torch.einsum("ngj,gjk->ngk", codes, moments)  # C q
        qq, q1 = (weighted * codes).sum(dim=-1), weighted.sum(dim=-1)
        qw, w1 = (weighted * groups).sum(dim=-1), (groups * row_sums).sum(dim=-1)
        det = qq * ones - q1 * q1
        solvable = det > 1e-9 * qq * ones  # codes all equal leave s and m undetermined
        det = torch.where(solvable, det, torch.ones_like(det))
        new_step = torch.where(solvable, (ones * qw - q1 * w1) / det, step)
        new_offset = torch.where(solvable, (qq * w1 - q1 * qw) / det, offset)
        usable = new_step > 0
        new_step, new_offset = torch.where(usable, new_step, step), torch.where(usable, new_offset, offset)
        new_codes, new_step, new_offset, new_error = rounded(grid=torch.stack((new_step, new_offset), dim=-1))
        better = new_error < error
        step, offset = torch.where(better, new_step, step), torch.where(better, new_offset, offset)
        codes, error = torch.where(better[..., None], new_codes, codes), torch.where(better, new_error, error)
    return torch.stack((step, offset), dim=-1)


def search_parts(x: torch.Tensor, weight: torch.Tensor, group_size: int, parts: list[int],
                 rounding: Rounding = INT4_ROUNDING, fit: bool = False) -> tuple:  # fmt: skip
    """search_scales for each part of a fused weight (its rows `parts`: q/k/v, gate/up), which share the input x:
    (smooth [P, K] (ones for a part plain rounding won) or None where every part's did, clip [N, K / G] (+inf for
    groups left whole) or None, grid [N, K / G, 2] (with `fit`: fit_grid's over each part's smooth and clip, which
    it replaces: clip is None then) or None, the error's ratio to plain rounding's, averaged over the parts'
    channels, before any fit)."""
    found = [search_scales(x, rows, group_size, rounding) for rows in weight.split(parts)]
    smooths = [s for s, _, _ in found]
    smooth = None
    if any(s is not None for s in smooths):
        smooth = torch.stack([torch.ones_like(x[0]) if s is None else s for s in smooths])
    clip = grid = None
    if fit:
        grid = torch.cat([fit_grid(x, rows, group_size, s, c) for rows, (s, c, _) in zip(weight.split(parts), found)])
    elif any(c is not None for _, c, _ in found):
        clip = torch.cat([torch.full((n, weight.shape[1] // group_size), float("inf"), device=x.device) if c is None
                          else c for (_, c, _), n in zip(found, parts)])  # fmt: skip
    return smooth, clip, grid, sum(r * n for (_, _, r), n in zip(found, parts)) / sum(parts)


def awq_search(gm: torch.fx.GraphModule, sites: list[torch.fx.Node], weights: list[torch.Tensor],
               group_sizes: list[int], parts: list[list[int]], sequences: list[list[int]], cache_dir: Path,
               device: torch.device, rounding: Rounding = INT4_ROUNDING,
               fit: bool = False) -> tuple[list[tuple], str]:  # fmt: skip
    """Each site's (smooth, clip, grid) (search_parts') for its weight in groups of its group size and in its parts,
    from the cache or calibrated now, and a line for the report."""
    start = time.perf_counter()
    form = f"{rounding.__module__}.{rounding.__name__}"  # the format: int4's results are not NVFP4's
    key = fingerprint(gm, sequences, [group_sizes, parts, form, fit], SEARCH_VERSION)
    path = cache_path(cache_dir, "awq", key)
    names = [f"{i}:{tuple(w.shape)}" for i, w in enumerate(weights)]
    stored = load_entry(path)
    if stored is not None and set(stored) == set(names):
        found = [tuple(None if t is None else t.to(device) for t in stored[n]) for n in names]
        return found, f"AWQ scales from the cache ({path.name}, {time.perf_counter() - start:.1f} s)"
    found, ratios = [], []
    inputs = recorded_inputs(gm, sites, sequences, device)
    searches = list(zip(weights, group_sizes, parts))
    for (weight, group_size, rows), (_, x) in tqdm(zip(searches, inputs), total=len(searches),
                                                   desc="AWQ calibration: scale search", unit="linear",
                                                   leave=False):  # fmt: skip
        smooth, clip, grid, ratio = search_parts(x, weight, group_size, rows, rounding, fit)
        del x  # before the next site's rows: those may need another forward, which should not hold these
        found.append((smooth, clip, grid))
        ratios.append(ratio)
    store_entry(path, {n: tuple(None if t is None else t.cpu() for t in result) for n, result in zip(names, found)})
    seconds = time.perf_counter() - start
    scaled = sum(smooth is not None for smooth, _, _ in found)
    mean_ratio = sum(ratios) / len(ratios) if ratios else 1.0
    log.info("AWQ calibration: %d of %d linears scaled, squared error %.3f of plain rounding's on average, %.1f s",
             scaled, len(sites), mean_ratio, seconds)  # fmt: skip
    tokens = sum(len(s) for s in sequences)
    searched = "scales, clipping and fitted grids" if fit else "scales and clipping"
    return found, (f"AWQ {searched} searched over {tokens} tokens in {seconds:.1f} s ({scaled} of {len(sites)} "
                   f"linears scaled; error {mean_ratio:.2f}x plain rounding's before any fit)")  # fmt: skip
