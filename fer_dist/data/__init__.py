"""Data in three stages: `shards` (the contract), `packing` (dataset to shards), `stream` (shards to
batches)."""
