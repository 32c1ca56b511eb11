"""personalize: teach foundation models a subject, a style or a skill from a handful of examples."""

__version__ = "0.1.0"
