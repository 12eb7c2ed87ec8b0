"""PathFed's plain library: models, data, privacy accounting, crypto, configs.

Nothing in this package imports Flower: the Flower apps in ``server/`` and ``client/``
translate messages into calls of this library, which tests and simulations use directly.
"""

__version__ = "0.1.0"
