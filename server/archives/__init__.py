"""Archives: streaming inspection of uploaded archives and the stores that keep them."""
