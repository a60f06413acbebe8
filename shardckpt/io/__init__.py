"""Storage I/O: the data-file writer, the checkpoint reader, the commit protocol, Storage."""
