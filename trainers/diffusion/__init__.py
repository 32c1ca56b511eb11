"""Text-to-image recipes on UNet models: DreamBooth / adapters, Textual Inversion and pivotal tuning,
and the diffusion losses."""
