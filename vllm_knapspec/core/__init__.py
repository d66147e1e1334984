"""The KnapSpec algorithm, free of vLLM (a ruff banned-api rule keeps it so): skip sets (`skipset`), the
tokens-per-time objective (`tpt`), the knapsack DP over the 2L sublayers (`dp`), the latency model (`latency`),
the selector that turns them into a plan per engine step (`selector`) and the Triton kernels with their torch
references (`kernels`). The model reaches it through duck-typed objects the vLLM adapter builds."""
