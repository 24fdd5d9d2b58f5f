"""Speed and memory benchmarks of torch_block and jax_block, each with targets: `python -m
benchmarks.NAME [--quick] [--check]`, or `python -m benchmarks.all` for every one."""
