"""Data: the row schema and adapters, grain pipelines, preference pairs, the synthetic world."""
