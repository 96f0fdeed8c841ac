"""Drop-in decoders on the GPU (tests/drop_in_models/, head_dim 64 so FlashInfer's prebuilt kernels serve
them): Inductor on CUDA, paged attention, decode CUDA graphs; the module's own logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from compiled_llm import compile_model
from conftest import relative_error
from drop_in_models import gptfast, meta_llama, mingpt, naive_greedy, nanogpt

pytestmark = pytest.mark.gpu

MODELS = {  # 4 heads of 64, 2 KV heads where the codebase has GQA; 2 layers
    "nanogpt": lambda: nanogpt(n_embd=256, block_size=128),
    "mingpt": lambda: mingpt(n_embd=256, block_size=128),
    "gptfast": lambda: gptfast(max_seq_length=128, dim=256, head_dim=64, intermediate_size=512, block_size=128),
    "meta_llama": lambda: meta_llama(dim=256, max_seq_len=64),
}


CASES = [(name, torch.float32) for name in MODELS] + [("gptfast", torch.bfloat16), ("meta_llama", torch.bfloat16)]


@pytest.mark.parametrize(("name", "dtype"), CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in CASES])
def test_drop_in_module_on_the_gpu(name, dtype):
    model = MODELS[name]().to("cuda", dtype)
    if name == "gptfast":  # its caches and tables follow the weights' dtype and device, as gpt-fast sets them up
        model.max_seq_length = -1
        with torch.device("cuda"):
            model.setup_caches(1, 128)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 96, (1, 24), generator=generator).cuda()
    prompts = [torch.randint(0, 96, (n,), generator=generator).tolist() for n in (5, 17)]
    with torch.no_grad():
        call = {"gptfast": lambda ids: model(ids, torch.arange(ids.shape[1], device="cuda")),
                "meta_llama": lambda ids: model(ids, 0)}.get(name, lambda ids: model(ids)[0])  # fmt: skip
        if name in ("nanogpt",):  # last position only: one forward per prefix
            expected = torch.cat([call(prompt[:, : end + 1]) for end in range(24)], dim=1)
        else:
            expected = call(prompt)
    tokens = [naive_greedy(model, p, 16) for p in prompts] if dtype == torch.float32 else None
    cm = compile_model(model, max_batch_size=4)
    assert "self-check" in str(cm.report) and {layer.backend for layer in cm.report.attention} != {"sdpa"}
    logits = cm(prompt).logits
    assert relative_error(logits.float(), expected.float()) < (1e-3 if dtype == torch.float32 else 2e-2)
    if tokens is not None:  # greedy ties under bf16 rounding are not the runtime's to break
        for p, expected_tokens in zip(prompts, tokens):
            ids = torch.tensor([p], device="cuda")
            assert cm.generate(ids, max_new_tokens=16)[0, len(p) :].tolist() == expected_tokens
