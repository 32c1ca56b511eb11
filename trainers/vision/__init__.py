"""Few-shot image classification on CLIP / ViT backbones (`personalize train --task classify`)."""
