"""ddpm-deploy: train, export, build, run and verify DDPM samplers."""

__version__ = "0.1.0"
