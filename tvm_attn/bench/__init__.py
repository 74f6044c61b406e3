"""python -m tvm_attn.bench: the seed report's questions answered with measurements anyone can repeat."""
