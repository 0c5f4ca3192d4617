"""What a deployable file carries about its model: the typed `Manifest` (`manifest`) and the one validator of its
fields (`fields`), shared by ONNX files, engine sidecars and checkpoints."""
