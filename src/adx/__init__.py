"""adx: unsupervised industrial image anomaly detection on Lightning."""

__version__ = "0.1.0"
