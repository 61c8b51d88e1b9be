class UsageError(ValueError):
    """A problem with the user's arguments or files: the CLI reports it in one line, without a traceback."""


# Messages link the docs by URL: an installed package has no docs/ folder to point at.
DOCS_URL = "https://github.com/trl-thr/trl-thr/blob/main/docs"


def docs_url(page: str, anchor: str | None = None) -> str:
    """The address of a docs page (`cli.md`), or of a section of it."""
    return f"{DOCS_URL}/{page}" + (f"#{anchor}" if anchor else "")
