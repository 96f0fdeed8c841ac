"""The serving engine: requests, their sampling settings, the continuous-batching scheduler, the engine loop."""

from compiled_llm.engine.engine import Engine
from compiled_llm.engine.request import Request, RequestState
from compiled_llm.engine.sampling_params import SamplingParams
from compiled_llm.engine.scheduler import Scheduler

__all__ = ["Engine", "Request", "RequestState", "SamplingParams", "Scheduler"]
