"""Recipes: the schema, loading with extends and overrides, the recipe library, `surgery check`."""
