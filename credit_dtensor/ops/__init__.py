"""Exact rules for H-sharded DTensors, one module per op family. Importing registers them."""
