"""One module per page, each with a ``render()`` that the thin files in ``views/`` call."""
