"""Sampling: the samplers the round calls, the engines behind them (in-process vLLM, a separate
`vllm serve`, transformers) and the verified weight sync into them."""
