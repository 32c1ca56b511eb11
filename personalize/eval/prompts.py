"""Prompt sets of `personalize eval`: DreamBench's 25 prompts per subject, or the user's own file.

DreamBench (DreamBooth, Ruiz et al. 2023, arXiv 2208.12242; google/dreambooth dataset) asks each subject
25 prompts: recontextualization (new backgrounds), accessorization (live subjects: outfits) or property
change (colour, material, shape). `{0}` is the unique token, `{1}` the class word.
"""

from __future__ import annotations

from pathlib import Path

from personalize.errors import UserError

_CONTEXTS = (
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
)
_PROPERTIES = (
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
)
OBJECT_PROMPTS = (
    *_CONTEXTS,
    "a {0} {1} with a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background",
    "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk",
    "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror",
    "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road",
    "a {0} {1} on top of a white rug",
    *_PROPERTIES,
)
LIVE_PROMPTS = (
    *_CONTEXTS,
    "a {0} {1} wearing a red hat",
    "a {0} {1} wearing a santa hat",
    "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle",
    "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit",
    "a {0} {1} in a police outfit",
    "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt",
    "a {0} {1} in a purple wizard outfit",
    *_PROPERTIES,
)
# DreamBench's live subjects are cats and dogs; other animal words get the same outfit prompts.
LIVE_CLASSES = {"cat", "dog", "kitten", "puppy", "animal", "pet", "person", "man", "woman", "boy", "girl"}
CLASS_PROMPTS = 4  # class prompts for drift: "a photo of a {class}" and the first contexts without the token


def is_live(class_word: str) -> bool:
    return class_word.strip().lower().split(" ")[-1] in LIVE_CLASSES if class_word.strip() else False


def subject_prompts(spec: str, token: str, class_word: str) -> list[str]:
    """`dreambench` -> DreamBench's 25 prompts for the subject; a file path -> its non-empty lines.

    A file's lines may use `{token}` and `{class}` (or DreamBench's `{0}` and `{1}`).
    """
    if spec == "dreambench":
        templates = LIVE_PROMPTS if is_live(class_word) else OBJECT_PROMPTS
        return [" ".join(template.format(token, class_word).split()) for template in templates]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(
            f"--prompts {spec}: not 'dreambench' and not a text file; pass dreambench or FILE (one prompt a line)"
        )
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = []
    for line in lines:
        if line and not line.startswith("#"):
            line = line.replace("{token}", "{0}").replace("{class}", "{1}")
            try:
                prompts.append(" ".join(line.format(token, class_word).split()))
            except (IndexError, KeyError, ValueError):
                raise UserError(
                    f"--prompts {spec}: cannot fill in '{line}'; use {{token}} and {{class}} only"
                ) from None
    if not prompts:
        raise UserError(f"--prompts {spec}: the file holds no prompt (one a line; # starts a comment)")
    return prompts


def class_prompts(class_word: str, count: int = CLASS_PROMPTS) -> list[str]:
    """Prompts that name only the class: what the adapter must not change (language drift)."""
    if not class_word.strip():
        return []
    contexts = [" ".join(template.format("", class_word).split()) for template in _CONTEXTS]
    return [f"a photo of a {class_word}", *contexts[: max(0, count - 1)]]


def without_token(prompt: str, token: str) -> str:
    """The prompt with the unique token taken out: what CLIP-T compares the image to (CLIP never saw the token)."""
    return " ".join(word for word in prompt.split() if word != token)
