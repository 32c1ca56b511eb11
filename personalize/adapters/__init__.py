"""The adapter-injection core (LoRA, LoHa, LoKr, KronA, IA3, selective methods)."""
