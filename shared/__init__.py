"""Code both sides of promptcast use: the wire stubs, the tensor codec, cache keys and the CLI root."""
