"""The application commands' work below the CLI: opening an engine or checkpoint as a Pipeline (`opener`), verify,
eval, the demo and the sample-quality metric (`quality`)."""
