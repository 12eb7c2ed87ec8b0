"""PathFed's Flower ServerApp: strategy, secure aggregation, checkpoints, run folder."""
