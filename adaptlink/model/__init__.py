"""The model layer: a HuggingFace LLaVA as blocks.

`config` reads a checkpoint or preset into `ModelInfo`; `graph` builds the block DAG with its
costs; `blocks` runs HF's own submodules block by block; `reference` is the single-process
oracle (HF `generate`); `tiny` writes random-weight checkpoints; `emulation` pads compute and
caps memory for emulated devices. Imports `partitioner` only, never `runtime` or the commands.
"""
