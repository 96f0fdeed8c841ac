"""Calibration for the quantizations that measure a model's activations (int4_awq's AWQ search, int8_sq's
SmoothQuant): the graph, as the passes left it so far, run eagerly over calibration text with chosen linears' inputs
recorded, and a cache of what a search found, keyed by a fingerprint of the weights, so that a second compile of the
same checkpoint skips the forward and the search.

Calibration text: the package's calibration.txt (~2,800 words of mixed prose, code, dialogue and tables; never an
evaluation text) through the model's tokenizer, or random token ids without one (with a warning: they suit
random-weight models only).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import operator
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.fx
from tqdm.auto import tqdm

log = logging.getLogger("compiled_llm")

SEQUENCE_TOKENS = 256
# 4,096 tokens of text: AWQ's search with fitted grids left SmolLM2-135M 0.0880 KL from the float model over 1,017
# tokens, 0.0861 over 2,048 and 0.0799 over 3,435 (BENCHMARKS.md, session 30). Random ids serve random-weight models
# only, whose calibration need not be long.
CALIBRATION_TOKENS = 4096
RANDOM_TOKENS = 512
# Rows recorded at once: an 8B model's linears' inputs over 4,096 tokens take 14 GB in float32, so sites beyond this
# are recorded by another forward over the same tokens.
RECORDED_BYTES = 4 * 2**30


def calibration_sequences(tokenizer, vocab_size: int) -> tuple[list[list[int]], str]:
    """Token id sequences of up to SEQUENCE_TOKENS, CALIBRATION_TOKENS in all at most, and where they come from."""
    if tokenizer is not None:
        text = (importlib.resources.files("compiled_llm") / "calibration.txt").read_text()
        ids = tokenizer(text)["input_ids"][:CALIBRATION_TOKENS]
        source = f"{len(ids)} tokens of compiled_llm/calibration.txt"
    else:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab_size, (RANDOM_TOKENS,), generator=generator).tolist()
        source = f"{len(ids)} random token ids (no tokenizer: compile_model(..., tokenizer=) calibrates on text)"
        log.warning("calibration without a tokenizer runs on random token ids, which suits random-weight models "
                    "only; pass compile_model(model, tokenizer=...) (LLM does) to calibrate on text")  # fmt: skip
    return [ids[i : i + SEQUENCE_TOKENS] for i in range(0, len(ids), SEQUENCE_TOKENS)], source


class _LinearInputs(torch.fx.Interpreter):
    """Runs the graph eagerly and keeps, for each site, its input rows in float32."""

    def __init__(self, gm: torch.fx.GraphModule, sites: dict[torch.fx.Node, list[torch.Tensor]]):
        super().__init__(gm)
        self.sites = sites

    def run_node(self, node):
        if node in self.sites:
            x = self.env[node.args[0]]
            self.sites[node].append(x.detach().reshape(-1, x.shape[-1]).float())
        return super().run_node(node)


def recorded_inputs(gm: torch.fx.GraphModule, sites: list[torch.fx.Node], sequences: list[list[int]],
                    device: torch.device) -> Iterator[tuple[torch.fx.Node, torch.Tensor]]:  # fmt: skip
    """(site, its input rows [T, K] over the sequences) in the order of `sites`: the sites taken in runs whose rows
    fit RECORDED_BYTES, the graph run over the sequences once a run, so that only one run's rows are held."""
    tokens = sum(map(len, sequences))
    runs, held = [[]], 0
    for site in sites:
        size = 4 * tokens * _input_width(gm, site)
        if runs[-1] and held + size > RECORDED_BYTES:
            runs.append([])
            held = 0
        runs[-1].append(site)
        held += size
    for i, run in enumerate(runs):
        recorded = record_inputs(gm, run, sequences, device, f" ({i + 1} of {len(runs)})" if len(runs) > 1 else "")
        for site in run:
            yield site, recorded.pop(site)


def _input_width(gm: torch.fx.GraphModule, site: torch.fx.Node) -> int:
    """K of a linear site linear(x, weight, ...): its weight's, or its input's as traced."""
    weight = site.args[1] if len(site.args) > 1 else None
    if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
        return operator.attrgetter(weight.target)(gm).shape[-1]
    return site.args[0].meta["val"].shape[-1]


def record_inputs(gm: torch.fx.GraphModule, sites: list[torch.fx.Node], sequences: list[list[int]],
                  device: torch.device, label: str = "") -> dict[torch.fx.Node, torch.Tensor]:  # fmt: skip
    """Each site's input rows [T, K] over the sequences, the graph run once a sequence (recorded_inputs bounds the
    memory this takes); `label` follows the progress bar's name."""
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    unknown = [n for n in names if n not in ("input_ids", "position_ids", "logits_indices")]
    if unknown:
        raise ValueError(f"calibration runs the graph, whose inputs {unknown} it cannot make; quantizations that "
                         "calibrate need a model whose forward takes input_ids and position_ids")  # fmt: skip
    inputs = {site: [] for site in sites}
    with torch.no_grad():
        for ids in tqdm(sequences, desc=f"calibration: forward{label}", unit="sequence", leave=False):
            ids = torch.tensor(ids, device=device)
            positions = torch.arange(len(ids), device=device)
            values = {"input_ids": ids, "position_ids": positions, "logits_indices": positions[-1:]}
            _LinearInputs(gm, inputs).run(*(values[name] for name in names))
    return {site: torch.cat(rows) for site, rows in inputs.items()}


def fingerprint(gm: torch.fx.GraphModule, sequences: list[list[int]], layout: list, version: str) -> str:
    """A key for this graph's weights (names, shapes, dtypes, and two sums of each: no weight read twice on the
    host), the calibration tokens, the layout searched and the search's `version`."""
    digest = hashlib.sha256(f"{version} {layout} {sequences}".encode())
    with torch.no_grad():
        for name, tensor in sorted({**dict(gm.named_parameters()), **dict(gm.named_buffers())}.items()):
            if tensor.is_floating_point() and tensor.device.type != "meta":
                # float64 sums without a float64 copy (an 8B model's embedding would take 4 GB more)
                one_norm = torch.linalg.vector_norm(tensor, 1, dtype=torch.float64)
                sums = torch.stack([tensor.sum(dtype=torch.float64), one_norm]).tolist()
            else:
                sums = []
            digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype} {sums}".encode())
    return digest.hexdigest()[:32]


def cache_path(cache_dir: Path, kind: str, key: str) -> Path:
    return Path(cache_dir) / kind / f"{key}.pt"


def load_entry(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001  (a corrupt entry is calibrated anew, never a crash)
        log.warning("calibration cache entry %s unreadable (%s): calibrating again", path, error)
        return None


def store_entry(path: Path, found: dict) -> None:
    """Atomically (a concurrent reader sees the whole entry or none); a cache that cannot be written costs the next
    compile a calibration, never this one its result."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        os.close(fd)
        torch.save(found, tmp)
        os.replace(tmp, path)
        tmp = None
    except OSError as error:
        log.warning("calibration cache entry %s not written (%s): the next compile calibrates again", path, error)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
