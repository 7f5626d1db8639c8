"""LightningDataModules; importing this package registers every one of them by name."""
from datamodules import cora  # noqa: F401
