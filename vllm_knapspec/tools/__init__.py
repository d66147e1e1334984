"""Tools users run against real `vllm serve` processes: `knapspec-bench` (KnapSpec vs plain decoding and peer
methods on the same prompts, `bench`) and `knapspec-soak` (concurrent streaming clients, aborts, preemption,
`soak`). Latency profiles: `knapspec-profile`."""
