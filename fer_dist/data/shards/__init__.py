"""The shard contract: every on-disk name, the manifest, the tar bytes, the audio windows' geometry,
and reading the tars back. Imported by the packer and the stream alike; imports neither, nor any
decoder of video or sound."""
