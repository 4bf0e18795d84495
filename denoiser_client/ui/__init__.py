"""`promptcast ui`: a web console served by a denoiser node.

`styles` reads and checks styles (plain data, no torch); `console.Console` owns the node's one `DenoiserNode` and its
`RemoteTextEncoder` and renders through `generate.render_one`, the path `promptcast generate` takes; `page` lays out
the Gradio page; `command` is the CLI command. Only `page` imports Gradio, and only once a console starts.
"""
