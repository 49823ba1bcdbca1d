"""On-disk formats: atomic file IO, peft's adapter layout, merges on weights."""
