"""Flower integration: thin wiring from Flower's executors to the gate pipeline."""
