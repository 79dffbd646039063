"""The round pipeline: a run, its steps, and the strategies chosen once when the run is built
(objective, pair source, reference schedule, checkpoints, adaptive beta)."""
