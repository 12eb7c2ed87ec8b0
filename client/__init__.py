"""PathFed's Flower ClientApp: a hospital's local DP training."""
