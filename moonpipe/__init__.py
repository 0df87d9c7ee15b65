"""moonpipe: the platform layer of the product-understanding pipeline (settings, Spark, Delta, CLI)."""

__version__ = "0.1.0"
