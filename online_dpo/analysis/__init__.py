"""Analysis: held-out evaluation, statistics and intervals, the gaming alarm, run comparison, sweeps,
reports and trackers."""
