"""The mini DreamBench: a procedural world, its pretrained base, measures and the method runs (see README)."""
