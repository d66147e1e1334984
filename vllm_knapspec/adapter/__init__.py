"""KnapSpec inside vLLM: the drafter on vLLM's draft-model path (`drafter`, `draft`, `graphs`), the draft length
the scheduler schedules (`control`), the selector built for an engine (`selection`), vLLM's patches grouped by
feature (`patches`), metrics (`metrics`), the latency profiler (`profiler`) and the calls that differ between
vLLM versions (`compat`)."""
