"""personalize.pipelines: inference only; loads our outputs into stock diffusers pipelines."""
