"""The stream: shards read back as training and evaluation batches (resampling, decoding, counting,
transport from the loader workers, batched preparation on the device). Builds on the shard
contract, never on the packer."""
