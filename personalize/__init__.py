"""personalize: teach foundation models a subject, a style or a skill from a handful of examples."""

from personalize import hub_code

__version__ = "0.1.0"

hub_code.install()
