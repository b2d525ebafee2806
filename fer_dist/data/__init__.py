"""The data path before the model: the dataset on disk, packed into shards, streamed back as batches."""
