"""sdxld: a self-hosted SDXL image factory (daemon + one-shot commands)."""

__version__ = "0.1.0"
