"""ONNX graph work that export and runtime both need (onnx and onnxruntime only, never torch): the fused
reverse-step graph, topological sort, the GroupNorm rewrite for CPU providers, fp16 conversion and its audit."""
