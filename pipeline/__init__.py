"""Stage runners and their plumbing: text sources, model loading, activation stores, CLIs."""
