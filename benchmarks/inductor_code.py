"""Print the Inductor code of a random preset cut to a few layers, for reading what kernels a step runs.

    TORCH_LOGS=output_code python benchmarks/inductor_code.py llama-3.1-8b --layers 2 2> code.log
"""

from __future__ import annotations

import argparse

import torch
import transformers as tf

from compiled_llm import compile_model
from compiled_llm.presets import RANDOM_PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=sorted(RANDOM_PRESETS))
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    config = RANDOM_PRESETS[args.preset]()
    config.num_hidden_layers = args.layers
    with torch.device("cuda"):
        model = tf.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    cm = compile_model(model, max_batch_size=1, max_seq_len=512, max_num_tokens=512, cuda_graph_batch_sizes=(1,))
    cm.generate(torch.randint(0, config.vocab_size, (1, 16), device="cuda"), max_new_tokens=4, eos_token_id=[])
    print(cm.report)


if __name__ == "__main__":
    main()
