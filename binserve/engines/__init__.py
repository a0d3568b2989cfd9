"""Runtimes and precisions: the engines one model version can run on, and the plan that picks among them.

design: an engine is a function from collated host arrays to output host arrays (binserve/engines/settings.py).
The candidates are torch in fp32, bf16 or fp16, ONNX Runtime in fp32 or int8 (binserve/engines/onnx.py) and
OpenVINO in fp32 or bf16 (binserve/engines/openvino.py), limited to what the hardware computes natively and to
what the operator asked for (`runtime`, `precision`: "auto" means every one that applies;
engines/candidates.py). At load, each candidate passes an accuracy gate - its outputs on varied
inputs, as a batch and alone, compared with torch fp32 by the adapter - or is not used;
engines/plans.py times those that pass (binserve/engines/timing.py) and gives every batch size to the fastest,
and keeps checking that choice while serving. Exports, quantized copies, compiled blobs and the
plan's record are cached beside the version (binserve/engines/cache.py), so reloads and restarts load them
in a second. For causal LMs, generation.py chooses the generation backend and genai_export.py
exports a version for OpenVINO GenAI. Adapters (models/) supply what the engines need; nothing here
imports an adapter.
"""
