"""Errors a user fixes in their recipe. Their own module, so that the schema (recipe.py) and the
checks across its sections (compat.py) can both raise them without importing each other."""


class RecipeError(ValueError):
    """A recipe is malformed; the message names the offending key."""
