"""One rank's training runtime. `loop.run_worker(spec)` is what every launcher calls per rank; around it:
`distributed` (process group, device), `engine` (model, init weights, DeepSpeed), `optim` (parameter
groups, optimizer, learning-rate schedule), `step` (micro-batches of one step, non-finite policy),
`ema`, `evaluation`, `metrics` (Prometheus, metrics.jsonl) and `report` (plots of a finished run)."""
