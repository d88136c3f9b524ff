"""The I/O layer: byte streams (plain and TLS), splicing, framed channels, TLS contexts."""
