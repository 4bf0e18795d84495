"""promptcast's front door: the `promptcast` command, the offline demo, the tiny-model kit and cache tools.

The only package that imports both sides: `encoder_server` (text encoders, served over gRPC) and `denoiser_client`
(transformer and VAE on a small card) stand on `shared` and never import each other.
"""
