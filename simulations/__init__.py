"""One-machine federations: Flower's simulation engine running PathFed's apps."""
