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
  never does worse than it on the recorded rows).
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

from custom_ops.linear.int4 import fake_quantize_with_offsets
from fx_passes.calibration import cache_path, fingerprint, load_entry, record_inputs, store_entry

log = logging.getLogger("compiled_llm")

SEARCH_VERSION = "awq-search-5"  # part of the fingerprint: a changed search never reads an old result
GRID = 20
CLIPPED_CANDIDATES = 3
CLIP_RATIOS = [1 - i / 20 for i in range(10)]  # 1 (no clip) down to 0.55
LOSS_ROWS = 512  # recorded rows the error is measured on (the means use all of them)

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
    w = weight.detach().float()
    rows = x * smooth if smooth is not None else x
    if smooth is not None:
        w = w / smooth
    n, k = w.shape
    groups = k // group_size
    x_groups = rows.view(-1, groups, group_size).transpose(0, 1)  # [g, T, G]
    moments = torch.bmm(x_groups.transpose(1, 2), x_groups) / rows.shape[0]  # [g, G, G]
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


def search_parts(x: torch.Tensor, weight: torch.Tensor, group_size: int, parts: list[int],
                 rounding: Rounding = INT4_ROUNDING) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:  # fmt: skip
    """search_scales for each part of a fused weight (its rows `parts`: q/k/v, gate/up), which share the input x:
    (smooth [P, K] (ones for a part plain rounding won) or None where every part's did, clip [N, K / G] (+inf for
    groups left whole) or None, the error's ratio to plain rounding's, averaged over the parts' channels)."""
    found = [search_scales(x, rows, group_size, rounding) for rows in weight.split(parts)]
    smooths = [s for s, _, _ in found]
    smooth = None
    if any(s is not None for s in smooths):
        smooth = torch.stack([torch.ones_like(x[0]) if s is None else s for s in smooths])
    clip = None
    if any(c is not None for _, c, _ in found):
        clip = torch.cat([torch.full((n, weight.shape[1] // group_size), float("inf"), device=x.device) if c is None
                          else c for (_, c, _), n in zip(found, parts)])  # fmt: skip
    return smooth, clip, sum(r * n for (_, _, r), n in zip(found, parts)) / sum(parts)


def awq_search(gm: torch.fx.GraphModule, sites: list[torch.fx.Node], weights: list[torch.Tensor],
               group_sizes: list[int], parts: list[list[int]], sequences: list[list[int]], cache_dir: Path,
               device: torch.device, rounding: Rounding = INT4_ROUNDING) -> tuple[list[tuple], str]:  # fmt: skip
    """Each site's (smooth, clip) (search_parts') for its weight in groups of its group size and in its parts, from
    the cache or calibrated now, and a line for the report."""
    start = time.perf_counter()
    form = f"{rounding.__module__}.{rounding.__name__}"  # the format: int4's results are not NVFP4's
    path = cache_path(cache_dir, "awq", fingerprint(gm, sequences, [group_sizes, parts, form], SEARCH_VERSION))
    names = [f"{i}:{tuple(w.shape)}" for i, w in enumerate(weights)]
    stored = load_entry(path)
    if stored is not None and set(stored) == set(names):
        found = [tuple(None if t is None else t.to(device) for t in stored[n]) for n in names]
        return found, f"AWQ scales from the cache ({path.name}, {time.perf_counter() - start:.1f} s)"
    inputs = record_inputs(gm, sites, sequences, device)
    found, ratios = [], []
    searches = list(zip(sites, weights, group_sizes, parts))
    for site, weight, group_size, rows in tqdm(searches, desc="AWQ calibration: scale search", unit="linear",
                                               leave=False):  # fmt: skip
        smooth, clip, ratio = search_parts(inputs.pop(site), weight, group_size, rows, rounding)
        found.append((smooth, clip))
        ratios.append(ratio)
    store_entry(path, {n: tuple(None if t is None else t.cpu() for t in pair) for n, pair in zip(names, found)})
    seconds = time.perf_counter() - start
    scaled = sum(smooth is not None for smooth, _ in found)
    mean_ratio = sum(ratios) / len(ratios) if ratios else 1.0
    log.info("AWQ calibration: %d of %d linears scaled, squared error %.3f of plain rounding's on average, %.1f s",
             scaled, len(sites), mean_ratio, seconds)  # fmt: skip
    tokens = sum(len(s) for s in sequences)
    return found, (f"AWQ scales and clipping searched over {tokens} tokens in {seconds:.1f} s ({scaled} of {len(sites)} "
                     f"linears scaled; error {mean_ratio:.2f}x plain rounding's)")  # fmt: skip
