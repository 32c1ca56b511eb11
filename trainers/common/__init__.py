"""What every recipe shares: the loop, checkpoints and resume, EMA, optimizers, outputs, model card,
validation samples, step memory, the frozen diffusion base and the start of a run."""
