"""LightningModules; importing this package registers every one of them by name."""
from models import gcn  # noqa: F401
