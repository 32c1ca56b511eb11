"""Conditioning adapters: ControlNet, T2I-Adapter and IP-Adapter on one shared recipe."""
