"""What a person runs: the ``fxslim`` command (cli), its demo, graph inspection and the model
specs the command accepts. The top layer: it builds on api, backend and cost_model; nothing in
fxslim imports it."""
