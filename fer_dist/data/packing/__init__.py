"""Reading the dataset and packing it: the Aff-Wild2 layout, annotation files, video and sound
decoded with PyAV, the synthetic twin, faces cropped from one's own videos, and the packer that
writes the shards (and their feature twins). Builds on the shard contract, never on the stream."""
