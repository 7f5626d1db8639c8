"""Writers of small datasets in the real on-disk formats, so tests exercise the real loaders."""
