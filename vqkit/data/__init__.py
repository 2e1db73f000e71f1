"""Data: corpus layouts, image sets, the feature cache (format, reader, writer) and datasets."""
