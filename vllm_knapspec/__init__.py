"""vllm-knapspec: KnapSpec self-speculative decoding for vLLM.

Importing this package does not import vLLM; the algorithm (SkipSet, TPT, DP, LatencyModel, kernels) is
usable alone. vLLM loads `vllm_knapspec.plugin:register` through the `vllm.general_plugins` entry point.
"""

__version__ = "0.1.0"
