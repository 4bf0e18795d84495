"""The promptcast encoder server: hosts text encoders and streams prompt embeddings over gRPC."""
