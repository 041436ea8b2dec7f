"""The experiment stage: the research plan (experiments.toml) run end to end."""
