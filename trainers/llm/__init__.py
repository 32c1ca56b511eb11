"""Instruction tuning of LLMs and VLMs with any adapter of the core (SFT, chat data, peft outputs)."""
