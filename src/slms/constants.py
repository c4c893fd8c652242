"""Constants shared by layers that must not import each other (data/ and model/)."""

IGNORE_INDEX = -100  # a target that no loss counts: a pad, or the tail of the last window
