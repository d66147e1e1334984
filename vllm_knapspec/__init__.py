"""vllm-knapspec: KnapSpec self-speculative decoding for vLLM.

Importing this package does not import vLLM. `vllm_knapspec.core` is the algorithm (skip sets, the TPT
objective, the knapsack DP, the latency model, the selector, the Triton kernels), usable without vLLM;
`vllm_knapspec.adapter` puts it into vLLM, which loads `vllm_knapspec.plugin:register` through the
`vllm.general_plugins` entry point. `vllm_knapspec.config` is the config (the shipped files: `configs/`), and
`vllm_knapspec.tools` the benchmark and soak test users run.
"""

__version__ = "0.1.0"
