"""burrow: publish a local port through your own relay."""
