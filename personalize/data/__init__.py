"""From a folder of images to cached training batches."""
