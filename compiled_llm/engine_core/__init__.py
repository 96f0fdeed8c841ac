"""A server's engine in its own process (vLLM's split): the API process does HTTP, SSE and tokenization, the
engine-core process schedules and steps the engine, so neither waits on the other's share of one GIL.

    client = EngineCoreClient.start("random:llama-3.1-8b", max_batch_size=64)   # compiles in the core
    async for output in client.generate_async(prompt_ids, SamplingParams(max_tokens=32)): ...
    client.close()

Later, workers (one per GPU) run under the engine core (tensor and expert parallelism).
"""

from compiled_llm.engine_core.client import EngineCoreClient

__all__ = ["EngineCoreClient"]
