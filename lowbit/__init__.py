"""lowbit: deploy DeepSeek-R1-class MoE models at low bit width on as few GPUs as possible."""
from lowbit.engine.llm import LLM, RequestOutput
from lowbit.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput"]
__version__ = "0.1.0"
