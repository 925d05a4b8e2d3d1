"""Measurement tools, outside the training core.

benchmark.py        the benchmark CLI (`python -m vgg_jax.benchmark`): step speed,
                    against PyTorch with --compare=torch, the input pipeline with --input
torch_reference.py  the PyTorch twin of a VGG and its training step
profiling.py        FLOP counts, device peaks, timing helpers
input_speed.py      the streamed input's speed against tf.data
"""
